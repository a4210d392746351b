"""The device path of the kernels (pyunlearn.ops on non-CPU tensors: pyunlearn.kernels._native_cuda where
built, else the torch kernels of pyunlearn.kernels.torch_ops) against the native CPU kernels, bit for
bit. Runs on "cpu-device-path" (CPU tensors forced through the device path, here and everywhere)
and on "cuda" (skipped without a GPU); see the `device_path` fixture."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyunlearn.kernels import backends, ops
from pyunlearn.errors import NonFiniteUpdateError
from pyunlearn.kernels.row import Row

from tests.support.kernels import assert_same_bits, native_prune, native_subtract, overlapping_rows
from tests.support.kernels import crafted_corruptions as _crafted_corruptions
from tests.support.kernels import good_stack as _good_stack
from tests.support.strategies import DENORMAL, step

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def device_prune(device, before, after, k, value_dtype, refresh=True):
    """ops.prune_topk on `device` on copies: (row on the CPU, before afterwards on the CPU)."""
    before_d = [b.clone().to(device) for b in before]
    row = ops.prune_topk(before_d, [a.to(device).contiguous() for a in after], k, value_dtype, refresh)
    assert all(t.device == device for t in row)
    return Row(*(t.cpu() for t in row)), [b.cpu() for b in before_d]


def assert_prune_matches(native, device, before, after, k, value_dtype, refresh=True):
    expected_row, expected_before = native_prune(native, before, after, k, value_dtype, refresh)
    row, got_before = device_prune(device, before, after, k, value_dtype, refresh)
    assert_same_bits(row, expected_row, "row (index, values, scales)")
    assert_same_bits(got_before, expected_before, "before")


# ---- prune_topk ----------------------------------------------------------------------------------

@SETTINGS
@given(data=step(max_layers=5, max_numel=3000), value_dtype=st.sampled_from(["float16", "float32"]),
       refresh=st.booleans())
def test_prune_matches_native_on_drawn_layers(native, device_path, data, value_dtype, refresh):
    before, after, k = data
    assert_prune_matches(native, device_path, before, after, k, value_dtype, refresh)


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
@pytest.mark.parametrize("keep", [0.0, 0.01, 0.3, 1.0])
def test_prune_ties_take_the_lower_index(native, device_path, value_dtype, keep):
    """Δ in {-3, …, 3}: masses of equal |Δ|, where torch.topk alone may pick any of them."""
    gen = torch.Generator().manual_seed(7)
    before = [torch.zeros(40_000), torch.randn(7000, generator=gen)]
    after = [torch.randint(-3, 4, (40_000,), generator=gen).float(),
             before[1] + torch.randint(-2, 3, (7000,), generator=gen).float()]
    k = [int(keep * 40_000), int(keep * 7000)]
    assert_prune_matches(native, device_path, before, after, k, value_dtype)


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_prune_k_extremes_zeros_and_denormals(native, device_path, value_dtype):
    n = 9000
    gen = torch.Generator().manual_seed(11)
    layers = [
        (torch.randn(n, generator=gen), 0),
        (torch.randn(n, generator=gen), 1),
        (torch.randn(n, generator=gen), n),
        (torch.randn(n, generator=gen), n - 1),
        (torch.zeros(0), 0),  # an empty layer
        (torch.zeros(5000), 50),  # no change at all
        (torch.tensor([-0.0, 0.0, -0.0, 1e-45, -1e-45] * 600), 1000),  # -0.0 and 0.0 tie; denormals
        (torch.full((3000,), -2.5), 7),  # one value everywhere
        (torch.tensor([5.0]), 1),
    ]
    after = [d for d, _ in layers]
    assert_prune_matches(native, device_path, [torch.zeros_like(d) for d in after], after, [k for _, k in layers],
                         value_dtype)


@pytest.mark.parametrize("largest", [
    2.0**15, 2.0**14, 2.0**15 - 2.0**3,  # the scale's boundaries: max |Δ| must land in [2^14, 2^15)
    3.0e38, 2.0**127,  # the largest finite exponents
    2.0**-120, 2.0**-126,  # the scale's exponent clamps at -126
    float(DENORMAL), 1.4e-45,  # a denormal maximum
    1.0 + 2.0**-23,
])
def test_prune_float16_scale_edges(native, device_path, largest):
    """The scale for each edge of csrc/common.h's fp16_scale_for, and values it makes tiny (float16
    denormals and zeros after scaling)."""
    gen = torch.Generator().manual_seed(3)
    spread = torch.tensor([1.0, -0.5, 2.0**-11, 2.0**-20, -(2.0**-25), 2.0**-30, 2.0**-40, 0.0])
    delta = torch.cat([torch.tensor([largest, -largest]), largest * spread,
                       largest * torch.rand(500, generator=gen)]).to(torch.float32)
    assert torch.isfinite(delta).all()
    assert_prune_matches(native, device_path, [torch.zeros_like(delta)], [delta], [len(delta) // 2], "float16")
    assert_prune_matches(native, device_path, [torch.zeros_like(delta)], [delta], [len(delta)], "float16")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_prune_non_finite_layer_is_reported_and_before_kept(device_path, bad):
    shapes = [500, 300, 2000, 7]
    gen = torch.Generator().manual_seed(3)
    before = [torch.randn(n, generator=gen).to(device_path) for n in shapes]
    after = [b + 1e-3 for b in before]
    after[2][1234] = bad
    after[3][0] = float("nan")  # a later bad layer: the first is reported
    saved = [b.clone() for b in before]
    with pytest.raises(NonFiniteUpdateError, match=r"after\[2\] \(c\) holds NaN or Inf"):
        ops.prune_topk(before, after, ops.k_for(shapes, 0.1), "float16", names=["a", "b", "c", "d"])
    assert_same_bits(before, saved, "before")


def test_device_pruner_reuses_its_buffers_and_does_not_wait(native, device_path):
    """Three steps through one DevicePruner: the same row tensors each time, the status a device
    tensor (−1, then the bad layer), the snapshot refreshed only after finite steps; rows as the
    native kernel gives them for the same sequence."""
    shapes = [3000, 17, 0, 4096]
    gen = torch.Generator().manual_seed(5)
    snapshot = [torch.randn(n, generator=gen) for n in shapes]
    k = ops.k_for(shapes, 0.05)
    kept = [s.clone().to(device_path) for s in snapshot]  # the pruner's snapshot, refreshed in place
    pruner = ops.DevicePruner(kept, [s.to(device_path) for s in snapshot], k, "float16")
    assert pruner.kernels == backends.backend_for(device_path).kernels
    reference = [s.clone() for s in snapshot]
    addresses = None
    for step_no in range(3):
        live = [s + torch.randn(s.shape, generator=gen) * 10.0**-step_no for s in snapshot]
        if step_no == 2:
            live[3][9] = float("inf")
        row, status = pruner([t.to(device_path) for t in live])
        assert isinstance(status, torch.Tensor) and status.device == device_path
        if addresses is None:
            addresses = [t.data_ptr() for t in row]
        assert [t.data_ptr() for t in row] == addresses
        if step_no < 2:
            expected, after_ref = native_prune(native, reference, live, k, "float16")
            assert int(status) == -1
            assert_same_bits([t.cpu() for t in row], expected, "row")
            reference = after_ref
        else:
            assert int(status) == 3
        snapshot = live
    assert_same_bits([b.cpu() for b in kept], reference, "snapshot after a non-finite step")


# ---- subtract_sparse -----------------------------------------------------------------------------

def device_subtract(device, params, rows, k, alpha=1.0, rows_on_device=False, **kwargs):
    params_d = [p.clone().to(device) for p in params]
    if rows_on_device:
        rows = Row(*(f.to(device) if f.dtype != torch.uint32 else f.view(torch.int32).to(device).view(torch.uint32)
                     for f in rows))
    ops.subtract_sparse(params_d, rows, k, alpha, **kwargs)
    return [p.cpu() for p in params_d]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=step(max_layers=4, max_numel=3000), value_dtype=st.sampled_from(["float16", "float32"]),
       count=st.integers(1, 5), alpha=st.sampled_from([1.0, -1.0, 0.5, 0.1]), seed=st.integers(0, 1000))
def test_subtract_matches_native_on_drawn_layers(native, device_path, data, value_dtype, count, alpha, seed):
    before, after, k = data
    rows = overlapping_rows(before, after, k, value_dtype, count, seed)
    verdict, expected = native_subtract(native, after, rows, k, alpha)
    assert verdict is None
    assert_same_bits(device_subtract(device_path, after, rows, k, alpha), expected, "params")


@pytest.mark.parametrize("rows_on_device", [False, True])
def test_subtract_applies_rows_in_the_canonical_order(native, device_path, rows_on_device):
    """Dense overlapping rows, so the order changes the rounding; a repeated row too."""
    gen = torch.Generator().manual_seed(8)
    shapes = [5000, 3000]
    before = [torch.randn(n, generator=gen) for n in shapes]
    after = [b + torch.randn(b.shape, generator=gen) for b in before]
    k = [2500, 1500]
    rows = overlapping_rows(before, after, k, "float16", 6, seed=8)
    results = []
    for perm in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2], [2, 2, 0, 1, 5, 3]):
        shuffled = Row(*(f[perm].contiguous() for f in rows))
        got = device_subtract(device_path, after, shuffled, k, 0.5, rows_on_device)
        assert_same_bits(got, native_subtract(native, after, shuffled, k, 0.5)[1], f"params, rows {perm}")
        results.append(got)
    assert_same_bits(results[0], results[1], "params")


def test_subtract_bad_rows_get_the_native_verdict_and_change_nothing(native, device_path):
    shapes, k, good = _good_stack()
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(n, generator=gen) for n in shapes]
    cases = _crafted_corruptions(k)
    rng = np.random.default_rng(5)
    for trial in range(8):
        cases.append((f"random-{trial}", [(int(rng.integers(0, 4)), int(rng.integers(0, sum(k))),
                                           int(rng.choice([0, int(rng.integers(1, 30_000)), 2**32 - 1])))
                                          for _ in range(int(rng.integers(1, 4)))]))
    names, steps = ["w", "b", "v"], [10, 11, 12, 13]
    for name, edits in cases:
        index = good.index.clone()
        for row, entry, gap in edits:
            index[row, entry] = gap
        rows = Row(index, good.values, good.scales)
        verdict, _ = native_subtract(native, params, rows, k)
        assert verdict is not None, name
        row, layer, reason = verdict
        params_d = [p.clone().to(device_path) for p in params]
        message = rf"the stored row of step {steps[row]} \(rows\[{row}\]\), layer\[{layer}\] \({names[layer]}\): {re.escape(reason)}"
        with pytest.raises(ValueError, match=message):
            ops.subtract_sparse(params_d, rows, k, names=names, steps=steps)
        assert_same_bits([p.cpu() for p in params_d], params, f"params ({name})")


def test_subtract_refuses_mixed_devices(device_path):
    params = [torch.zeros(10, device=device_path), torch.zeros(4, device="meta")]
    row = Row(torch.ones(3, dtype=torch.uint32), torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match=r"params\[1\] \(fc.bias\) is on meta, params\[0\] \(fc.weight\) on "
                                         rf"{device_path}: every tensor of the call must be on one device"):
        ops.subtract_sparse(params, row, [2, 1], names=["fc.weight", "fc.bias"])
    with pytest.raises(ValueError, match=r"before\[0\] is on meta, after\[0\] on"):
        ops.prune_topk([torch.zeros(10, device="meta")], [torch.zeros(10, device=device_path)], [1])


def test_stored_rows_on_another_device_are_refused():
    rows = Row(torch.ones(1, dtype=torch.uint32), torch.ones(1, device="meta"), torch.ones(1))
    with pytest.raises(ValueError, match=r"rows.values is on meta: stored rows must be on the CPU or on the "
                                         r"parameters' device \(cpu\)"):
        ops.subtract_sparse([torch.zeros(3)], rows, [1])
