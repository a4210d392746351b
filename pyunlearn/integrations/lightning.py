"""A PyTorch Lightning callback that records a LightningModule's training into an UpdateStore.

    store = pu.UpdateStore.create("updates.zarr", lit_module, keep=0.01)   # names as in lit_module
    trainer = lightning.Trainer(callbacks=[RecordUpdates(store)], ...)
    trainer.fit(lit_module, loader)                                         # batches: (ids, x, y)

Batch convention: a tuple or list whose first element holds the batch's int64 sample IDs, or
a dict with an "ids" entry; pass ids_of=callable(batch) -> IDs for anything else. Needs the
`lightning` package (pip install 'pyunlearn[lightning]'); single optimizer, one process (for
DDP use the plain recorder, which gathers IDs across ranks).
"""
from __future__ import annotations

from typing import Any, Callable

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("pyunlearn.integrations.lightning needs the lightning package: "
                      "pip install 'pyunlearn[lightning]'") from exc

from ..recorder import UpdateRecorder
from ..store import UpdateStore


def default_ids(batch: Any):
    if isinstance(batch, dict) and "ids" in batch:
        return batch["ids"]
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ValueError("cannot find the sample IDs in this batch: yield (ids, x, y) tuples, a dict with 'ids', "
                     "or pass RecordUpdates(store, ids_of=lambda batch: ...)")


class RecordUpdates(Callback):
    """Records every optimizer step of the LightningModule (see the module docstring)."""

    def __init__(self, store: UpdateStore, *, ids_of: Callable[[Any], Any] | None = None, **recorder_options):
        if not isinstance(store, UpdateStore):
            raise TypeError(f"store must be an UpdateStore, got {type(store).__name__}")
        self.store = store
        self.ids_of = ids_of or default_ids
        self.recorder_options = recorder_options
        self.recorder: UpdateRecorder | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"RecordUpdates supports one optimizer, the module configures {len(trainer.optimizers)}")
        self.recorder = UpdateRecorder(pl_module, trainer.optimizers[0], self.store, **self.recorder_options)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.recorder.batch(self.ids_of(batch))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.recorder is not None:
            self.recorder.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.recorder is not None:  # flush what was recorded; the original error propagates
            try:
                self.recorder.close()
            except Exception:  # noqa: BLE001 - never mask the training error
                pass
