"""A PyTorch Lightning callback that records a LightningModule's training into an UpdateStore.

    trainer = lightning.Trainer(callbacks=[RecordUpdates("updates.zarr", create=dict(keep=0.01))], ...)
    trainer.fit(lit_module, loader)                                         # batches: (ids, x, y)

The store names the parameters as in the LightningModule (e.g. "net.fc1.weight", as in its
Lightning checkpoints' state_dict). `store` may also be an UpdateStore created from the module
(`UpdateStore.create("updates.zarr", lit_module, keep=0.01)`) in a single process.

Batch convention: a tuple or list whose first element holds the batch's int64 sample IDs or
its keys (the default collate makes a sequence of str of a dataset's str keys), or a dict with an
"ids" entry; pass ids_of=callable(batch) -> IDs for anything else. Keys are mapped with
`secret=` (or PYUNLEARN_SECRET / PYUNLEARN_SECRET_FILE) on every rank. Needs the
`lightning` package (pip install 'pyunlearn[lightning]'); a single optimizer. With
accumulate_grad_batches every micro-batch's IDs go into the optimizer step they feed.

DDP (`strategy="ddp"`): give every rank the same arguments, with the store as a path. The
writer rank (`writer_rank`, default 0) creates the store from the module (with `create=`, a
dict of UpdateStore.create options) or opens it (without `create`, or when resuming from a
checkpoint); the other ranks hold no store and only take part in gathering each step's IDs
from every rank, so the stored step holds the global batch. If the writer rank cannot create
or open the store, every rank raises at the start of training; a batch one rank refuses (a
forgotten sample, a key it cannot map) makes every rank raise before that optimizer step runs.

Checkpoints: saving one flushes the recorder and stores its state (the committed step and the
model's fingerprint) in the checkpoint's callback states; `trainer.fit(..., ckpt_path=...)`
loads it back, so recording continues exactly from the checkpoint's step (steps an abandoned
run recorded after it are dropped, with a RuntimeWarning). Resuming from a checkpoint without
that state is refused at the first step with the recorder's message.
"""
from __future__ import annotations

from typing import Any, Callable

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("pyunlearn.integrations.lightning needs the lightning package: "
                      "pip install 'pyunlearn[lightning]'") from exc

from ..recording import UpdateRecorder
from ..store import UpdateStore
from ._common import StoreSpec, all_ranks_ready, distributed_rank


def default_ids(batch: Any):
    if isinstance(batch, dict) and "ids" in batch:
        return batch["ids"]
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ValueError("cannot find the sample IDs in this batch: yield (ids, x, y) tuples, a dict with 'ids', "
                     "or pass RecordUpdates(store, ids_of=lambda batch: ...)")


class RecordUpdates(Callback):
    """Records every optimizer step of the LightningModule (see the module docstring).

    store: an UpdateStore created from the LightningModule, or a path (str or os.PathLike, or an
    fsspec URL with storage_options) that the writer rank creates with `create` (a dict of
    UpdateStore.create options) or, without `create` or when resuming, opens. exist_ok: a path
    that already holds a store of this module's layer table (and of the keep, value_dtype and
    attribution `create` names) is opened instead of created, so a re-run goes on with it (the
    recorder's resume rules then decide whether this model may continue it); False: refuse it
    (FileExistsError). secret: the secret mapping the batches' keys (str, bytes, UUID) to sample
    IDs on every rank (default: PYUNLEARN_SECRET or PYUNLEARN_SECRET_FILE); a new store created
    with it is a store of keys. Other keyword arguments go to UpdateRecorder (writer_rank,
    flush_every_s, allow_unlabeled_steps, ...). After training `callback.store` is the store
    written (None on the ranks that do not write); a store the callback opened from a path is
    closed when training ends."""

    def __init__(self, store: UpdateStore | str | Any, *, ids_of: Callable[[Any], Any] | None = None,
                 create: dict | None = None, storage_options=None, secret=None, exist_ok: bool = True,
                 **recorder_options):
        self._spec = StoreSpec(store, create, storage_options, secret=secret, exist_ok=exist_ok)
        self.store: UpdateStore | None = store if isinstance(store, UpdateStore) else None
        self.ids_of = ids_of or default_ids
        self.recorder_options = recorder_options
        self.recorder: UpdateRecorder | None = None
        self._pending_state: dict | None = None  # loaded from a checkpoint before the recorder exists

    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"RecordUpdates supports one optimizer, the module configures {len(trainer.optimizers)}")
        state, self._pending_state = self._pending_state, None
        rank = distributed_rank()
        writes = rank is None or rank[0] == self.recorder_options.get("writer_rank", 0)
        error = None
        try:
            if self._spec.owned:
                resuming = state is not None or getattr(trainer, "ckpt_path", None) is not None
                self.store = self._spec.resolve(pl_module, writes=writes, resuming=resuming)
        except BaseException as exc:  # noqa: BLE001 - re-raised on this rank, reported to the others
            error = exc
        all_ranks_ready(error)
        # Lightning restored the checkpoint's model and optimizer before this hook, so the state
        # can be checked against them here. Under DDP the recorder starts on every rank or
        # raises on every rank.
        self.recorder = UpdateRecorder(pl_module, trainer.optimizers[0], self.store if writes else None,
                                       state=state, secret=self._spec.secret, **self.recorder_options)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        try:
            ids = self.ids_of(batch)
        except Exception as exc:  # noqa: BLE001 - under DDP raised by every rank at the step
            if distributed_rank() is None:
                raise
            self.recorder.refuse_next_step(exc)
            return
        self.recorder.batch(ids)

    # Lightning asks for state_dict(), then calls on_save_checkpoint, whenever it saves a checkpoint.
    def state_dict(self) -> dict[str, Any]:
        if self.recorder is None or self.recorder.closed:
            return {}
        return {"recorder": self.recorder.state_dict()}  # flushes: the checkpoint's steps are on disk

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.recorder is not None and not self.recorder.closed:
            self.recorder.flush()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict.get("recorder")  # applied when on_train_start builds the recorder

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        try:  # flush what was recorded; the original error propagates
            self.close()
        except Exception:  # noqa: BLE001 - never mask the training error
            pass

    def close(self) -> None:
        """Closes the recorder (flushing the store and marking the final model) and a store the
        callback opened from a path."""
        self._spec.close(self.recorder, self.store)
