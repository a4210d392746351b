"""The CUDA kernels (pyunlearn.kernels._native_cuda) against the CPU kernels, bit for bit.

Every test runs on two backends:
- "cuda": the real module on a GPU. Skipped where torch sees no GPU or the module is not built
  (`PYUNLEARN_CUDA=1 pip install -e .`; scripts/gpu_check.sh does both and runs these).
- "emulated": the same CUDA sources compiled with the host C++ compiler over
  csrc/cuda/emulate.h (each CUDA thread a fiber, the blocks of a grid one after another) and run
  on CPU tensors. It checks the kernels' logic where there is no GPU: selection, ties, encoding,
  row order, the bad-row verdicts, barriers. It cannot check GPU memory ordering between blocks,
  races this interleaving hides, or speed: those need the "cuda" backend. Sizes are smaller
  there (the emulation is slow), and the module is built once per session.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyunlearn.kernels import ops
from pyunlearn.kernels.row import Row
from tests.support import resnet18_cifar_shapes
from tests.support.kernels import assert_same_bits, misleading_layer, overlapping_rows
from tests.support.kernels import crafted_corruptions as _crafted_corruptions
from tests.support.kernels import good_stack as _good_stack
from tests.support.kernels import native_subtract as cpu_subtract
from tests.support.strategies import step


@dataclass
class Backend:
    name: str
    module: object
    device: torch.device
    large: bool  # room for big layers and many rows (a real GPU)

    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def put(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.uint32:  # moved as int32 bits: uint32 ops are sparse on CUDA
            return t.view(torch.int32).to(self.device).contiguous()
        return t.to(self.device).contiguous()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@pytest.fixture(scope="session", params=["cuda", "emulated"])
def backend(request):
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device visible to torch")
        try:
            from pyunlearn.kernels import _native_cuda
        except ImportError:
            pytest.skip("pyunlearn.kernels._native_cuda is not built (PYUNLEARN_CUDA=1 pip install -e .)")
        return Backend("cuda", _native_cuda, torch.device("cuda"), large=True)
    return Backend("emulated", request.getfixturevalue("emulated_cuda"), torch.device("cpu"), large=False)


# ---- calls ---------------------------------------------------------------------------------------

def cuda_prune(backend, before, after, k, value_dtype, refresh=True, **kwargs):
    """The CUDA kernel on copies of `before`; returns (status, Row on the CPU, before afterwards).
    Outputs are poisoned first, so an entry the kernel never wrote shows."""
    dev = backend.device
    before_d = [backend.put(b.clone()) for b in before]
    after_d = [backend.put(a) for a in after]
    total = sum(k)
    index = torch.full((total,), -12345, dtype=torch.int32, device=dev)
    values = torch.full((total,), float("nan"), dtype=getattr(torch, value_dtype), device=dev)
    scales = torch.full((len(k),), float("nan"), dtype=torch.float32, device=dev)
    status = backend.module.prune_topk(
        [b.data_ptr() for b in before_d], [a.data_ptr() for a in after_d], [a.numel() for a in after], list(k),
        index.data_ptr(), values.data_ptr(), scales.data_ptr(), value_dtype, refresh, backend.stream(), **kwargs)
    backend.sync()
    row = Row(index.cpu().view(torch.uint32), values.cpu(), scales.cpu())
    return status, row, [b.cpu() for b in before_d]


def assert_prune_matches_cpu(backend, before, after, k, value_dtype, refresh=True):
    cpu_before = [b.clone() for b in before]
    expected = ops.prune_topk(cpu_before, after, k, value_dtype, refresh)
    status, row, gpu_before = cuda_prune(backend, before, after, k, value_dtype, refresh)
    assert status == -1
    assert_same_bits(row, expected, "row (index, values, scales)")
    assert_same_bits(gpu_before, cpu_before, "before")
    return row


def cuda_subtract(backend, params, rows, k, alpha=1.0):
    """The CUDA kernel on copies of `params`; returns (verdict, params afterwards)."""
    index, values, scales = (f if f.dim() == 2 else f[None] for f in rows)
    params_d = [backend.put(p.clone()) for p in params]
    index_d, values_d, scales_d = backend.put(index), backend.put(values), backend.put(scales)
    verdict = backend.module.subtract_sparse(
        [p.data_ptr() for p in params_d], [p.numel() for p in params], list(k), index_d.data_ptr(),
        values_d.data_ptr(), scales_d.data_ptr(), index.shape[0], str(values.dtype).removeprefix("torch."), alpha,
        backend.stream())
    backend.sync()
    return verdict, [p.cpu() for p in params_d]


def random_layers(shapes, seed, *, step_size=1e-3):
    gen = torch.Generator().manual_seed(seed)
    before = [torch.randn(n, generator=gen) for n in shapes]
    after = [b + step_size * torch.randn(b.shape, generator=gen) for b in before]
    return before, after


def shapes_for(backend):
    """Tiny layers, several tiles of 4096, and (on a GPU) layers of millions of entries."""
    shapes = [1, 3, 17, 4096, 5000, 30_000, 2049, 250]
    return shapes + [1_000_000, 3_000_000, 65_536] if backend.large else shapes


# ---- prune_topk ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
@pytest.mark.parametrize("keep", [0.01, 0.1])
def test_prune_random_layers(backend, value_dtype, keep):
    shapes = shapes_for(backend)
    before, after = random_layers(shapes, seed=int(keep * 100))
    assert_prune_matches_cpu(backend, before, after, ops.k_for(shapes, keep), value_dtype)


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
@pytest.mark.parametrize("keep", [0.0, 0.01, 0.3, 1.0])
def test_prune_integer_deltas_are_ties(backend, value_dtype, keep):
    """Δ in {-3, …, 3}: masses of equal |Δ|. Selection must take ties by lower index; at small
    keep the sampled superset overflows and the layer is selected from whole."""
    n = 2_000_000 if backend.large else 40_000
    gen = torch.Generator().manual_seed(7)
    before = [torch.zeros(n), torch.randn(7000, generator=gen)]
    after = [torch.randint(-3, 4, (n,), generator=gen).float(),
             before[1] + torch.randint(-2, 3, (7000,), generator=gen).float()]
    k = [int(keep * n), int(keep * 7000)]
    assert_prune_matches_cpu(backend, before, after, k, value_dtype)


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_prune_k_extremes_and_odd_layers(backend, value_dtype):
    n = 9000
    gen = torch.Generator().manual_seed(11)
    signed_zeros = torch.tensor([-0.0, 0.0, -0.0, 1e-45, -1e-45] * 600)
    layers = [
        (torch.randn(n, generator=gen), 0),
        (torch.randn(n, generator=gen), 1),
        (torch.randn(n, generator=gen), n),
        (torch.randn(n, generator=gen), n - 1),
        (torch.zeros(0), 0),  # an empty layer
        (torch.zeros(5000), 50),  # no change at all
        (signed_zeros, 1000),  # -0.0 and 0.0 tie; denormals
        (torch.full((3000,), -2.5), 7),  # one value everywhere
        (torch.tensor([5.0]), 1),
    ]
    after = [d for d, _ in layers]
    before = [torch.zeros_like(d) for d in after]
    assert_prune_matches_cpu(backend, before, after, [k for _, k in layers], value_dtype)


def test_prune_misleading_sample_falls_back_to_exact(backend):
    """Every entry the CUDA sampler reads is 1, all others 0, and k exceeds them: fewer than k
    entries reach the sampled floor, so the layer must be selected from whole."""
    n, k = 80_000, 15_000
    groups = min(n // 8, 8192) // 16
    delta = misleading_layer(n, groups)
    assert int((delta > 0).sum()) < k
    assert_prune_matches_cpu(backend, [torch.zeros(n)], [delta], [k], "float32")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=step(max_layers=4, max_numel=6000), value_dtype=st.sampled_from(["float16", "float32"]),
       refresh=st.booleans())
def test_prune_matches_cpu_on_drawn_layers(backend, data, value_dtype, refresh):
    before, after, k = data
    assert_prune_matches_cpu(backend, before, after, k, value_dtype, refresh)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_prune_non_finite_layer_is_reported_and_before_kept(backend, bad):
    shapes = [5000, 300, 20_000, 7]
    before, after = random_layers(shapes, seed=3)
    after[2][12_345] = bad
    after[3][0] = float("nan")  # a later bad layer: the first is reported
    k = ops.k_for(shapes, 0.1)
    status, _, gpu_before = cuda_prune(backend, before, after, k, "float16", refresh=True)
    assert status == 2
    assert_same_bits(gpu_before, before, "before")


def test_prune_without_waiting_writes_the_status_on_the_device(backend):
    shapes = [5000, 20_000]
    before, after = random_layers(shapes, seed=4)
    k = ops.k_for(shapes, 0.05)
    for poisoned, expected in ((False, -1), (True, 1)):
        if poisoned:
            after[1][7] = float("nan")
        status = torch.full((1,), 99, dtype=torch.int64, device=backend.device)
        returned, row, gpu_before = cuda_prune(backend, before, after, k, "float32", status=status.data_ptr())
        assert returned is None
        assert int(status.cpu()) == expected
        assert_same_bits(gpu_before, before if poisoned else after, "before")


def test_prune_with_a_lent_workspace(backend):
    shapes = [1, 5000, 30_000]
    before, after = random_layers(shapes, seed=5)
    k = ops.k_for(shapes, 0.1)
    size = backend.module.prune_workspace_size(shapes, k)
    workspace = torch.full((size,), 0xA5, dtype=torch.uint8, device=backend.device)
    expected = ops.prune_topk([b.clone() for b in before], after, k, "float16", True)
    status, row, _ = cuda_prune(backend, before, after, k, "float16", workspace=workspace.data_ptr(),
                                workspace_size=size)
    assert status == -1
    assert_same_bits(row, expected, "row")
    with pytest.raises(ValueError, match="bytes, .* needed"):
        cuda_prune(backend, before, after, k, "float16", workspace=workspace.data_ptr(), workspace_size=size - 1)


def test_prune_is_deterministic_across_runs(backend):
    shapes = shapes_for(backend)
    before, after = random_layers(shapes, seed=6)
    k = ops.k_for(shapes, 0.1)
    _, first, _ = cuda_prune(backend, before, after, k, "float16")
    for _ in range(3 if backend.large else 1):
        _, again, _ = cuda_prune(backend, before, after, k, "float16")
        assert_same_bits(again, first, "row")


def test_prune_refuses_bad_arguments(backend):
    m = backend.module
    with pytest.raises(ValueError, match=r"k\[0\] = 5 must lie in \[0, 4\]"):
        m.prune_topk([1], [1], [4], [5], 1, 1, 1, "float32", True, 0)
    with pytest.raises(ValueError, match="one per layer"):
        m.prune_topk([1], [1, 2], [4], [1], 1, 1, 1, "float32", True, 0)
    with pytest.raises(ValueError, match="value_dtype"):
        m.prune_topk([1], [1], [4], [1], 1, 1, 1, "bfloat16", True, 0)
    with pytest.raises(ValueError, match=r"after\[0\] is a null pointer"):
        m.prune_topk([1], [0], [4], [1], 1, 1, 1, "float32", True, 0)
    with pytest.raises(ValueError, match="2\\^32 - 1"):
        m.prune_workspace_size([2**32], [1])


# ---- subtract_sparse -----------------------------------------------------------------------------

@pytest.mark.parametrize("value_dtype", ["float16", "float32"])
@pytest.mark.parametrize("keep, count", [(0.01, 1), (0.01, 9), (0.3, 5), (1.0, 3)])
@pytest.mark.parametrize("alpha", [1.0, -0.37])
def test_subtract_matches_cpu(backend, native, value_dtype, keep, count, alpha):
    shapes = [5000, 9000, 3, 20_000, 0]
    if backend.large:
        shapes += [1_000_000, 70_000]
        count = count * 7 if count > 1 else count  # up to 63 rows
    before, after = random_layers(shapes, seed=count, step_size=1.0)
    k = ops.k_for(shapes, keep)
    rows = overlapping_rows(before, after, k, value_dtype, count, seed=count)
    verdict, got = cuda_subtract(backend, after, rows, k, alpha)
    expected_verdict, expected = cpu_subtract(native, after, rows, k, alpha)
    assert verdict is None and expected_verdict is None
    assert_same_bits(got, expected, "params")


def test_subtract_64_rows_on_a_gpu(backend, native):
    if not backend.large:
        pytest.skip("64 dense rows take minutes in the emulation; the other subtract tests cover its logic")
    shapes = [int(np.prod(shape)) for _, shape in resnet18_cifar_shapes()]
    before, after = random_layers(shapes, seed=64, step_size=1.0)
    k = ops.k_for(shapes, 0.01)
    rows = overlapping_rows(before, after, k, "float16", 64, seed=64)
    verdict, got = cuda_subtract(backend, after, rows, k)
    assert verdict is None
    assert_same_bits(got, cpu_subtract(native, after, rows, k)[1], "params")


def test_subtract_more_rows_than_a_tile_holds_at_once(backend, native):
    """300 rows: the apply kernel takes the rows' cursors 256 at a time."""
    shapes = [600, 9000]
    before, after = random_layers(shapes, seed=10, step_size=1.0)
    k = [60, 4500]
    rows = overlapping_rows(before, after, k, "float16", 300, seed=10)
    verdict, got = cuda_subtract(backend, after, rows, k, 0.25)
    assert verdict is None
    assert_same_bits(got, cpu_subtract(native, after, rows, k, 0.25)[1], "params")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=step(max_layers=4, max_numel=3000), value_dtype=st.sampled_from(["float16", "float32"]),
       count=st.integers(1, 5), alpha=st.sampled_from([1.0, -1.0, 0.5, 0.1]), seed=st.integers(0, 1000))
def test_subtract_matches_cpu_on_drawn_layers(backend, native, data, value_dtype, count, alpha, seed):
    before, after, k = data
    rows = overlapping_rows(before, after, k, value_dtype, count, seed)
    verdict, got = cuda_subtract(backend, after, rows, k, alpha)
    assert verdict is None
    assert_same_bits(got, cpu_subtract(native, after, rows, k, alpha)[1], "params")


def test_subtract_row_order_does_not_matter(backend, native):
    shapes = [5000, 30_000]
    before, after = random_layers(shapes, seed=8, step_size=1.0)
    k = [2500, 15_000]  # dense: rows share positions
    rows = overlapping_rows(before, after, k, "float16", 6, seed=8)
    results = []
    for perm in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2], [2, 2, 0, 1, 5, 3]):  # a repeated row too
        verdict, params = cuda_subtract(backend, after, Row(*(f[perm].contiguous() for f in rows)), k)
        assert verdict is None
        results.append(params)
    assert_same_bits(results[0], results[1], "params")
    _, cpu_params = cpu_subtract(native, after, Row(*(f[[2, 2, 0, 1, 5, 3]].contiguous() for f in rows)), k)
    assert_same_bits(results[2], cpu_params, "params")


def test_subtract_is_deterministic_across_runs(backend):
    shapes = [5000, 30_000, 70_000] if backend.large else [5000, 30_000]
    before, after = random_layers(shapes, seed=9, step_size=1.0)
    k = ops.k_for(shapes, 0.2)
    rows = overlapping_rows(before, after, k, "float32", 8, seed=9)
    _, first = cuda_subtract(backend, after, rows, k, 0.5)
    for _ in range(3 if backend.large else 1):
        _, again = cuda_subtract(backend, after, rows, k, 0.5)
        assert_same_bits(again, first, "params")


def test_subtract_bad_rows_get_the_cpu_verdict_and_change_nothing(backend, native):
    shapes, k, good = _good_stack()
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(n, generator=gen) for n in shapes]
    cases = _crafted_corruptions(k)
    rng = np.random.default_rng(5)
    for trial in range(12):  # random corruptions on top
        cases.append((f"random-{trial}", [(int(rng.integers(0, 4)), int(rng.integers(0, sum(k))),
                                           int(rng.choice([0, int(rng.integers(1, 30_000)), 2**32 - 1])))
                                          for _ in range(int(rng.integers(1, 4)))]))
    reasons = set()
    for name, edits in cases:
        index = good.index.clone()
        for row, entry, gap in edits:
            index[row, entry] = gap
        rows = Row(index, good.values, good.scales)
        expected_verdict, _ = cpu_subtract(native, params, rows, k)
        verdict, got = cuda_subtract(backend, params, rows, k)
        assert expected_verdict is not None, name
        assert verdict == expected_verdict, name
        assert_same_bits(got, params, f"params ({name})")
        reasons.add(verdict[2])
    assert reasons == {"repeats an index (a zero gap)", "decodes to an index past the layer's end"}


def test_subtract_of_no_rows_changes_nothing(backend):
    params = [torch.randn(100), torch.randn(7)]
    rows = Row(torch.empty(0, 5, dtype=torch.uint32), torch.empty(0, 5, dtype=torch.float16), torch.empty(0, 2))
    verdict, got = cuda_subtract(backend, params, rows, [3, 2])
    assert verdict is None
    assert_same_bits(got, params, "params")


def test_subtract_refuses_bad_arguments(backend):
    m = backend.module
    with pytest.raises(ValueError, match=r"k\[1\] = 9 must lie in \[0, 8\]"):
        m.subtract_sparse([1, 1], [4, 8], [1, 9], 1, 1, 1, 1, "float32", 1.0, 0)
    with pytest.raises(ValueError, match=r"params\[0\] is a null pointer"):
        m.subtract_sparse([0], [4], [1], 1, 1, 1, 1, "float32", 1.0, 0)
    with pytest.raises(ValueError, match="value_dtype"):
        m.subtract_sparse([1], [4], [1], 1, 1, 1, 1, "int8", 1.0, 0)


def test_the_backend_is_what_it_says(backend):
    assert backend.module.EMULATED == (backend.name == "emulated")
