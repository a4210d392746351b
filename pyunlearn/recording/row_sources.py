"""Where a recorded step's row comes from: the update against a snapshot (UpdateRows on the
CPU, DeviceUpdateRows on a device) or the optimizer family's vectors (GradientRows). Each call
returns (row, hyper-parameters or None) for one step."""
from __future__ import annotations

import torch

from .. import attribution
from ..kernels import ops
from ..kernels.ops import as_float32_work, kernel_ready
from .transfer import RowTransfer


class UpdateRows:
    """Update attribution: each step's Δθ against a float32 snapshot, pruned (refreshing the
    snapshot)."""

    def __init__(self, params, store, names):
        self._params, self._k, self._dtype, self._names = params, store.k, store.value_dtype, names
        self._snapshot = [p.detach().to(torch.float32).contiguous().clone() for p in params]
        # Parameters the kernel can read in place get a prepared pruner, over the parameters
        # themselves (not detached views: `param.data = ...` then moves their storage address,
        # which the pruner notices). Others (half precision, channels_last) are copied to
        # float32 each step and go through the checked call.
        self._pruner = ops.Pruner(self._snapshot, params, self._k, self._dtype, names=names) \
            if all(kernel_ready(p) for p in params) else None

    def __call__(self, step: int):
        if self._pruner is not None:
            return self._pruner(refresh=True), None
        live = [as_float32_work(p) for p in self._params]
        return ops.prune_topk(self._snapshot, live, self._k, self._dtype, refresh=True, names=self._names), None


class DeviceUpdateRows:
    """Update attribution on a device (and on the CPU where tests force the device path): the
    float32 snapshot and the pruning stay on the device (ops.DevicePruner: pyunlearn._native_cuda,
    or torch ops there); each step queues the pruning and the copy of its row to reused pinned
    host buffers, and hands the writer a PendingRow (pyunlearn._transfer) whose event the writer
    thread waits on. Nothing here waits for the device: a NaN or Inf update is reported by the
    writer, at a later step. Device memory added: the snapshot (4 bytes per trainable parameter),
    the row (8 or 6 bytes per kept entry), the pruning workspace, and, with the native kernels
    only, a float32 copy of each parameter that is not contiguous float32 (half precision)."""

    def __init__(self, params, store, names):
        self._params = params
        self._snapshot = [torch.empty(p.shape, dtype=torch.float32, device=p.device).copy_(p.detach())
                          for p in params]
        self._pruner = ops.DevicePruner(self._snapshot, self._snapshot, store.k, store.value_dtype, names=names)
        # The native kernels read float32 in place; the torch ones convert each layer as they go.
        self._work = None
        if self._pruner.kernels == "native" and not all(kernel_ready(p) for p in params):
            self._work = [None if kernel_ready(p) else torch.empty_like(s) for p, s in zip(params, self._snapshot)]
        self._transfer = RowTransfer(store.row_length, len(store.layers), self._pruner.row.values.dtype,
                                     self._pruner.device, names)

    def __call__(self, step: int):
        if self._work is None:
            live = [p.detach() for p in self._params]
        else:
            live = [p.detach() if w is None else w.copy_(p.detach()) for p, w in zip(self._params, self._work)]
        row, status = self._pruner(live, refresh=True)
        return self._transfer.send(row, status, step), None


class GradientRows:
    """Gradient attribution: the optimizer family's vectors for this step, pruned, and the
    step's hyper-parameters (pyunlearn.attribution)."""

    def __init__(self, family: attribution.OptimizerFamily, store, names):
        self._family, self._k, self._dtype, self._names = family, store.k, store.value_dtype, names
        self._zeros = [torch.zeros(layer.numel, dtype=torch.float32) for layer in store.layers]

    def __call__(self, step: int):
        vectors = self._family.vectors()
        row = ops.prune_topk(self._zeros, vectors, self._k, self._dtype, refresh=False, names=self._names)
        return row, self._family.hyper()
