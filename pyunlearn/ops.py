"""The kernels' Python face: argument checks, then the native CPU kernels or the torch reference.

    row = prune_topk(before, after, k)            # Δ = after − before, top-k per layer, one flat Row
    subtract_sparse(params, rows, k, alpha=1.0)    # params −= alpha · Δ for every stored row

The native path is used when pyunlearn._native imports; otherwise the reference runs (with one
warning). PYUNLEARN_REFERENCE=1 forces the reference. Both give the same bits.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Sequence

import torch
from torch.autograd.graph import increment_version

from . import _checks, _reference
from ._validate import ratio
from .row import Row

__all__ = ["Row", "prune_topk", "Pruner", "subtract_sparse", "k_for", "decode_row", "backend",
           "prune_topk_reference", "subtract_sparse_reference"]

prune_topk_reference = _reference.prune_topk
subtract_sparse_reference = _reference.subtract_sparse

_native_module = None
_native_checked = False


def _native():
    """The extension module, or None (with one warning) where it is missing or turned off."""
    global _native_module, _native_checked
    if os.environ.get("PYUNLEARN_REFERENCE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return None
    if not _native_checked:
        _native_checked = True
        try:
            from . import _native as module

            _native_module = module
        except ImportError as exc:
            warnings.warn(
                f"pyunlearn's native kernels are not built ({exc}); using the slow torch reference. "
                "Reinstall with `pip install -e .` and a C++ compiler to build them.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _native_module


def backend() -> str:
    """Which kernels run: 'native (<SIMD level>, <threads> threads)' or 'reference (...)'."""
    native = _native()
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
    lower index); with `refresh`, set before := after. Returns one flat Row (see pyunlearn.row).

    `before`/`after`: lists of contiguous float32 CPU tensors of equal sizes; `names`: optional
    layer names for error messages. value_dtype 'float16' stores Δ/scale with a power-of-two
    scale per layer (relative error ≤ 2^-11); 'float32' is lossless. A layer whose Δ holds NaN or
    Inf raises NonFiniteUpdateError naming it, and `before` is left unchanged.
    """
    native = _native()
    if native is None:
        return _reference.prune_topk(before, after, k, value_dtype, refresh, names=names)
    before, after, k, value_dtype, names = _checks.check_prune_args(before, after, k, value_dtype, refresh, names)
    return _prune_native(native, before, [b.detach().numpy() for b in before], [a.detach().numpy() for a in after],
                         k, value_dtype, refresh, names)


def _prune_native(native, before, before_views, after_views, k, value_dtype, refresh, names) -> Row:
    """The native call behind prune_topk, on checked arguments and numpy views."""
    row = Row(torch.empty(sum(k), dtype=torch.uint32), torch.empty(sum(k), dtype=value_dtype),
              torch.empty(len(k), dtype=torch.float32))
    bad = native.prune_topk(before_views, after_views, k, row.index.numpy(), row.values.numpy(),
                            row.scales.numpy(), bool(refresh))
    if bad >= 0:
        raise _checks.non_finite_update(bad, names)
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
        self._before, self._after, self._k, self._dtype, self._names = _checks.check_prune_args(
            before, after, k, value_dtype, True, names)
        # Storage addresses only: replacing a tensor's data (param.data = ...) moves them; an
        # in-place optimizer update does not.
        self._tensors = self._after + self._before
        self._layout = list(map(_data_ptr, self._tensors))
        native = _native()
        self._plan = None if native is None else native.PrunePlan(
            [b.detach().numpy() for b in self._before], [a.detach().numpy() for a in self._after], self._k,
            "float16" if self._dtype == torch.float16 else "float32")

    def __call__(self, refresh: bool = True) -> Row:
        if self._plan is None:
            return _reference.prune_topk(self._before, self._after, self._k, self._dtype, refresh, names=self._names)
        if list(map(_data_ptr, self._tensors)) != self._layout:
            self.__init__(*self._args[:4], names=self._args[4])
        out = self._plan.run(bool(refresh))
        if type(out) is int:
            raise _checks.non_finite_update(out, self._names)
        if refresh:
            increment_version(self._before)
        index, values, scales = out
        return Row(torch.from_numpy(index), torch.from_numpy(values), torch.from_numpy(scales))


def subtract_sparse(params, rows, k, alpha=1.0, *, names=None, steps=None) -> None:
    """params[i][idx] −= alpha · Δ for every stored row, in place.

    `rows`: a Row of one step (1-D) or a stack (2-D); `k`: the per-layer counts it was pruned
    with; `names` (layer names) and `steps` (the step number of each row) only label errors.
    Rows are applied in a canonical order (sorted by their bytes) and each parameter by one
    thread, so the result is bit-identical whatever the thread count or row order. A row whose
    indices repeat or run past a layer raises ValueError naming its step and layer, before
    anything is changed.
    """
    native = _native()
    if native is None:
        return _reference.subtract_sparse(params, rows, k, alpha, names=names, steps=steps)
    params, (index, values, scales), k, alpha, names, steps = _checks.check_subtract_args(
        params, rows, k, alpha, names, steps)
    bad = native.subtract_sparse(
        [p.detach().numpy() for p in params], k, index.numpy(), values.numpy(), scales.numpy(), alpha
    )
    if bad is not None:
        raise _checks.bad_stored_row(*bad, names, steps)
    # The kernel wrote through numpy, behind autograd's back: bump the version counters so a
    # graph that saved these tensors fails loudly instead of using stale values.
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
        out.append((_reference.decode_indices(gaps), delta))
        start += ki
    return out
