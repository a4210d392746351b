"""subtract_sparse: native against the torch reference, determinism, exactness, errors."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyunlearn.kernels import ops
from pyunlearn.kernels.row import Row

from tests.support.kernels import assert_same_bits, stack_rows
from tests.support.strategies import step


@contextlib.contextmanager
def subtract_tuning(native, serial_below=None, tile_positions=None, simd=None):
    """Sets the native subtract's thresholds (None: keep) for the duration of a block."""
    saved = native._subtract_tuning()
    native._set_subtract_tuning(*(s if v is None else v for s, v in zip(saved, (serial_below, tile_positions, simd))))
    try:
        yield
    finally:
        native._set_subtract_tuning(*saved)


# The kernel's paths: the built-in settings; every call on one thread; every call on all
# threads with tiles of 64 positions (so small layers span many tiles and tasks); the same
# with the portable loops instead of AVX-512; tiles of one position.
SUBTRACT_PATHS = {
    "default": {},
    "serial": {"serial_below": 2**62},
    "parallel-small-tiles": {"serial_below": 0, "tile_positions": 64},
    "portable": {"serial_below": 0, "tile_positions": 64, "simd": False},
    "tile-1": {"serial_below": 0, "tile_positions": 1},
}


@pytest.fixture(params=list(SUBTRACT_PATHS))
def subtract_path(request, native):
    with subtract_tuning(native, **SUBTRACT_PATHS[request.param]):
        yield request.param


def _rows_for(before, after, k, value_dtype, count, seed):
    """`count` rows pruned from updates that overlap (so the order rows are applied in
    changes float rounding and is really tested)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        noisy = [a + torch.randn(a.shape, generator=gen) * float(a.abs().max() + 1) * 1e-3 for a in after]
        rows.append(ops.prune_topk([b.clone() for b in before], noisy, k, value_dtype, refresh=False))
    return stack_rows(rows)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=step(max_layers=4, max_numel=2000), value_dtype=st.sampled_from(["float16", "float32"]),
       count=st.integers(1, 6), alpha=st.sampled_from([1.0, -1.0, 0.5, 0.1]), seed=st.integers(0, 1000))
def test_native_matches_reference(subtract_path, data, value_dtype, count, alpha, seed):
    before, after, k = data
    rows = _rows_for(before, after, k, value_dtype, count, seed)
    native_params = [a.clone() for a in after]
    reference_params = [a.clone() for a in after]
    ops.subtract_sparse(native_params, rows, k, alpha)
    ops.subtract_sparse_reference(reference_params, rows, k, alpha)
    assert_same_bits(native_params, reference_params, "params")


@pytest.mark.parametrize("value_dtype", ["float16", "float32"])
def test_every_path_gives_the_same_bits(native, value_dtype):
    """Serial and parallel, AVX-512 and portable loops, large and tiny tiles: one result, the
    reference's, on layers of many tiles at keep 0.1 with overlapping rows."""
    gen = torch.Generator().manual_seed(8)
    before = [torch.randn(s, generator=gen) for s in (3, 200_000, 4096, 70_001, 1)]
    after = [b + torch.randn(b.shape, generator=gen) * 1e-2 for b in before]
    k = ops.k_for([b.numel() for b in before], 0.1)
    rows = _rows_for(before, after, k, value_dtype, 5, seed=9)
    reference = [a.clone() for a in after]
    ops.subtract_sparse_reference(reference, rows, k, 0.5)
    for path, tuning in SUBTRACT_PATHS.items():
        if path == "tile-1":
            tuning = dict(tuning, tile_positions=7)  # one position per tile is slow on 270k positions
        params = [a.clone() for a in after]
        with subtract_tuning(native, **tuning):
            ops.subtract_sparse(params, rows, k, 0.5)
        assert_same_bits(params, reference, f"params ({path})")


def test_serial_cutoff_is_in_stored_entries(native):
    """The cutoff counts rows × sum(k): a call just below it and one at it both give the
    reference's bits (the two sides of the threshold run on one and on all threads)."""
    gen = torch.Generator().manual_seed(10)
    before = [torch.randn(5000, generator=gen), torch.randn(300, generator=gen)]
    after = [b + torch.randn(b.shape, generator=gen) for b in before]
    k = [500, 30]
    rows = _rows_for(before, after, k, "float16", 4, seed=11)
    reference = [a.clone() for a in after]
    ops.subtract_sparse_reference(reference, rows, k)
    entries = 4 * sum(k)
    for serial_below in (entries, entries + 1):
        params = [a.clone() for a in after]
        with subtract_tuning(native, serial_below=serial_below, tile_positions=256):
            ops.subtract_sparse(params, rows, k)
        assert_same_bits(params, reference, f"params (serial_below={serial_below})")


def test_row_order_does_not_matter():
    gen = torch.Generator().manual_seed(4)
    before = [torch.randn(5000, generator=gen), torch.randn(70_000, generator=gen)]
    after = [b + torch.randn(b.shape, generator=gen) for b in before]
    k = [2500, 35_000]  # dense enough that rows share positions
    rows = _rows_for(before, after, k, "float16", 8, seed=5)
    results = []
    for perm in (list(range(8)), [7, 3, 1, 0, 6, 2, 5, 4]):
        params = [a.clone() for a in after]
        ops.subtract_sparse(params, ops.Row(*(f[perm].contiguous() for f in rows)), k)
        results.append(params)
    assert_same_bits(results[0], results[1], "params")


def test_single_row_is_accepted():
    before, after = [torch.zeros(10)], [torch.arange(10.0)]
    row = ops.prune_topk([b.clone() for b in before], after, [3], "float32", refresh=False)
    params = [after[0].clone()]
    ops.subtract_sparse(params, row, [3])
    assert params[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 0, 0]


def test_exactness_invariant_sterbenz(small_layer_limit):
    """k = numel, float32 values: after − Δ gives `before` back bit for bit where after − before
    is exact (each pair within a factor of 2 of each other, same sign)."""
    gen = torch.Generator().manual_seed(6)
    before = [torch.rand(s, generator=gen) + 1.0 for s in (1, 37, 40_000)]  # in [1, 2)
    after = [b * (0.5 + 1.5 * torch.rand(b.shape, generator=gen)) for b in before]  # within 2x, Sterbenz
    after = [torch.maximum(a, b / 2) for a, b in zip(after, before)]
    k = [b.numel() for b in before]
    row = ops.prune_topk([b.clone() for b in before], after, k, "float32", refresh=False)
    params = [a.clone() for a in after]
    ops.subtract_sparse(params, row, k)
    assert_same_bits(params, before, "restored")


def test_exactness_invariant_general():
    """Where after − before rounds, the round trip is off by float32 rounding only."""
    gen = torch.Generator().manual_seed(7)
    before = [torch.randn(50_000, generator=gen) * 10.0 ** torch.randint(-5, 5, (50_000,), generator=gen)]
    after = [b + torch.randn(b.shape, generator=gen) for b in before]
    k = [50_000]
    row = ops.prune_topk([b.clone() for b in before], after, k, "float32", refresh=False)
    params = [a.clone() for a in after]
    ops.subtract_sparse(params, row, k)
    eps = torch.finfo(torch.float32).eps
    bound = eps * torch.maximum(after[0].abs(), before[0].abs())
    assert bool(((params[0] - before[0]).abs() <= bound).all())


_DETERMINISM_SCRIPT = r"""
import hashlib, json, sys, torch
from pyunlearn.kernels import ops
gen = torch.Generator().manual_seed(11)
shapes = [(3,), (200_000,), (64, 64), (100_000,)]
before = [torch.randn(s, generator=gen) for s in shapes]
rows, afters = [], []
for step in range(6):
    after = [b + torch.randn(b.shape, generator=gen) * 1e-2 for b in before]
    afters.append(after)
    rows.append(ops.prune_topk([b.clone() for b in before], after, ops.k_for([b.numel() for b in before], 0.05)))
k = ops.k_for([b.numel() for b in before], 0.05)
stack = ops.Row(*(torch.stack(f) for f in zip(*rows)))
params = [a.clone() for a in afters[-1]]
ops.subtract_sparse(params, stack, k)
digest = hashlib.sha256()
for t in list(stack) + params:
    digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(json.dumps({"digest": digest.hexdigest(), "backend": ops.backend()}))
"""


def test_bit_identical_for_one_and_two_threads():
    results = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT], env=env, capture_output=True,
                             text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert f"{1} threads" in results[0]["backend"] and f"{2} threads" in results[1]["backend"]
    assert results[0]["digest"] == results[1]["digest"]


def _good_rows():
    row = ops.prune_topk([torch.zeros(10), torch.zeros(4)], [torch.arange(10.0), torch.ones(4)], [3, 2], refresh=False)
    return row, [3, 2]


def _bad_cases():
    row, k = _good_rows()
    corrupt_zero = row.index.clone()
    corrupt_zero[1] = 0
    corrupt_far = row.index.clone()
    corrupt_far[4] = 4  # layer 1: first gap 1 (index 0), then +4 → index 4 of a 4-element layer
    return [
        ("index-dtype", row._replace(index=row.index.to(torch.int64)), k, TypeError, "rows.index must be uint32"),
        ("values-dtype", row._replace(values=row.values.to(torch.float64)), k, TypeError, "rows.values must be"),
        ("scales-shape", row._replace(scales=row.scales[:1]), k, ValueError, "rows.scales has shape"),
        ("k-sum", row, [2, 2], ValueError, r"sum\(k\) = 4"),
        ("mixed-dims", row._replace(index=row.index[None]), k, ValueError, "all be 1-D"),
        ("not-a-row", "rows", k, TypeError, "rows must be a Row"),
        ("zero-gap", row._replace(index=corrupt_zero), k, ValueError, r"rows\[0\], layer\[0\]: repeats an index"),
        ("out-of-range", row._replace(index=corrupt_far), k, ValueError, r"rows\[0\], layer\[1\]: decodes to an index past"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("kernel", [ops.subtract_sparse, ops.subtract_sparse_reference], ids=["native", "reference"])
def test_bad_rows_are_refused_and_params_untouched(case, kernel):
    _, rows, k, error, message = case
    params = [torch.arange(10.0), torch.ones(4)]
    saved = [p.clone() for p in params]
    with pytest.raises(error, match=message):
        kernel(params, rows, k)
    assert_same_bits(params, saved, "params")


@pytest.mark.parametrize("path", ["default", "portable"])
@pytest.mark.parametrize("kernel", [ops.subtract_sparse, ops.subtract_sparse_reference], ids=["native", "reference"])
def test_gaps_whose_sum_wraps_32_bits_are_refused(native, kernel, path):
    """Gaps that add up past 2^32 must not wrap around to a valid-looking index: the vector
    check sums 32-bit lanes only while every gap is below 2^30."""
    k = [64, 2]
    index = torch.ones(66, dtype=torch.int64)
    index[[15, 31]] = 2**31  # one 32-bit lane of the block would sum to 2^32 + 2 and wrap to 2
    index[64:] = torch.tensor([1, 1])
    rows = Row(index.to(torch.uint32), torch.ones(66, dtype=torch.float16), torch.ones(2))
    params = [torch.zeros(100), torch.zeros(2)]
    with subtract_tuning(native, **SUBTRACT_PATHS[path]):
        with pytest.raises(ValueError, match=r"rows\[0\], layer\[0\]: decodes to an index past"):
            kernel(params, rows, k)
    assert_same_bits(params, [torch.zeros(100), torch.zeros(2)], "params")


@pytest.mark.parametrize("kernel", [ops.subtract_sparse, ops.subtract_sparse_reference], ids=["native", "reference"])
def test_a_bad_stored_row_is_named_by_its_step_and_layer(kernel):
    """One convention for both kernels: the error names the step the row stores and the layer's
    name; the first bad (row, layer) is reported, whatever the thread timing."""
    row, k = _good_rows()
    stack = Row(*(torch.stack([f, f, f]) for f in row))
    stack.index[1, 3] = 0  # row 1, layer 1: a repeated index
    stack.index[2, 0] = 200  # row 2, layer 0: past the end (reported after row 1)
    params = [torch.arange(10.0), torch.ones(4)]
    saved = [p.clone() for p in params]
    with pytest.raises(ValueError, match=r"stored row of step 71 \(rows\[1\]\), layer\[1\] \(fc\.bias\): repeats"):
        kernel(params, stack, k, names=["fc.weight", "fc.bias"], steps=[70, 71, 72])
    assert_same_bits(params, saved, "params")
    with pytest.raises(ValueError, match="one step number per stored row"):
        kernel(params, stack, k, steps=[1])


@pytest.mark.parametrize("alpha, error", [(float("nan"), ValueError), (1e39, ValueError), ("1", TypeError), (True, TypeError)])
def test_bad_alpha(alpha, error):
    row, k = _good_rows()
    with pytest.raises(error, match="alpha"):
        ops.subtract_sparse([torch.arange(10.0), torch.ones(4)], row, k, alpha)


def test_params_must_be_writable_float32_cpu():
    row, k = _good_rows()
    with pytest.raises(TypeError, match=r"params\[1\] \(fc\.bias\) must be float32"):
        ops.subtract_sparse([torch.zeros(10), torch.zeros(4, dtype=torch.float16)], row, k, names=["fc.weight", "fc.bias"])
    with torch.inference_mode():
        frozen = [torch.zeros(10), torch.zeros(4)]
    with pytest.raises(ValueError, match=r"params\[0\] is an inference tensor"):
        ops.subtract_sparse(frozen, row, k)


def test_autograd_sees_the_change():
    """The kernel writes through numpy; version counters must move so stale graphs fail."""
    row, k = _good_rows()
    weight = torch.nn.Parameter(torch.arange(10.0))
    bias = torch.nn.Parameter(torch.ones(4))
    loss = (weight * weight).sum()  # saves `weight` for backward
    ops.subtract_sparse([weight, bias], row, k)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_empty_stack_changes_nothing():
    params = [torch.arange(10.0), torch.ones(4)]
    rows = ops.Row(torch.empty(0, 5, dtype=torch.uint32), torch.empty(0, 5, dtype=torch.float16),
                   torch.empty(0, 2))
    ops.subtract_sparse(params, rows, [3, 2])
    assert params[0].tolist() == list(np.arange(10.0))
