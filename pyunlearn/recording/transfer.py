"""Moving a pruned row from the device to the host without stopping training.

The recorder prunes on the device; only the row (values, gap-coded indices, scales) and the
step's status cross to the host. RowTransfer queues those copies on the current stream into
reused pinned buffers (`non_blocking=True`) and records a CUDA event after them; the writer
thread waits on that event, never the training thread. On the CPU (tests force the device path
there) the buffers are plain memory and the event is a no-op, so the same code runs.
"""
from __future__ import annotations

import threading

import torch

from ..errors import NonFiniteUpdateError
from ..kernels import Row
from ..kernels.checks import layer_label


class _NoEvent:
    """A CUDA event's stand-in on the CPU, where the copies have finished when they return."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Slot:
    """Host buffers for one row in flight, and the event that says when they hold it."""

    def __init__(self, row_length: int, layers: int, value_dtype: torch.dtype, device: torch.device):
        pinned = device.type == "cuda"  # page-locked: the only memory a copy can fill asynchronously
        self.index = torch.empty(row_length, dtype=torch.int32, pin_memory=pinned)
        self.values = torch.empty(row_length, dtype=value_dtype, pin_memory=pinned)
        self.scales = torch.empty(layers, dtype=torch.float32, pin_memory=pinned)
        self.status = torch.empty(1, dtype=torch.int64, pin_memory=pinned)
        self.event = torch.cuda.Event() if pinned else _NoEvent()


class RowTransfer:
    """Device rows to host rows through a pool of reused slots. The pool grows only while every
    slot is in flight; the recorder's bounded queue bounds it (at most (queue_size + 2) ·
    rows_per_handoff rows are held)."""

    def __init__(self, row_length: int, layers: int, value_dtype: torch.dtype, device: torch.device, names):
        self._shape = (row_length, layers, value_dtype, device)
        self._device, self._names = device, names
        self._free: list[_Slot] = []
        self._lock = threading.Lock()  # the writer thread gives slots back
        self.slots = 0  # how many exist (for tests and the documentation of host memory)

    def send(self, row: Row, status: torch.Tensor, step: int) -> "PendingRow":
        """Queues the copies of `row` and `status` (device tensors, as DevicePruner returns them)
        on the current stream; returns at once."""
        with self._lock:
            slot = self._free.pop() if self._free else None
        if slot is None:
            slot = _Slot(*self._shape)
            self.slots += 1
        slot.index.copy_(row.index.view(torch.int32), non_blocking=True)
        slot.values.copy_(row.values, non_blocking=True)
        slot.scales.copy_(row.scales, non_blocking=True)
        slot.status.copy_(status.reshape(1), non_blocking=True)
        if self._device.type == "cuda":
            slot.event.record(torch.cuda.current_stream(self._device))
        return PendingRow(self, slot, step)

    def _give_back(self, slot: _Slot) -> None:
        with self._lock:
            self._free.append(slot)


class PendingRow:
    """A row on its way to the host: the writer thread calls wait(), appends the row (the store
    copies it), then release()."""

    __slots__ = ("_transfer", "_slot", "step")

    def __init__(self, transfer: RowTransfer, slot: _Slot, step: int):
        self._transfer, self._slot, self.step = transfer, slot, step

    def wait(self) -> Row:
        """The row, once its copies are done; NonFiniteUpdateError if the step's update held NaN
        or Inf (then the device left the snapshot as it was)."""
        slot = self._slot
        slot.event.synchronize()
        bad = int(slot.status[0])
        if bad >= 0:
            raise NonFiniteUpdateError(
                f"step {self.step}: the update of {layer_label('after', bad, self._transfer._names)} holds NaN "
                "or Inf; nothing from this step on was recorded (on a device the check runs in the background, so "
                "training may have gone on for a few steps before this was raised)")
        return Row(slot.index.view(torch.uint32), slot.values, slot.scales)

    def release(self) -> None:
        self._transfer._give_back(self._slot)
