"""Pure-torch reference kernels: the oracle the native ones are tested against, and the
fallback where the extension is missing. Same signatures, same output bits; slow on purpose
(plain per-layer torch ops, nothing clever).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import checks
from .row import Row


def fp16_scale(max_abs: float) -> float:
    """The power of two that puts max_abs in [2^14, 2^15) (see csrc/common.h)."""
    if max_abs == 0.0:
        return 1.0
    exponent = math.frexp(max_abs)[1] - 1 - 14
    return 2.0 ** max(exponent, -126)


def prune_topk(before, after, k, value_dtype="float16", refresh=True, *, names=None) -> Row:
    before, after, k, value_dtype, names = checks.check_prune_args(before, after, k, value_dtype, refresh, names)

    deltas = []
    for i, (b, a) in enumerate(zip(before, after)):
        d = (a - b).reshape(-1)
        if not bool(torch.isfinite(d).all()):
            raise checks.non_finite_update(i, names)
        deltas.append(d)

    index, values, scales = [], [], []
    for d, ki in zip(deltas, k):
        magnitude = d.abs()
        # A stable descending sort keeps equal magnitudes in index order: ties go to the lower index.
        chosen = torch.sort(magnitude, descending=True, stable=True).indices[:ki]
        chosen = torch.sort(chosen).values
        chosen_delta = d[chosen]
        scale = 1.0
        if value_dtype == torch.float16:
            scale = fp16_scale(float(magnitude.max())) if ki > 0 else 1.0
            chosen_delta = (chosen_delta / scale).to(torch.float16)
        index.append(torch.diff(chosen, prepend=torch.tensor([-1])).to(torch.uint32))
        values.append(chosen_delta)
        scales.append(scale)
    if refresh:
        with torch.no_grad():
            for b, a in zip(before, after):
                b.copy_(a)
    return Row(
        torch.cat(index) if index else torch.empty(0, dtype=torch.uint32),
        torch.cat(values) if values else torch.empty(0, dtype=value_dtype),
        torch.tensor(scales, dtype=torch.float32),
    )


def decode_indices(gaps: torch.Tensor) -> torch.Tensor:
    """Gap-encoded uint32 indices of one layer segment → int64 positions."""
    return gaps.to(torch.int64).cumsum(0) - 1


def subtract_sparse(params, rows, k, alpha=1.0, *, names=None, steps=None) -> None:
    params, (index, values, scales), k, alpha, names, steps = checks.check_subtract_args(
        params, rows, k, alpha, names, steps)
    offsets = [0]
    for ki in k:
        offsets.append(offsets[-1] + ki)

    # Decode and check every row before touching a parameter.
    decoded = []
    for s in range(index.shape[0]):
        per_layer = []
        for i, p in enumerate(params):
            gaps = index[s, offsets[i] : offsets[i + 1]]
            positions = decode_indices(gaps)
            if gaps.numel() and (bool((gaps == 0).any()) or int(positions[-1]) >= p.numel()):
                raise checks.bad_stored_row(s, i, checks.first_fault(gaps, positions, p.numel()), names, steps)
            per_layer.append(positions)
        decoded.append(per_layer)

    # Canonical order: rows sorted by their bytes, as the native kernel does.
    def row_bytes(s):
        return (index[s].numpy().tobytes(), values[s].numpy().tobytes(), scales[s].numpy().tobytes())

    alpha32 = torch.tensor(alpha, dtype=torch.float32)
    with torch.no_grad():
        for s in sorted(range(index.shape[0]), key=row_bytes):
            for i, p in enumerate(params):
                if k[i] == 0:
                    continue
                delta = values[s, offsets[i] : offsets[i + 1]].to(torch.float32) * scales[s, i]
                flat = p.view(-1)
                flat[decoded[s][i]] -= alpha32 * delta


# ---- xh128: the fingerprint hash (csrc/fingerprint.h defines it; this is its numpy twin) ----

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_SCRAMBLE_FACTOR = 0x9E3779B1
_STRIPES_PER_BLOCK = 2**20 // 64
_BLOCKS_AT_ONCE = 8  # bounds the temporaries at a few tens of MB


def _mix64(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


_KEYS = [_mix64(((j + 1) * _GOLDEN) & _M64) for j in range(48)]


def xh128(buffers) -> bytes:
    """The 16-byte xh128 digest of the buffers' bytes, concatenated: the reference for the
    native `_native.fingerprint` (same bits) and the fallback where it is missing."""
    views = [np.frombuffer(memoryview(b).cast("B"), dtype=np.uint8) for b in buffers]
    data = np.concatenate(views) if views else np.empty(0, dtype=np.uint8)
    total = data.size
    stripes = -(-total // 64)
    padded = np.zeros(stripes * 64, dtype=np.uint8)
    padded[:total] = data
    words = padded.view("<u8").reshape(stripes, 8)
    keys = np.array(_KEYS, dtype=np.uint64)
    stripe_keys = keys[np.arange(16)[:, None] + np.arange(8)[None, :]]  # [stripe in period, lane]
    scramble_keys = keys[24:32]
    swap = [1, 0, 3, 2, 5, 4, 7, 6]  # lane l's word also goes into lane l ^ 1
    blocks = -(-stripes // _STRIPES_PER_BLOCK)
    h1, h2 = _KEYS[40], _KEYS[41]
    for first in range(0, blocks, _BLOCKS_AT_ONCE):
        count = min(_BLOCKS_AT_ONCE, blocks - first)
        begin = first * _STRIPES_PER_BLOCK
        w = words[begin : begin + count * _STRIPES_PER_BLOCK]
        real = w.shape[0]  # stripes of the stream here; the rest is padding that adds nothing
        if real < count * _STRIPES_PER_BLOCK:
            w = np.concatenate([w, np.zeros((count * _STRIPES_PER_BLOCK - real, 8), dtype=np.uint64)])
        w = w.reshape(count, 1024, 16, 8)
        x = w ^ stripe_keys
        contribution = (x & np.uint64(0xFFFFFFFF)) * (x >> np.uint64(32)) + w[..., swap]
        contribution.reshape(-1, 8)[real:] = 0
        per_period = contribution.sum(axis=2, dtype=np.uint64)  # mod 2^64
        in_block = np.minimum(real - np.arange(count) * _STRIPES_PER_BLOCK, _STRIPES_PER_BLOCK)
        periods = -(-in_block // 16)
        acc = np.tile(keys[32:40], (count, 1))
        for p in range(int(periods.max())):
            a = acc + per_period[:, p]
            a = (a ^ (a >> np.uint64(47)) ^ scramble_keys) * np.uint64(_SCRAMBLE_FACTOR)
            acc = np.where((p < periods)[:, None], a, acc)
        for lanes in acc.tolist():
            for v in lanes:
                h1 = _mix64(h1 ^ v)
                h2 = _mix64((((h2 ^ (((v << 32) | (v >> 32)) & _M64)) + _GOLDEN) & _M64))
    a = _mix64(h1 ^ total)
    b = _mix64(h2 ^ a)
    return a.to_bytes(8, "big") + b.to_bytes(8, "big")
