"""pytest-benchmark suite for the kernels; with timing disabled (the default run) each case
runs once, as a smoke test. Timed: pytest benchmarks/ --benchmark-enable
The table for the README comes from bench_kernels.py, which times everything in one run."""
from __future__ import annotations

import pytest

from _support import resnet18_cifar_shapes

import kernels  # a sibling: pytest puts this folder (it has no __init__.py) first on sys.path



def _quarter_width(shape):
    """Channels divided by 4 (at least 1): a ResNet-18 of ~0.7M values keeps the smoke run quick."""
    return tuple(max(1, d // 4) if i < 2 else d for i, d in enumerate(shape))


SHAPES = [(name, _quarter_width(shape)) for name, shape in resnet18_cifar_shapes()]


@pytest.fixture(scope="module", params=[0.01, 0.1])
def work(request):
    return kernels.make_workload(SHAPES, request.param, rows=8)


def test_prune_native(benchmark, work):
    state = kernels.Alternating(work)
    row = benchmark(kernels.prune_native, work, state)
    assert row.index.numel() == sum(work.k)


def test_prune_torch_baseline(benchmark, work):
    state = kernels.Alternating(work)
    out = benchmark(kernels.prune_torch, work, state)
    assert sum(idx.numel() for idx, _ in out) == sum(work.k)


def test_streaming_floor(benchmark, work):
    benchmark(kernels.StreamingFloor(work))


def test_subtract_native(benchmark, work):
    params = [a.clone() for a in work.after[0]]
    benchmark(kernels.subtract_native, work, params)


def test_subtract_index_add_baseline(benchmark, work):
    params = [a.clone() for a in work.after[0]]
    benchmark(kernels.subtract_index_add, work, params)


def test_native_and_baseline_subtract_agree(work):
    """The two contenders compute the same thing (to float rounding: their order differs)."""
    import torch

    native = [a.clone() for a in work.after[0]]
    baseline = [a.clone() for a in work.after[0]]
    kernels.subtract_native(work, native)
    kernels.subtract_index_add(work, baseline)
    for n, b in zip(native, baseline):
        torch.testing.assert_close(n, b, rtol=1e-5, atol=1e-6)
