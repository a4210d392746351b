"""Shared fixtures: the native module, layer-set builders, bitwise comparisons."""
from __future__ import annotations

import pytest
import torch

from pyunlearn import ops


def native_module():
    try:
        from pyunlearn import _native
    except ImportError:  # pragma: no cover - the build is part of the test command
        return None
    return _native


@pytest.fixture
def native():
    module = native_module()
    if module is None:
        pytest.fail("pyunlearn._native is not built: run `bash scripts/dev.sh test`, which builds it")
    return module


@pytest.fixture(params=["default", "all-parallel"])
def small_layer_limit(request, native):
    """Runs a test twice: with the built-in split between one-thread and all-thread layers, and
    with every layer of 16+ elements split across threads (so small test layers cover the
    parallel path too)."""
    saved = native._small_layer_limit()
    if request.param == "all-parallel":
        native._set_small_layer_limit(16)
    yield request.param
    native._set_small_layer_limit(saved)


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def assert_same_bits(xs, ys, what="tensor"):
    assert len(xs) == len(ys), f"{what}: {len(xs)} vs {len(ys)}"
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert same_bits(x, y), f"{what}[{i}] differs: {x} vs {y}"


def prune_both(before, after, k, value_dtype, refresh=True):
    """Runs native and reference on copies; returns (native row, reference row, native before,
    reference before)."""
    native_before = [b.clone() for b in before]
    reference_before = [b.clone() for b in before]
    native_row = ops.prune_topk(native_before, after, k, value_dtype, refresh)
    reference_row = ops.prune_topk_reference(reference_before, after, k, value_dtype, refresh)
    return native_row, reference_row, native_before, reference_before


def stack_rows(rows):
    return ops.Row(*(torch.stack(field) for field in zip(*rows)))
