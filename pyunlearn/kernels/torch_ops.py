"""prune_topk and subtract_sparse in plain torch ops, on whatever device the tensors live on: the
device path where pyunlearn._native_cuda is not built. Same output bits as the native CPU kernels
(exact top-k by |Δ|, ties to the lower index, sorted gap-coded uint32 indices, float32 values or
float16 ones with the power-of-two scale); the tests run it on CPU tensors and compare bit for bit.

Unlike pyunlearn.kernels.reference (the oracle, written for clarity), this is written for the device:
pruning never waits for it (the status of a non-finite layer stays a device tensor, the snapshot
refresh is decided on the device), and no op needs uint32 arithmetic, which CUDA builds of torch
barely support: indices are computed in int64 and stored as int32 bits viewed as uint32.
"""
from __future__ import annotations

import torch

from . import checks
from .row import Row

_NON_FINITE_KEY = 0x7F800000  # |x| bit patterns at or above this are Inf or NaN
_LOW32 = 0xFFFFFFFF


def abs_keys(delta: torch.Tensor) -> torch.Tensor:
    """|Δ| as int64 keys that order like the magnitudes (non-negative floats order like their
    bits; -0.0 and 0.0 get the same key), as csrc/common.h's abs_key."""
    return delta.view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def fp16_scale(max_key: torch.Tensor) -> torch.Tensor:
    """The power-of-two scale of csrc/common.h's fp16_scale_for, from the largest key, on the device:
    2^(ilogb(max) − 14), the exponent clamped at −126; 1 for a zero maximum. ilogb of a normal float
    is its exponent field − 127; a denormal's is below −126 − 14, so it clamps like the CPU's."""
    exponent = ((max_key >> 23) - 127 - 14).clamp(min=-126)
    scale = ((exponent + 127) << 23).to(torch.int32).view(torch.float32)
    return torch.where(max_key == 0, torch.ones_like(scale), scale)


def gaps_to_positions(gaps: torch.Tensor) -> torch.Tensor:
    """Gap-coded indices (uint32, or their int32 bits) → int64 positions, along the last dim."""
    return (gaps.view(torch.int32).to(torch.int64) & _LOW32).cumsum(-1) - 1


class Workspace:
    """Per-device scratch reused across calls: the reversed positions that make every key unique
    (so torch.topk, whose tie order is unspecified, selects exactly the CPU's entries), grown to
    the largest layer seen."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reversed = torch.empty(0, dtype=torch.int64, device=device)

    def reversed_positions(self, n: int) -> torch.Tensor:
        if self._reversed.numel() < n:
            self._reversed = _LOW32 - torch.arange(n, dtype=torch.int64, device=self.device)
        return self._reversed[:n]

    @staticmethod
    def bytes_for(numels) -> int:
        """Device bytes prune() holds at its peak beyond its inputs and the row, for these layers:
        the reversed positions (8 per entry of the largest layer) and, for the layer being pruned,
        Δ (4) and its keys (8); torch.topk's own scratch comes on top."""
        largest = max(numels, default=0)
        return 20 * largest


def prune(before, after, k, value_dtype: torch.dtype, refresh: bool, out: Row, workspace: Workspace) -> torch.Tensor:
    """Per layer Δ = float32(after[i]) − before[i]; the k[i] largest |Δ| into `out` (a Row of
    preallocated tensors on the device: index int32 bits viewed as uint32, values, scales). Returns
    the status as a 0-d int64 tensor on the device: −1, or the lowest layer whose Δ holds NaN or Inf
    (then `before` is unchanged and `out` is garbage). With `refresh`, before := after when the
    status is −1, decided on the device. Arguments are checked by the caller (pyunlearn.ops)."""
    index = out.index.view(torch.int32)
    device = index.device
    max_keys = []
    start = 0
    for i, (b, a, ki) in enumerate(zip(before, after, k)):
        n = b.numel()
        if n == 0:
            max_keys.append(torch.zeros((), dtype=torch.int64, device=device))
            out.scales[i] = 1.0
            continue
        delta = a.reshape(-1).to(torch.float32) - b.reshape(-1)
        keys = abs_keys(delta)
        max_key = keys.max()
        max_keys.append(max_key)
        if ki == 0:
            out.scales[i] = 1.0
            continue
        if ki == n:
            chosen = torch.arange(n, dtype=torch.int64, device=device)
        else:
            # Key · 2^32 + (2^32 − 1 − position): unique, and larger for the lower position among
            # equal magnitudes, so the k largest are the CPU's exact top k with its tie rule.
            keys.mul_(1 << 32).add_(workspace.reversed_positions(n))
            top = torch.topk(keys, ki, sorted=False).values
            chosen = torch.sort(_LOW32 - (top & _LOW32)).values
        values = delta[chosen]
        if value_dtype == torch.float16:
            scale = fp16_scale(max_key)
            out.values[start : start + ki] = (values / scale).to(torch.float16)
            out.scales[i] = scale
        else:
            out.values[start : start + ki] = values
            out.scales[i] = 1.0
        gaps = torch.diff(chosen, prepend=chosen.new_full((1,), -1))
        # Gaps are < 2^32; those of 2^31 and more are stored as the int32 with the same bits.
        index[start : start + ki] = torch.where(gaps >= 1 << 31, gaps - (1 << 32), gaps).to(torch.int32)
        start += ki
    if not max_keys:
        return torch.full((), -1, dtype=torch.int64, device=device)
    bad = torch.stack(max_keys) >= _NON_FINITE_KEY
    status = torch.where(bad.any(), bad.to(torch.int64).argmax(), torch.full((), -1, dtype=torch.int64, device=device))
    if refresh:
        finite = ~bad.any()
        with torch.no_grad():
            for b, a in zip(before, after):
                if b.numel():
                    b.copy_(torch.where(finite, a.reshape(b.shape).to(torch.float32), b))
    return status


def first_bad_row(index, k, numels):
    """(row, layer, reason) of the first stored row whose indices repeat or run past a layer (the
    lowest row, then the lowest layer; the reason the CPU kernel gives), or None. On the host:
    `index` is a 2-D uint32 CPU tensor."""
    offsets, start = [], 0
    for ki in k:
        offsets.append(start)
        start += ki
    worst = None
    for i, (ki, n) in enumerate(zip(k, numels)):
        if ki == 0:
            continue
        gaps = index[:, offsets[i] : offsets[i] + ki].to(torch.int64)
        positions = gaps.cumsum(1) - 1
        bad = (gaps == 0).any(1) | (positions[:, -1] >= n)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            if worst is None or row < worst[0]:
                worst = (row, i, checks.first_fault(gaps[row], positions[row], n))
    return worst


def canonical_order(index, values, scales) -> list[int]:
    """Rows sorted by their bytes (index, then values, then scales), the order every kernel
    applies them in; on the host."""
    keys = [(index[s].numpy().tobytes(), values[s].numpy().tobytes(), scales[s].numpy().tobytes())
            for s in range(index.shape[0])]
    return sorted(range(len(keys)), key=keys.__getitem__)


def subtract(params, index, values, scales, k, alpha: float) -> None:
    """params[i][idx] −= alpha · (value · scale) for every row, rows in the order given (the caller
    passes them in canonical order, already checked), each product rounded to float32 as the CPU
    kernel does. `index`/`values`/`scales`: 2-D, on the params' device."""
    alpha32 = torch.tensor(alpha, dtype=torch.float32, device=index.device)
    positions, start = [], 0
    for ki in k:  # each layer's gaps start over
        positions.append(gaps_to_positions(index[:, start : start + ki]))
        start += ki
    with torch.no_grad():
        for s in range(index.shape[0]):
            start = 0
            for i, (p, ki) in enumerate(zip(params, k)):
                if ki:
                    where = positions[i][s]
                    delta = values[s, start : start + ki].to(torch.float32) * scales[s, i]
                    flat = p.view(-1)
                    flat[where] = flat[where] - alpha32 * delta
                start += ki
