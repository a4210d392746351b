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
- Keys. A column of keys (str: e-mails, account numbers as text; bytes; UUIDs) would break the
  collator, which makes tensors of columns: `train = callback.map_keys(train, column="user")`
  replaces it with an int64 `ids` column of the keys' sample IDs, mapped once with the secret
  (secret=, or PYUNLEARN_SECRET / PYUNLEARN_SECRET_FILE). The callback then creates the store as
  a store of keys and declares the column's IDs as mapped keys (keys.MappedIds), so
  `amnesiac_forget(model, store, ["alice@example.com"])` finds their steps.
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
  `create=`) or opens it (without, or when resuming); the other ranks only gather the IDs. A
  refusal on one rank (a forgotten sample in its batch, a batch without IDs) makes every rank
  raise before that optimizer step runs.
- A store path that exists (a re-run) is opened if it records this model's layer table with the
  options `create=` names (exist_ok=True, the default); the recorder's resume rules then say
  whether this model may continue it (resume_from_checkpoint does; a fresh model after a finished
  run is refused at the first step). exist_ok=False refuses the path (FileExistsError).

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

import numpy as np
import torch

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("pyunlearn.integrations.transformers needs the transformers package: "
                      "pip install 'pyunlearn[transformers]'") from exc

from .. import keys
from ..errors import KeyMappingError, RecorderError
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
    opens. exist_ok: a path that already holds a store of this model's layer table (and of the
    keep, value_dtype and attribution `create` names) is opened instead of created, so a re-run
    goes on with it (the recorder's resume rules decide whether this model may continue it);
    False: refuse it (FileExistsError). ids_column: the dataset column holding each sample's
    int64 ID (or the IDs map_keys made of its keys). secret: the secret that maps keys to IDs
    (map_keys) and that the store and every rank's recorder use (default: PYUNLEARN_SECRET or
    PYUNLEARN_SECRET_FILE). Other keyword arguments go to UpdateRecorder (writer_rank,
    flush_every_s, allow_unlabeled_steps, ...).

    After training, `callback.store` is the store written (None on the ranks that do not write)
    and `callback.recorder` the closed recorder. A store the callback opened from a path is
    closed when training ends; call `callback.close()` if training raised.
    """

    def __init__(self, store: UpdateStore | str | Any = _NOT_GIVEN, *, ids_column: str = "ids",
                 create: dict | None = None, storage_options=None, secret=None, exist_ok: bool = True,
                 **recorder_options):
        if store is _NOT_GIVEN:
            raise TypeError("RecordUpdates needs a store (an UpdateStore or a path). If the Trainer re-created this "
                            "callback from a checkpoint (TrainingArguments(restore_callback_states_from_checkpoint="
                            "True)), leave that option False: RecordUpdates saves and restores its own state")
        if not isinstance(ids_column, str) or not ids_column.isidentifier():
            raise ValueError(f"ids_column must name a dataset column that is a Python identifier, got {ids_column!r}")
        self._spec = StoreSpec(store, create, storage_options, secret=secret, exist_ok=exist_ok)
        self.ids_column = ids_column
        self.recorder_options = recorder_options
        self.store: UpdateStore | None = store if isinstance(store, UpdateStore) else None
        self.recorder: UpdateRecorder | None = None
        self._model = None
        self._declared = False  # IDs declared since the last optimizer step
        self._key_check: str | None = None  # set by map_keys: the ID column holds keys mapped with this secret

    # ----------------------------------------------------------------- keys
    def map_keys(self, dataset, column: str, *, remove: bool = True):
        """`dataset` with a column `ids_column` (int64) holding the sample ID of each row's key
        in `column` (str, bytes or UUID: an e-mail, an account number as text), mapped with the
        secret (secret=, the given store's, or PYUNLEARN_SECRET / PYUNLEARN_SECRET_FILE).

        Why: the Trainer's collator makes tensors of columns, and a column of strings breaks it;
        a column of IDs goes through as any other. The callback then declares those IDs as the
        keys' (keys.MappedIds), so the store, a store of keys, takes them, and forgetting by key
        (`amnesiac_forget(model, store, ["alice@example.com"])`) finds their steps. remove: drop
        the key column (True by default: keys need not travel in the batches). dataset: a
        `datasets.Dataset` (the column is added whole, with add_column), a list of dicts (a new
        list), or a map-style torch Dataset of dicts (wrapped: each item gets its ID when read).
        Call it on every rank, as the Trainer's other arguments."""
        if not isinstance(column, str):
            raise TypeError(f"column must name the dataset's key column, got {type(column).__name__}")
        hasher, check = self._hasher()
        self._key_check = check
        return _with_ids(dataset, column, self.ids_column, hasher, remove=remove)

    def _hasher(self):
        """(a function mapping keys to IDs, the secret's check value): the given store's mapping,
        else the secret's (new stores map keys canonically: pyunlearn.keys)."""
        if isinstance(self._spec.store, UpdateStore) and self._spec.store.metadata.keyed:
            store = self._spec.store
            return (lambda values: np.asarray(store.ids_for(values, "keys"), dtype=np.int64)), store.metadata.key_check
        hasher = keys.KeyHasher.resolve(self._spec.secret)
        if hasher is None:
            raise KeyMappingError(f"map_keys needs the secret that maps keys to sample IDs: RecordUpdates(..., "
                                  f"secret=...), or set {keys.SECRET_ENV} or {keys.SECRET_FILE_ENV}")
        return hasher.ids, hasher.check

    # ----------------------------------------------------------------- the ID column
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("RecordUpdates needs the Trainer's model (Trainer(model=...))")
        _accept_ids(model, self)
        self._model = model

    def _declare(self, ids) -> None:
        if self.recorder is None or self.recorder.closed:
            return  # a training-mode forward outside trainer.train(): nothing to record
        if self._key_check is not None:  # IDs map_keys made of keys: the store of keys takes them as keys
            if isinstance(ids, torch.Tensor):
                ids = ids.detach().cpu().numpy()
            ids = keys.mapped(np.asarray(ids).reshape(-1), self._key_check)
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
        rank = distributed_rank()
        writes = rank is None or rank[0] == self.recorder_options.get("writer_rank", 0)
        error = None
        try:
            if self._spec.owned:
                self.store = self._spec.resolve(model, writes=writes, resuming=bool(state.global_step),
                                                keyed=self._key_check is not None)
            if writes and self._key_check is not None:
                _check_mapping(self.store, self._key_check)
        except BaseException as exc:  # noqa: BLE001 - re-raised on this rank, reported to the others
            error = exc
        all_ranks_ready(error)
        # Under several processes the recorder starts on every rank or raises on every rank.
        self.recorder = UpdateRecorder(model, optimizer, self.store if writes else None, state=saved,
                                       secret=self._spec.secret, **self.recorder_options)
        self._declared = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._declared and not self.recorder_options.get("allow_unlabeled_steps", False):
            error = RecorderError(
                f"this optimizer step's batches carry no {self.ids_column!r} column: give the training dataset a "
                f"column {self.ids_column!r} of int64 sample IDs (or name yours with RecordUpdates(..., ids_column="
                "...), or make one of a key column with callback.map_keys(dataset, column=...)). The step did not run")
            if distributed_rank() is None:
                raise error
            self.recorder.refuse_next_step(error)  # every rank raises it before the step runs
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


def _check_mapping(store: UpdateStore, key_check: str) -> None:
    """The store the IDs map_keys made go into must map keys as map_keys did: with that secret,
    canonically (a store of format 4 maps keys as given: its IDs for the same keys differ)."""
    meta = store.metadata
    if meta.keyed and meta.key_check != key_check:
        raise KeyMappingError(f"map_keys mapped the keys with another secret than {store.path}'s: give RecordUpdates "
                              "the store's secret (secret=)")
    if meta.keyed and meta.key_mapping not in (None, keys.CANONICAL):
        raise KeyMappingError(f"{store.path} maps keys as given (a store of format 4), map_keys canonically: make the "
                              "ID column with the store's own mapping (store.ids_for(keys)) instead")


def _with_ids(dataset, column: str, ids_column: str, to_ids, *, remove: bool):
    """`dataset` with the int64 column `ids_column` of its `column`'s keys mapped by `to_ids`."""
    if hasattr(dataset, "add_column") and hasattr(dataset, "column_names"):  # a datasets.Dataset
        if column not in dataset.column_names:
            raise KeyError(f"the dataset has no column {column!r} (it has {dataset.column_names})")
        if ids_column in dataset.column_names:
            raise ValueError(f"the dataset already has a column {ids_column!r}: name the ID column otherwise "
                             "(RecordUpdates(..., ids_column=...))")
        ids = to_ids(list(dataset[column]))
        out = dataset.add_column(ids_column, ids.tolist())
        return out.remove_columns(column) if remove else out
    if isinstance(dataset, (list, tuple)):
        if not all(isinstance(row, dict) and column in row for row in dataset):
            raise KeyError(f"every row must be a dict with a {column!r} key")
        ids = to_ids([row[column] for row in dataset])
        return [{**{k: v for k, v in row.items() if not (remove and k == column)}, ids_column: int(i)}
                for row, i in zip(dataset, ids)]
    if isinstance(dataset, torch.utils.data.Dataset) and hasattr(dataset, "__getitem__"):
        return _MappedKeys(dataset, column, ids_column, to_ids, remove)
    raise TypeError(f"map_keys takes a datasets.Dataset, a list of dicts or a map-style torch Dataset of dicts, got "
                    f"{type(dataset).__name__}")


class _MappedKeys(torch.utils.data.Dataset):
    """A map-style dataset of dicts whose items get the ID of their key as they are read."""

    def __init__(self, dataset, column, ids_column, to_ids, remove):
        self.dataset, self.column, self.ids_column = dataset, column, ids_column
        self._to_ids, self.remove = to_ids, remove

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[index]
        if not isinstance(row, dict) or self.column not in row:
            raise KeyError(f"item {index} is not a dict with a {self.column!r} key")
        ids = self._to_ids([row[self.column]])
        out = {k: v for k, v in row.items() if not (self.remove and k == self.column)}
        out[self.ids_column] = int(ids[0])
        return out


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


def _inspected(model):
    """The module whose forward signature the Trainer reads to choose the columns it keeps: the
    model, or a PEFT model's base model (whose forward the PEFT model calls with the batch's
    other keyword arguments, the ID column among them)."""
    if type(model).__module__.split(".")[0] == "peft":
        if hasattr(model, "get_base_model"):
            return model.get_base_model()
        inner = getattr(getattr(model, "base_model", None), "model", None)  # PeftMixedModel
        if isinstance(inner, torch.nn.Module):
            return inner
    return model


def _accept_ids(model, callback: RecordUpdates) -> None:
    """Gives the module whose forward the Trainer inspects (the model, or a PEFT model's base
    model) an instance `forward` that also takes the ID column as a keyword argument (so the
    Trainer keeps the column), drops it, declares the IDs to `callback` in training mode, and
    calls the module's own forward."""
    model = _inspected(model)
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
