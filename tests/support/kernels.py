"""Helpers of the kernel tests (and of the recording and forgetting tests that compare with the
kernels): the native module, its tuning knobs, bit-for-bit comparisons, the native CPU kernels
on copies as the expectation of the device paths, rows that overlap, corrupted rows with known
verdicts, and the layer that misleads the pruning sampler."""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch

from pyunlearn.kernels import backends, ops
from pyunlearn.kernels.row import Row

ROOT = Path(__file__).resolve().parents[2]


def native_module():
    """pyunlearn.kernels._native, or None where it is not built."""
    try:
        from pyunlearn.kernels import _native
    except ImportError:  # pragma: no cover - the build is part of the test command
        return None
    return _native


def cuda_build_helpers():
    """csrc/cuda/build.py (the nvcc flags setup.py uses), loaded by path."""
    spec = importlib.util.spec_from_file_location("pyunlearn_cuda_build", ROOT / "csrc" / "cuda" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- comparisons ---------------------------------------------------------------------------------

def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def assert_same_bits(xs, ys, what="tensor"):
    assert len(xs) == len(ys), f"{what}: {len(xs)} vs {len(ys)}"
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert same_bits(x, y), f"{what}[{i}] differs: {x} vs {y}"


def stack_rows(rows):
    return ops.Row(*(torch.stack(field) for field in zip(*rows)))


# ---- the native module's tuning (private knobs of the extension: no public API sets them) ---------

@contextlib.contextmanager
def prune_tuning(native, small_layer_limit, serial_below=0):
    saved = native._prune_tuning()
    native._set_prune_tuning(small_layer_limit, serial_below)
    try:
        yield
    finally:
        native._set_prune_tuning(*saved)


# ---- the kernels on copies -----------------------------------------------------------------------

def prune_both(before, after, k, value_dtype, refresh=True):
    """Runs native and reference on copies; returns (native row, reference row, native before,
    reference before)."""
    native_before = [b.clone() for b in before]
    reference_before = [b.clone() for b in before]
    native_row = ops.prune_topk(native_before, after, k, value_dtype, refresh)
    reference_row = ops.prune_topk_reference(reference_before, after, k, value_dtype, refresh)
    return native_row, reference_row, native_before, reference_before


def native_prune(native, before, after, k, value_dtype, refresh=True):
    """The native CPU kernel on copies: (row, before afterwards)."""
    before = [b.clone() for b in before]
    dtype = torch.float16 if value_dtype == "float16" else torch.float32
    with backends.cpu_backend(backends.CpuNative(native)):
        row = ops.prune_topk(before, [a.contiguous() for a in after], list(k), dtype, refresh)
    return row, before


def native_subtract(native, params, rows, k, alpha=1.0):
    """The native CPU subtraction on copies of `params`: (verdict, params afterwards)."""
    index, values, scales = (f if f.dim() == 2 else f[None] for f in rows)
    params = [p.clone() for p in params]
    verdict = native.subtract_sparse([p.numpy() for p in params], list(k), index.contiguous().numpy(),
                                     values.contiguous().numpy(), scales.contiguous().numpy(), alpha)
    return verdict, params


# ---- rows ----------------------------------------------------------------------------------------

def overlapping_rows(before, after, k, value_dtype, count, seed):
    """`count` rows pruned on the CPU from updates that overlap, so the order rows are applied in
    changes the rounding (as tests/kernels/test_subtract.py builds them)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        noisy = [a + torch.randn(a.shape, generator=gen) * float(a.abs().amax() + 1 if a.numel() else 1) * 1e-3
                 for a in after]
        rows.append(ops.prune_topk([b.clone() for b in before], noisy, k, value_dtype, refresh=False))
    return Row(*(torch.stack(f) for f in zip(*rows)))


def good_stack():
    """Four valid rows over layers of 10_000, 300 and 50_000 entries (segments over several chunks of
    2048 entries and blocks of 64 gaps)."""
    gen = torch.Generator().manual_seed(3)
    shapes, k = [10_000, 300, 50_000], [3000, 100, 6000]
    rows = [ops.prune_topk([torch.zeros(n) for n in shapes], [torch.randn(n, generator=gen) for n in shapes], k,
                           "float32", refresh=False) for _ in range(4)]
    return shapes, k, Row(*(torch.stack(f) for f in zip(*rows)))


def crafted_corruptions(k):
    """(name, [(row, entry, new gap)]) with known verdicts, the CPU's 64-gap blocks in mind."""
    l2 = k[0] + k[1]  # first entry of layer 2
    return [
        ("zero-gap", [(0, 5, 0)]),
        ("past-end", [(0, k[0] - 1, 60_000)]),
        ("zero-after-overflow-same-block", [(1, l2 + 130, 2**31), (1, l2 + 140, 0)]),  # CPU: "repeats"
        ("overflow-block-before-zero", [(1, l2 + 60, 2**31), (1, l2 + 200, 0)]),  # CPU: "past end"
        ("zero-block-before-overflow", [(2, l2 + 60, 0), (2, l2 + 3000, 2**31)]),
        ("max-gap", [(3, k[0], 2**32 - 1)]),
        ("later-chunk", [(0, l2 + 5000, 50_000)]),
        ("lowest-row-wins", [(3, 0, 0), (2, l2 + 10, 0), (2, k[0] + 3, 0)]),
        ("lowest-layer-wins", [(1, l2 + 1, 0), (1, k[0] + 50, 400)]),
    ]


# ---- a layer the pruning sampler is wrong about --------------------------------------------------

def mix64(x: int) -> int:
    """csrc/cpu/prune.cpp's scramble of sample positions (the CUDA twin uses the same),
    replicated to build a layer the sampler is wrong about."""
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def misleading_layer(n: int, groups: int):
    """A layer whose update is 1 exactly where the kernels' position sampler looks (16 entries
    in each of `groups` groups, placed by mix64) and 0 elsewhere: the sampled floor then admits
    fewer entries than k, so the kernel must fall back to an exact pass."""
    delta = torch.zeros(n)
    for g in range(groups):
        start = g * n // groups
        room = (g + 1) * n // groups - start - 16
        if room > 0:
            start += mix64(g) % room
        delta[start : min(n, start + 16)] = 1.0
    return delta
