"""A Hugging Face `Trainer` callback that records the model's training into an UpdateStore.

    from pyunlearn.integrations.transformers import RecordUpdates
    trainer = Trainer(model=model, args=args, train_dataset=train,        # train has an "ids" column
                      callbacks=[RecordUpdates("updates.zarr", create=dict(keep=0.01))])
    trainer.train()                                                       # or resume_from_checkpoint=...

What the user adds is the callback and an int64 sample-ID column (`ids`, or the name given as
ids_column=) in the training dataset. The Trainer's defaults stay as they are:

- Sample IDs. The Trainer drops every dataset column the model's `forward` does not name
  (remove_unused_columns=True): from a `datasets.Dataset` before batching, from other datasets'
  features in its collator wrapper, so neither a collator nor a callback hook ever sees them.
  So at `on_init_end` (the Trainer's model is known, its column list not yet computed) the
  callback gives the model instance a `forward` that also takes the ID column as a keyword,
  drops it before calling the model's own `forward`, and, in training mode, declares the IDs
  to the recorder. The Trainer then keeps the column, and the model never sees it. Under
  gradient accumulation each micro-batch's forward declares its IDs, so a recorded step holds
  the IDs of all the micro-batches of that optimizer step. Evaluation batches (eval mode) may
  carry the column too; their IDs are dropped. The instance `forward` stays after training
  (later evaluations may still pass the column); it changes nothing else.
- The optimizer. The Trainer hands out Accelerate's AcceleratedOptimizer, which the recorder
  unwraps: it hooks the torch optimizer inside, which steps once per optimizer step (Accelerate
  skips it during accumulation).
- Checkpoints. The callback is an `ExportableState`: when the Trainer saves a checkpoint it
  asks the callback for its state, which flushes the recorder and returns the recorder state
  (`rec.state_dict()`), and writes it into the checkpoint's trainer_state.json. `trainer.train(
  resume_from_checkpoint=...)` loads that file, and the callback hands the state to the new
  recorder, so recording continues exactly from the checkpoint's step (steps an abandoned run
  recorded after it are dropped, with a RuntimeWarning). Leave the Trainer's
  `restore_callback_states_from_checkpoint` at its default, False: it re-creates callbacks from
  the checkpoint's JSON, which cannot hold a store.
- Several processes (torchrun, `accelerate launch`): give every rank the same arguments, with
  the store as a path. The writer rank (`writer_rank`, default 0) creates the store (with
  `create=`) or opens it (without, or when resuming); the other ranks only gather the IDs.

The store names the parameters as in the Trainer's model (`trainer.model`), e.g.
"bert.encoder.layer.0.attention.self.query.weight", so forgetting works on that model or a
state_dict of it (`model.state_dict()`, or `pyunlearn forget --checkpoint model.safetensors`
once converted to a torch file). Needs the `transformers` package (pip install
'pyunlearn[transformers]'); CPU models only, as the recorder.
"""
from __future__ import annotations

import inspect
import types
from typing import Any

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("pyunlearn.integrations.transformers needs the transformers package: "
                      "pip install 'pyunlearn[transformers]'") from exc

from ..errors import RecorderError
from ..recording import UpdateRecorder
from ..store import UpdateStore
from ._common import StoreSpec, all_ranks_ready, distributed_rank

__all__ = ["RecordUpdates"]

_NOT_GIVEN = object()


class RecordUpdates(TrainerCallback, ExportableState):
    """Records every optimizer step of the Trainer's model (see the module docstring).

    store: an UpdateStore created from the Trainer's model, or a path (str or os.PathLike, or an
    fsspec URL with storage_options) that the writer rank creates with `create` (a dict of
    UpdateStore.create options, e.g. dict(keep=0.01)) or, without `create` or when resuming,
    opens. ids_column: the dataset column holding each sample's int64 ID. Other keyword
    arguments go to UpdateRecorder (writer_rank, flush_every_s, allow_unlabeled_steps, ...).

    After training, `callback.store` is the store written (None on the ranks that do not write)
    and `callback.recorder` the closed recorder. A store the callback opened from a path is
    closed when training ends; call `callback.close()` if training raised.
    """

    def __init__(self, store: UpdateStore | str | Any = _NOT_GIVEN, *, ids_column: str = "ids",
                 create: dict | None = None, storage_options=None, **recorder_options):
        if store is _NOT_GIVEN:
            raise TypeError("RecordUpdates needs a store (an UpdateStore or a path). If the Trainer re-created this "
                            "callback from a checkpoint (TrainingArguments(restore_callback_states_from_checkpoint="
                            "True)), leave that option False: RecordUpdates saves and restores its own state")
        if not isinstance(ids_column, str) or not ids_column.isidentifier():
            raise ValueError(f"ids_column must name a dataset column that is a Python identifier, got {ids_column!r}")
        self._spec = StoreSpec(store, create, storage_options)
        self.ids_column = ids_column
        self.recorder_options = recorder_options
        self.store: UpdateStore | None = store if isinstance(store, UpdateStore) else None
        self.recorder: UpdateRecorder | None = None
        self._model = None
        self._declared = False  # IDs declared since the last optimizer step

    # ----------------------------------------------------------------- the ID column
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("RecordUpdates needs the Trainer's model (Trainer(model=...))")
        _accept_ids(model, self)
        self._model = model

    def _declare(self, ids) -> None:
        if self.recorder is None or self.recorder.closed:
            return  # a training-mode forward outside trainer.train(): nothing to record
        self.recorder.batch(ids)
        self._declared = True

    # ----------------------------------------------------------------- recording
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._model is None:
            raise RecorderError("RecordUpdates must be passed to the Trainer when it is built (Trainer(..., "
                                "callbacks=[RecordUpdates(...)])): added later (trainer.add_callback) it cannot keep "
                                f"the {self.ids_column!r} column in the batches")
        if model is not self._model:  # the Trainer replaced its model (model_init): give the new one the column too
            _accept_ids(model, self)
            self._model = model
        saved = _saved_state(state, type(self).__name__)
        error = None
        try:
            rank = distributed_rank()
            writes = rank is None or rank[0] == self.recorder_options.get("writer_rank", 0)
            if self._spec.owned:
                self.store = self._spec.resolve(model, writes=writes, resuming=bool(state.global_step))
            self.recorder = UpdateRecorder(model, optimizer, self.store if writes else None, state=saved,
                                           **self.recorder_options)
        except BaseException as exc:  # noqa: BLE001 - re-raised on this rank, reported to the others
            error = exc
        all_ranks_ready(error)
        self._declared = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._declared and not self.recorder_options.get("allow_unlabeled_steps", False):
            raise RecorderError(
                f"this optimizer step's batches carry no {self.ids_column!r} column: give the training dataset a "
                f"column {self.ids_column!r} of int64 sample IDs (or name yours with RecordUpdates(..., ids_column="
                "...)). The step did not run")
        self._declared = False

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Closes the recorder (flushing the store and marking the final model) and a store the
        callback opened from a path. Called when training ends; call it yourself if training raised."""
        self._spec.close(self.recorder, self.store)

    # ----------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """The Trainer calls this while saving a checkpoint (ExportableState) and writes the result
        into the checkpoint's trainer_state.json: the recorder state, taken after a flush."""
        recorder = None if self.recorder is None or self.recorder.closed else self.recorder.state_dict()
        return {"args": {}, "attributes": {"recorder": recorder}}


def _saved_state(state, name: str) -> dict | None:
    """The recorder state of the checkpoint the Trainer resumed from (in its trainer_state.json),
    or None when training starts afresh."""
    if state is None or not state.global_step:
        return None
    saved = (getattr(state, "stateful_callbacks", None) or {}).get(name)
    if isinstance(saved, list):  # one entry per callback of this class
        saved = saved[0] if saved else None
    if not isinstance(saved, dict):
        return None
    return (saved.get("attributes") or {}).get("recorder")


def _accept_ids(model, callback: RecordUpdates) -> None:
    """Gives `model` an instance `forward` that also takes the ID column as a keyword argument
    (so the Trainer, which reads forward's signature, keeps the column), drops it, declares the
    IDs to `callback` in training mode, and calls the model's own forward."""
    column = callback.ids_column
    current = model.__dict__.get("forward")
    if current is not None and getattr(current, "_pyunlearn_ids", None) is not None:
        inner = current._pyunlearn_ids  # already given by an earlier callback: point it at this one
    else:
        inner = model.forward
    signature = inspect.signature(inner)
    if column in signature.parameters:
        raise ValueError(f"{type(model).__name__}.forward takes an argument {column!r}, so the Trainer passes that "
                         "column to the model: name the sample-ID column otherwise (RecordUpdates(..., "
                         "ids_column=...))")
    own = getattr(inner, "__func__", None) if getattr(inner, "__self__", None) is model else None

    def forward(module, *args, **kwargs):
        ids = kwargs.pop(column, None)
        if ids is not None and module.training:
            callback._declare(ids)
        if own is not None:
            return own(module, *args, **kwargs)  # the class's forward, bound to this module (also a deep copy)
        return inner(*args, **kwargs)

    params = list(signature.parameters.values())
    extra = inspect.Parameter(column, inspect.Parameter.KEYWORD_ONLY, default=None)
    where = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(where, extra)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    forward.__signature__ = signature.replace(parameters=[self_param, *params])
    forward.__doc__ = getattr(inner, "__doc__", None)
    forward._pyunlearn_ids = inner
    model.forward = types.MethodType(forward, model)
