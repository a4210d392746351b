"""Fixtures of the kernel tests."""
from __future__ import annotations

import pytest

from tests.support.kernels import prune_tuning


@pytest.fixture(params=["default", "all-parallel"])
def small_layer_limit(request, native):
    """Runs a test twice: with the built-in thread split, and with every layer of 16+ elements
    split across all threads (so small test layers cover the parallel path too)."""
    if request.param == "default":
        yield request.param
    else:
        with prune_tuning(native, 16):
            yield request.param
