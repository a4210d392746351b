"""Which kernels run where (pyunlearn.kernels.backends): the native CPU kernels, the torch
reference when the extension is missing or turned off, and the devices pyunlearn refuses."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pyunlearn.kernels import backends, ops
from pyunlearn.kernels.row import Row


def test_supports_says_which_kernels_run(native):
    cpu = ops.supports("cpu")
    assert (cpu.kernels, cpu.available, cpu.device) == ("native", True, torch.device("cpu"))
    cuda = ops.supports(torch.device("cuda", 0))
    assert cuda.available == torch.cuda.is_available()
    built = backends.native_cuda_module() is not None
    assert cuda.kernels == ("native" if built else "torch")
    if not built:
        assert "PYUNLEARN_CUDA=1" in cuda.detail
    for bad in ("meta", "mps"):
        with pytest.raises(ValueError, match=f"pyunlearn runs on 'cpu' and 'cuda' devices, not on {bad}"):
            ops.supports(bad)
    with pytest.raises(ValueError, match="device must name a torch device"):
        ops.supports("gpu-please")


def test_supports_on_the_cpu_without_the_extension(monkeypatch):
    monkeypatch.setenv("PYUNLEARN_REFERENCE", "1")
    assert ops.supports("cpu").kernels == "torch"


def test_a_device_pyunlearn_does_not_run_on_is_refused():
    meta = [torch.zeros(10, device="meta")]
    with pytest.raises(ValueError, match="pyunlearn runs on 'cpu' and 'cuda' devices, not on meta"):
        ops.prune_topk([torch.zeros(10, device="meta")], meta, [1])
    with pytest.raises(ValueError, match="pyunlearn runs on 'cpu' and 'cuda' devices, not on meta"):
        ops.subtract_sparse(meta, Row(torch.ones(1, dtype=torch.uint32), torch.ones(1), torch.ones(1)), [1])


_FALLBACK = r"""
import sys, warnings
sys.modules["pyunlearn.kernels._native"] = None  # as if the extension had not been built
import torch
from pyunlearn.kernels import ops
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        row = ops.prune_topk([torch.zeros(8)], [torch.arange(8.0)], [2], "float32", refresh=False)
print(len([w for w in caught if "not built" in str(w.message)]), row.index.tolist(), ops.backend())
"""


def test_missing_extension_falls_back_with_one_warning():
    out = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1 [7, 1] reference (torch; extension not built)"
