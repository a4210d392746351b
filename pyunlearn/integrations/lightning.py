"""A PyTorch Lightning callback that records a LightningModule's training into an UpdateStore.

    store = pu.UpdateStore.create("updates.zarr", lit_module, keep=0.01)   # names as in lit_module
    trainer = lightning.Trainer(callbacks=[RecordUpdates(store)], ...)
    trainer.fit(lit_module, loader)                                         # batches: (ids, x, y)

Batch convention: a tuple or list whose first element holds the batch's int64 sample IDs, or
a dict with an "ids" entry; pass ids_of=callable(batch) -> IDs for anything else. Needs the
`lightning` package (pip install 'pyunlearn[lightning]'); single optimizer, one process (for
DDP use the plain recorder, which gathers IDs across ranks).

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
        self._pending_state: dict | None = None  # loaded from a checkpoint before the recorder exists

    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"RecordUpdates supports one optimizer, the module configures {len(trainer.optimizers)}")
        state, self._pending_state = self._pending_state, None
        # Lightning restored the checkpoint's model and optimizer before this hook, so the
        # state can be checked against them here.
        self.recorder = UpdateRecorder(pl_module, trainer.optimizers[0], self.store, state=state,
                                       **self.recorder_options)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.recorder.batch(self.ids_of(batch))

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
        if self.recorder is not None:
            self.recorder.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.recorder is not None:  # flush what was recorded; the original error propagates
            try:
                self.recorder.close()
            except Exception:  # noqa: BLE001 - never mask the training error
                pass
