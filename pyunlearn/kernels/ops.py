"""The kernels' Python face: argument checks, then the kernels of the tensors' device.

    row = prune_topk(before, after, k)            # Δ = after − before, top-k per layer, one flat Row
    subtract_sparse(params, rows, k, alpha=1.0)    # params −= alpha · Δ for every stored row
    supports(device)                               # which kernels run there: native or torch

Which kernels run is the device's backend's choice (pyunlearn.kernels.backends): native ones
where built, torch ops otherwise; every path gives the same bits.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.autograd.graph import increment_version

from .._validate import ratio
from . import checks, reference, torch_ops
from .backends import DeviceKernels, backend_for, native_cpu_module, native_cuda_module
from .row import Row

__all__ = ["Row", "prune_topk", "Pruner", "DevicePruner", "subtract_sparse", "k_for", "decode_row", "backend",
           "supports", "Support", "prune_topk_reference", "subtract_sparse_reference", "kernel_ready",
           "as_float32_work"]

prune_topk_reference = reference.prune_topk
subtract_sparse_reference = reference.subtract_sparse


@dataclass(frozen=True)
class Support:
    """What pyunlearn can do on a device (ops.supports)."""

    device: torch.device
    kernels: str  # "native": pyunlearn's own kernels; "torch": torch ops (same bits, slower)
    available: bool  # whether torch can use the device here
    detail: str  # which module, or why not


def supports(device) -> Support:
    """Which kernels prune and subtract on `device` ('cpu', 'cuda', 'cuda:1', a torch.device):
    native ones (pyunlearn.kernels._native on the CPU, pyunlearn.kernels._native_cuda on a GPU) or
    torch ops. ValueError for a device type pyunlearn does not run on."""
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"device must name a torch device ('cpu', 'cuda', 'cuda:0'), got {device!r}") from exc
    if device.type == "cpu":
        native = native_cpu_module() is not None
        return Support(device, "native" if native else "torch", True,
                       ("pyunlearn.kernels._native, " if native else "") + backend())
    chosen = backend_for(device)  # ValueError for anything but the CPU and CUDA
    available = torch.cuda.is_available()
    if chosen.module is None:
        return Support(device, "torch", available,
                       "per-layer torch.topk on the device: pyunlearn was built without its CUDA kernels "
                       "(PYUNLEARN_CUDA=1 pip install -e . builds them where nvcc is installed)")
    return Support(device, "native", available,
                   f"pyunlearn.kernels._native_cuda (CUDA runtime {chosen.module.runtime_version()})")


def backend() -> str:
    """Which kernels run: 'native (<SIMD level>, <threads> threads)' or 'reference (...)'."""
    native = native_cpu_module()
    if native is None:
        why = "PYUNLEARN_REFERENCE is set" if os.environ.get("PYUNLEARN_REFERENCE") else "extension not built"
        return f"reference (torch; {why})"
    return f"native ({native.simd_level()}, {native.max_threads()} threads)"


def k_for(numels: Sequence[int], keep: float) -> list[int]:
    """Entries kept per layer at ratio `keep`: ceil(keep · numel), at least 1 (0 for an empty layer)."""
    keep = ratio("keep", keep)
    return [min(n, max(1, math.ceil(keep * n))) for n in numels]


def prune_topk(before, after, k, value_dtype="float16", refresh=True, *, names=None) -> Row:
    """Per layer i: Δ = after[i] − before[i]; keep the k[i] entries of largest |Δ| (ties to the
    lower index); with `refresh`, set before := after. Returns one flat Row (see pyunlearn.kernels.row).

    `before`/`after`: lists of contiguous float32 tensors of equal sizes, all on one device (on a
    GPU the Row comes back on it); `names`: optional layer names for error messages. value_dtype 'float16' stores Δ/scale with a power-of-two
    scale per layer (relative error ≤ 2^-11); 'float32' is lossless. A layer whose Δ holds NaN or
    Inf raises NonFiniteUpdateError naming it, and `before` is left unchanged.
    """
    checked = checks.check_prune_args(before, after, k, value_dtype, refresh, names)
    device = checked[1][0].device if checked[1] else torch.device("cpu")
    chosen = backend_for(device)
    if chosen.device_path:
        pruner = DevicePruner(before, after, k, value_dtype, names=names)
        row, status = pruner(after, refresh=refresh)
        bad = int(status)  # waits for the device: this call reports a non-finite layer at once
        if bad >= 0:
            raise checks.non_finite_update(bad, names)
        return row
    if chosen.module is None:
        return reference.prune_topk(before, after, k, value_dtype, refresh, names=names)
    before, after, k, value_dtype, names = checked
    return _prune_native(chosen.module, before, [b.detach().numpy() for b in before], [a.detach().numpy() for a in after],
                         k, value_dtype, refresh, names)


def _prune_native(native, before, before_views, after_views, k, value_dtype, refresh, names) -> Row:
    """The native call behind prune_topk, on checked arguments and numpy views."""
    row = Row(torch.empty(sum(k), dtype=torch.uint32), torch.empty(sum(k), dtype=value_dtype),
              torch.empty(len(k), dtype=torch.float32))
    bad = native.prune_topk(before_views, after_views, k, row.index.numpy(), row.values.numpy(),
                            row.scales.numpy(), bool(refresh))
    if bad >= 0:
        raise checks.non_finite_update(bad, names)
    if refresh:
        increment_version(before)
    return row


_data_ptr = torch.Tensor.data_ptr


class Pruner:
    """prune_topk over a fixed set of tensors, checked once: for a caller that prunes the same
    parameters every optimizer step (the recorder). The arguments are checked and handed to a
    native plan at construction, so a call costs the kernel plus a few microseconds: it only
    verifies that the tensors still sit where they did (same storage; it rebuilds itself if
    not), runs the plan and wraps the new row's arrays as tensors."""

    def __init__(self, before, after, k, value_dtype="float16", *, names=None):
        self._args = (before, after, k, value_dtype, names)
        self._before, self._after, self._k, self._dtype, self._names = checks.check_prune_args(
            before, after, k, value_dtype, True, names)
        # Storage addresses only: replacing a tensor's data (param.data = ...) moves them; an
        # in-place optimizer update does not.
        self._tensors = self._after + self._before
        self._layout = list(map(_data_ptr, self._tensors))
        native = backend_for("cpu").module
        self._plan = None if native is None else native.PrunePlan(
            [b.detach().numpy() for b in self._before], [a.detach().numpy() for a in self._after], self._k,
            "float16" if self._dtype == torch.float16 else "float32")

    def __call__(self, refresh: bool = True) -> Row:
        if self._plan is None:
            return reference.prune_topk(self._before, self._after, self._k, self._dtype, refresh, names=self._names)
        if list(map(_data_ptr, self._tensors)) != self._layout:
            self.__init__(*self._args[:4], names=self._args[4])
        out = self._plan.run(bool(refresh))
        if type(out) is int:
            raise checks.non_finite_update(out, self._names)
        if refresh:
            increment_version(self._before)
        index, values, scales = out
        return Row(torch.from_numpy(index), torch.from_numpy(values), torch.from_numpy(scales))


class DevicePruner:
    """prune_topk on a device for a caller that prunes the same layers every step (the recorder),
    checked once. The row, status and workspace live on the device and are reused: a call queues
    the work on the current stream and returns (row, status) as device tensors without waiting
    (status: int64, −1 or the first layer whose Δ holds NaN or Inf; then `before` is unchanged).
    The row is overwritten by the next call, in stream order: copy it out before that.

    kernels: 'native' (pyunlearn.kernels._native_cuda) or 'torch' (pyunlearn.kernels.torch_ops);
    None picks the device's backend's (for CPU tensors, which only tests give it: see
    pyunlearn.kernels.backends.cpu_backend)."""

    def __init__(self, before, after, k, value_dtype="float16", *, names=None, kernels=None, module=None):
        self._before, after, self._k, self._dtype, self._names = checks.check_prune_args(
            before, after, k, value_dtype, True, names)
        self.device = after[0].device if after else torch.device("cpu")
        if kernels is None:
            chosen = backend_for(self.device)
            kernels, module = chosen.kernels, chosen.module
        if kernels not in ("native", "torch"):
            raise ValueError(f"kernels must be 'native', 'torch' or None, got {kernels!r}")
        total, layers = sum(self._k), len(self._k)
        self.row = Row(torch.empty(total, dtype=torch.int32, device=self.device).view(torch.uint32),
                       torch.empty(total, dtype=self._dtype, device=self.device),
                       torch.empty(layers, dtype=torch.float32, device=self.device))
        self._native = None
        if kernels == "native":
            self._native = module if module is not None else native_cuda_module()
            if self._native is None:
                raise ValueError("kernels='native' on a GPU needs pyunlearn.kernels._native_cuda, which was not built: "
                                 "reinstall with PYUNLEARN_CUDA=1 pip install -e . (nvcc needed), or use kernels='torch'")
            self._numels = [b.numel() for b in self._before]
            size = self._native.prune_workspace_size(self._numels, self._k)
            self._workspace = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            self._workspace_size = size
            self._status = torch.empty(1, dtype=torch.int64, device=self.device)
            self._before_ptrs = [b.data_ptr() for b in self._before]
            self._out = (self.row.index.data_ptr(), self.row.values.data_ptr(), self.row.scales.data_ptr())
            self._dtype_name = "float16" if self._dtype == torch.float16 else "float32"
        else:
            self._workspace = torch_ops.Workspace(self.device)
        self._last_stream = None

    @property
    def kernels(self) -> str:
        return "torch" if self._native is None else "native"

    def __call__(self, after, refresh: bool = True) -> tuple[Row, torch.Tensor]:
        """Prunes `after` (float32 tensors of the sizes and device given at construction) against
        the snapshot; returns (row, status) on the device, without waiting for it."""
        if self.device.type == "cuda":
            # The buffers are reused in stream order: a call on another stream than the last one
            # first waits (on the device) for the work queued there, e.g. the copy of the last row.
            stream = torch.cuda.current_stream(self.device)
            if self._last_stream is not None and stream.cuda_stream != self._last_stream.cuda_stream:
                stream.wait_stream(self._last_stream)
            self._last_stream = stream
        if self._native is None:
            status = torch_ops.prune(self._before, after, self._k, self._dtype, refresh, self.row, self._workspace)
        else:
            after = [a if a.is_contiguous() else a.contiguous() for a in after]
            stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
            self._native.prune_topk(self._before_ptrs, [a.data_ptr() for a in after], self._numels, self._k,
                                    *self._out, self._dtype_name, bool(refresh), stream,
                                    status=self._status.data_ptr(), workspace=self._workspace.data_ptr(),
                                    workspace_size=self._workspace_size)
            status = self._status[0]
        if refresh:
            increment_version(self._before)
        return self.row, status


def subtract_sparse(params, rows, k, alpha=1.0, *, names=None, steps=None) -> None:
    """params[i][idx] −= alpha · Δ for every stored row, in place.

    `rows`: a Row of one step (1-D) or a stack (2-D), on the CPU or on the parameters' device
    (rows read from a store are on the CPU; on a GPU they are copied over); `k`: the per-layer
    counts it was pruned with; `names` (layer names) and `steps` (the step number of each row) only label errors.
    Rows are applied in a canonical order (sorted by their bytes) and each parameter by one
    thread, so the result is bit-identical whatever the thread count or row order. A row whose
    indices repeat or run past a layer raises ValueError naming its step and layer, before
    anything is changed.
    """
    checked = checks.check_subtract_args(params, rows, k, alpha, names, steps)
    device = checked[0][0].device if checked[0] else torch.device("cpu")
    chosen = backend_for(device)
    if chosen.device_path:
        return _subtract_on_device(chosen, *checked)
    native = chosen.module
    if native is None:
        return reference.subtract_sparse(params, rows, k, alpha, names=names, steps=steps)
    params, (index, values, scales), k, alpha, names, steps = checked
    bad = native.subtract_sparse(
        [p.detach().numpy() for p in params], k, index.numpy(), values.numpy(), scales.numpy(), alpha
    )
    if bad is not None:
        raise checks.bad_stored_row(*bad, names, steps)
    # The kernel wrote through numpy, behind autograd's back: bump the version counters so a
    # graph that saved these tensors fails loudly instead of using stale values.
    for p in params:
        increment_version(p)


def _subtract_on_device(chosen: DeviceKernels, params, rows, k, alpha, names, steps) -> None:
    """subtract_sparse for parameters on a device: the native CUDA kernel (which checks and orders
    the rows itself) or the torch kernels, which check the rows and put them in canonical order on
    the host first. Either way a bad row is refused before anything changes. Waits for the device
    once (the verdict on the rows must reach the host before anything is written)."""
    index, values, scales = rows
    device = params[0].device if params else torch.device("cpu")
    module = chosen.module
    if module is not None:
        index, values, scales = (t.to(device) for t in (index.view(torch.int32), values, scales))
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        bad = module.subtract_sparse(
            [p.data_ptr() for p in params], [p.numel() for p in params], k, index.data_ptr(), values.data_ptr(),
            scales.data_ptr(), index.shape[0], "float16" if values.dtype == torch.float16 else "float32", alpha,
            stream)
        if bad is not None:
            raise checks.bad_stored_row(*bad, names, steps)
    else:
        host = [t.cpu() for t in (index, values, scales)]  # the check and the order need the bytes here
        bad = torch_ops.first_bad_row(host[0], k, [p.numel() for p in params])
        if bad is not None:
            raise checks.bad_stored_row(*bad, names, steps)
        order = torch.tensor(torch_ops.canonical_order(*host), dtype=torch.int64)
        index, values, scales = (t[order].to(device) for t in (host[0].view(torch.int32), host[1], host[2]))
        torch_ops.subtract(params, index, values, scales, k, alpha)
    for p in params:
        increment_version(p)


def decode_row(row: Row, k: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One row → per layer (int64 positions, float32 Δ); for tests, tools and the reference."""
    if row.index.dim() != 1:
        raise ValueError("decode_row takes one row (1-D fields); index a stack first")
    out, start = [], 0
    for i, ki in enumerate(k):
        gaps = row.index[start : start + ki]
        delta = row.values[start : start + ki].to(torch.float32) * row.scales[i]
        out.append((torch_ops.gaps_to_positions(gaps), delta))
        start += ki
    return out


def kernel_ready(param: torch.Tensor) -> bool:
    """Whether the kernels can read and write `param` in place: contiguous float32 (on its device)."""
    return param.dtype == torch.float32 and param.is_contiguous()


def as_float32_work(param: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels can use for `param`, on its device: itself when it is kernel-ready
    (so kernels work in place), a contiguous float32 copy otherwise."""
    p = param.detach()
    return p if kernel_ready(p) else p.to(dtype=torch.float32, memory_format=torch.contiguous_format)
