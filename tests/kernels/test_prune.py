"""prune_topk: native against the torch reference, edge cases by name, errors."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyunlearn import NonFiniteUpdateError
from pyunlearn.kernels import ops
from pyunlearn.kernels.reference import fp16_scale

from tests.support.kernels import assert_same_bits, misleading_layer, prune_both, prune_tuning
from tests.support.strategies import step


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=step(), value_dtype=st.sampled_from(["float16", "float32"]), refresh=st.booleans())
def test_native_matches_reference(small_layer_limit, data, value_dtype, refresh):
    before, after, k = data
    native_row, reference_row, native_before, reference_before = prune_both(before, after, k, value_dtype, refresh)
    assert_same_bits(native_row, reference_row, "row")
    assert_same_bits(native_before, reference_before, "before")


def _selection_oracle(delta: torch.Tensor, k: int) -> list[int]:
    """Top-k by |Δ| with ties to the lower index, by plain Python sorting."""
    order = sorted(range(delta.numel()), key=lambda i: (-abs(float(delta[i])), i))
    return sorted(order[:k])


@pytest.mark.parametrize(
    "delta, k",
    [
        pytest.param([5.0], 1, id="numel-1"),
        pytest.param([1.0, -3.0, 2.0], 0, id="k-0"),
        pytest.param([1.0, -3.0, 2.0], 3, id="k-numel"),
        pytest.param([0.0] * 100, 7, id="all-zero"),
        pytest.param([2.0, -2.0, 2.0, 1.0, -2.0, 2.0], 3, id="ties-to-lower-index"),
        pytest.param([-0.0, 0.0, -0.0, 1e-45, -1e-45], 3, id="signed-zeros-and-denormals"),
        pytest.param([-7.0, -1.0, -6.0, -2.0], 2, id="negative"),
    ],
)
def test_named_edge_cases(delta, k, small_layer_limit):
    after = torch.tensor(delta, dtype=torch.float32)
    before = torch.zeros_like(after)
    row = ops.prune_topk([before.clone()], [after], [k], "float32", refresh=False)
    (positions, values), = ops.decode_row(row, [k])
    expected = _selection_oracle(after, k)
    assert positions.tolist() == expected
    assert values.tolist() == [float(after[i]) for i in expected]


def test_layers_of_very_different_sizes(small_layer_limit):
    gen = torch.Generator().manual_seed(1)
    shapes = [(1,), (300_000,), (3,), (70_000,), (17,)]
    before = [torch.randn(s, generator=gen) for s in shapes]
    after = [b + torch.randn(b.shape, generator=gen) * 1e-3 for b in before]
    k = ops.k_for([b.numel() for b in before], 0.01)
    for value_dtype in ("float16", "float32"):
        native_row, reference_row, nb, rb = prune_both(before, after, k, value_dtype)
        assert_same_bits(native_row, reference_row, "row")
        assert_same_bits(nb, rb, "before")


def test_misleading_sample_falls_back_to_exact(native):
    """Every sampled entry is 1 and all others 0, and k exceeds the sample: the sampled floor
    (1) is reached by fewer than k entries, so the kernel must redo the pass with floor 0."""
    n, k = 40_000, 5_000
    wanted = min(n // 8, max(1024, min(4096, 64 * n // k)))
    groups = max(1, wanted // 16)
    delta = misleading_layer(n, groups)
    assert int((delta > 0).sum()) < k
    with prune_tuning(native, 1024):
        native_row, reference_row, _, _ = prune_both([torch.zeros(n)], [delta], [k], "float32")
    assert_same_bits(native_row, reference_row, "row")
    (positions, _), = ops.decode_row(native_row, [k])
    assert positions.tolist() == _selection_oracle(delta, k)


def test_gap_encoding_round_trip():
    gen = torch.Generator().manual_seed(2)
    before = [torch.zeros(1000), torch.zeros(5)]
    after = [torch.randn(1000, generator=gen), torch.randn(5, generator=gen)]
    k = [100, 5]
    row = ops.prune_topk(before, after, k, "float32", refresh=False)
    start = 0
    for (positions, values), a, ki in zip(ops.decode_row(row, k), after, k):
        gaps = row.index[start : start + ki]
        assert int(gaps[0]) == int(positions[0]) + 1  # the first gap counts from -1
        assert bool((gaps.to(torch.int64) >= 1).all())
        assert torch.equal(torch.diff(positions, prepend=torch.tensor([-1])).to(torch.uint32), gaps)
        assert torch.equal(values, a[positions])
        start += ki


def test_float16_scale_keeps_values_in_range_and_precise():
    gen = torch.Generator().manual_seed(3)
    for magnitude in (1e-38, 1e-20, 1e-3, 1.0, 1e4, 3e38):
        after = [torch.randn(4096, generator=gen).clamp(-3, 3) * (magnitude / 3)]
        before = [torch.zeros(4096)]
        k = [500]
        exact = ops.prune_topk([b.clone() for b in before], after, k, "float32", refresh=False)
        half = ops.prune_topk([b.clone() for b in before], after, k, "float16", refresh=False)
        assert torch.equal(half.index, exact.index)
        scale = float(half.scales[0])
        assert math.frexp(scale)[0] == 0.5  # a power of two
        stored = half.values.to(torch.float32).abs()
        assert bool(torch.isfinite(stored).all()) and float(stored.max()) < 2.0**15
        assert scale == fp16_scale(float(exact.values.abs().max()))
        decoded = half.values.to(torch.float32) * half.scales[0]
        normal = stored >= 2.0**-14  # float16 normals keep 11 significant bits
        error = (decoded - exact.values).abs()[normal]
        assert bool((error <= exact.values.abs()[normal] * 2.0**-11).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("limit", ["default", "all-parallel"])
def test_non_finite_update_names_the_layer_and_leaves_before(native, bad, limit):
    with prune_tuning(native, 16) if limit == "all-parallel" else contextlib.nullcontext():
        before = [torch.zeros(100), torch.zeros(50_000), torch.zeros(3)]
        after = [torch.ones(100), torch.ones(50_000), torch.ones(3)]
        after[1][12_345] = bad
        snapshot = [b.clone() for b in before]
        with pytest.raises(NonFiniteUpdateError, match=r"after\[1\] \(block\.weight\)"):
            ops.prune_topk(before, after, [10, 10, 1], names=["fc.weight", "block.weight", "fc.bias"])
        assert_same_bits(before, snapshot, "before")


def test_overflowing_difference_is_non_finite():
    before, after = [torch.tensor([-3e38, 0.0])], [torch.tensor([3e38, 0.0])]
    with pytest.raises(NonFiniteUpdateError, match=r"after\[0\]"):
        ops.prune_topk(before, after, [1])


def _bad_calls():
    ok = [torch.zeros(10), torch.zeros(4)]
    return [
        ("float64", dict(before=[torch.zeros(10, dtype=torch.float64), torch.zeros(4)]), TypeError, r"before\[0\].*float32"),
        ("int", dict(after=[torch.zeros(10, dtype=torch.int32), torch.zeros(4)]), TypeError, r"after\[0\].*float32"),
        ("non-contiguous", dict(after=[torch.zeros(20)[::2], torch.zeros(4)]), ValueError, r"after\[0\].*contiguous"),
        ("mixed-devices", dict(after=[torch.zeros(10, device="meta"), torch.zeros(4)]), ValueError,
         r"after\[1\] is on cpu, after\[0\] on meta: every tensor of the call must be on one device"),
        ("layer-count", dict(before=ok[:1]), ValueError, "after has 2 layers, before has 1"),
        ("numel", dict(before=[torch.zeros(11), torch.zeros(4)]), ValueError, r"after\[0\] has 10 elements, before\[0\] has 11"),
        ("k-too-big", dict(k=[11, 1]), ValueError, r"k\[0\] = 11 must lie in \[0, 10\]"),
        ("k-negative", dict(k=[1, -1]), ValueError, r"k\[1\] = -1"),
        ("k-length", dict(k=[1]), ValueError, "k has 1 entries but there are 2 layers"),
        ("k-float", dict(k=[1.5, 1]), TypeError, r"k\[0\] must be an int"),
        ("k-tensor", dict(k=torch.tensor([1, 1])), TypeError, "k must be a list"),
        ("not-a-list", dict(after=torch.zeros(10)), TypeError, "after must be a list"),
        ("not-a-tensor", dict(after=[np.zeros(10, np.float32), torch.zeros(4)]), TypeError, r"after\[0\] must be a torch.Tensor"),
        ("value-dtype", dict(value_dtype="bfloat16"), ValueError, "value_dtype must be"),
        ("names", dict(names=["only-one"]), ValueError, "names must be 2 strings"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
@pytest.mark.parametrize("kernel", [ops.prune_topk, ops.prune_topk_reference], ids=["native", "reference"])
def test_bad_input_is_refused_with_a_clear_error(case, kernel):
    _, override, error, message = case
    args = dict(before=[torch.zeros(10), torch.zeros(4)], after=[torch.ones(10), torch.ones(4)], k=[3, 1],
                value_dtype="float16", refresh=True)
    args.update(override)
    before_copy = [b.clone() if b.device.type == "cpu" else b for b in args["before"]] if isinstance(args["before"], list) else None
    with pytest.raises(error, match=message):
        kernel(**args)
    if before_copy is not None:
        for b, c in zip(args["before"], before_copy):
            if b.device.type == "cpu":
                assert torch.equal(b, c), "a refused call changed before"


def test_named_layers_in_errors():
    with pytest.raises(ValueError, match=r"k\[0\] \(conv\.weight\) = 9"):
        ops.prune_topk([torch.zeros(4)], [torch.ones(4)], [9], names=["conv.weight"])


def test_native_module_refuses_non_arrays(native):
    """Handing the extension a tensor instead of a numpy array would make a silent copy."""
    z = np.zeros(4, np.float32)
    out = (np.empty(1, np.uint32), np.empty(1, np.float32), np.empty(1, np.float32))
    with pytest.raises(TypeError, match=r"before\[0\] must be a numpy array"):
        native.prune_topk([torch.zeros(4)], [z], [1], *out, True)
    with pytest.raises(ValueError, match=r"before\[0\] must be writable"):
        ro = np.zeros(4, np.float32)
        ro.flags.writeable = False
        native.prune_topk([ro], [z], [1], *out, True)


def test_pruner_matches_prune_topk_and_follows_moved_tensors():
    gen = torch.Generator().manual_seed(9)
    params = [torch.nn.Parameter(torch.randn(300, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))]
    snapshot = [p.detach().clone() for p in params]
    reference_snapshot = [p.detach().clone() for p in params]
    pruner = ops.Pruner(snapshot, params, [30, 2], "float16", names=["a", "b"])
    for turn in range(3):
        with torch.no_grad():
            if turn == 1:
                params[0].data = params[0].data.clone()  # storage moved: the pruner must notice
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen))
        row = pruner()
        expected = ops.prune_topk_reference(reference_snapshot, [p.detach() for p in params], [30, 2], "float16")
        assert_same_bits(row, expected, "row")
        assert_same_bits(snapshot, reference_snapshot, "snapshot")


def test_pruner_rows_are_new_tensors_and_errors_name_the_layer():
    """Each call returns a row of its own (the recorder queues them); float32 values and
    refresh=False work as in prune_topk; a NaN update names the layer and leaves the snapshot."""
    gen = torch.Generator().manual_seed(10)
    params = [torch.randn(500, generator=gen), torch.randn(3, 4, generator=gen)]
    snapshot = [torch.zeros_like(p) for p in params]
    pruner = ops.Pruner(snapshot, params, [50, 5], "float32", names=["w", "b"])
    first = pruner(refresh=False)
    assert all(torch.equal(s, torch.zeros_like(s)) for s in snapshot)
    second = pruner(refresh=True)
    assert_same_bits(first, second, "row")
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first, second))
    assert first.values.dtype == torch.float32 and first.index.dtype == torch.uint32
    assert_same_bits(snapshot, params, "snapshot")
    params[1][2, 3] = float("nan")
    saved = [s.clone() for s in snapshot]
    with pytest.raises(NonFiniteUpdateError, match=r"after\[1\] \(b\)"):
        pruner()
    assert_same_bits(snapshot, saved, "snapshot")


def test_prune_plan_checks_its_arguments_once(native):
    z = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"before\[0\] must be a numpy array"):
        native.PrunePlan([torch.zeros(4)], [z], [1], "float16")
    with pytest.raises(ValueError, match=r"k\[0\] = 5 must lie in \[0, 4\]"):
        native.PrunePlan([z.copy()], [z], [5], "float16")
    with pytest.raises(ValueError, match="value_dtype must be"):
        native.PrunePlan([z.copy()], [z], [1], "int8")
    index, values, scales = native.PrunePlan([z.copy()], [np.arange(4, dtype=np.float32)], [2], "float16").run(False)
    assert index.tolist() == [3, 1] and values.dtype == np.float16 and scales.shape == (1,)


def test_serial_and_parallel_prune_give_the_same_bits(native):
    """The serial cutoff (models below serial_below elements run on one thread) changes where
    the work runs, never the row."""
    gen = torch.Generator().manual_seed(12)
    before = [torch.randn(s, generator=gen) for s in (40_000, 9, 3000, 20_000)]
    after = [b + torch.randn(b.shape, generator=gen) * 1e-3 for b in before]
    k = ops.k_for([b.numel() for b in before], 0.05)
    rows = []
    for small_layer_limit, serial_below in ((1 << 15, 2**62), (16, 0), (1 << 15, 0)):
        with prune_tuning(native, small_layer_limit, serial_below):
            rows.append(prune_both(before, after, k, "float16"))
    for native_row, reference_row, native_before, reference_before in rows:
        assert_same_bits(native_row, rows[0][1], "row")
        assert_same_bits(native_before, reference_before, "before")
