"""Fixtures shared across the test folders: the native module, the device axis (with the CUDA
kernels' CPU emulation), the benchmark scripts, S3 on loopback. Helpers that are not fixtures
live in tests/support/; fixtures one folder alone uses, in that folder's conftest.py."""
from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path

import pytest
import torch

from pyunlearn.kernels import backends
from tests.support import DEVICES, LoopbackS3
from tests.support.kernels import cuda_build_helpers, native_module
from tests.support.shared import made_once

ROOT = Path(__file__).resolve().parents[1]
S3_SECRET = "never-print-this-secret"


def pytest_configure(config):
    # Processes the tests start (DDP ranks, killed writers, torchrun) import tests.support too.
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


@pytest.fixture
def native():
    module = native_module()
    if module is None:
        pytest.fail("pyunlearn.kernels._native is not built: run `bash scripts/dev.sh test`, which builds it")
    return module


@pytest.fixture(scope="session")
def emulated_cuda(tmp_path_factory):
    """pyunlearn.kernels._native_cuda's sources compiled for the CPU over csrc/cuda/emulate.h (each CUDA
    thread a fiber): the same calls as the real module, on CPU pointers. Built once a session."""
    import importlib.util
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.fail("no C++ compiler to build the emulated CUDA kernels (the native build needs one too)")
    folder = made_once(tmp_path_factory, "cuda-emulated", cuda_build_helpers().build_emulated)
    (path,) = folder.glob("_native_cuda_emu*.so")
    spec = importlib.util.spec_from_file_location("_native_cuda_emu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.EMULATED
    return module


@contextlib.contextmanager
def _on_device(param, request):
    """The torch.device the tensors of a device-axis case go to, with the CPU's backend set for
    the cases that run the device path on CPU tensors."""
    if param == "cpu-emulated-cuda":
        with backends.cpu_backend(backends.DeviceKernels(request.getfixturevalue("emulated_cuda"))):
            yield torch.device("cpu")
        return
    if param == "cuda":
        if "cuda" not in DEVICES:
            pytest.skip("no CUDA device visible to torch")
        yield torch.device("cuda")
        return
    if param == "cpu-device-path":
        with backends.cpu_backend(backends.DeviceKernels()):
            yield torch.device("cpu")
        return
    yield torch.device("cpu")


@pytest.fixture(params=["cpu", "cpu-device-path", "cpu-emulated-cuda", "cuda"])
def device(request):
    """The device axis of the recorder and forgetting tests (tests/support's DEVICES): "cpu"
    (the native CPU kernels), "cuda" (skipped where torch sees no GPU), and two that run
    everything around the CUDA-only calls here: "cpu-device-path", CPU tensors forced through
    the device path with the torch kernels (reused buffers, the recorder's asynchronous hand-off
    with a no-op event), and "cpu-emulated-cuda", the same with the native CUDA module's calls
    (pointers, status, lent workspace) going to its CPU emulation. Returns the torch.device the
    tensors go to."""
    with _on_device(request.param, request) as where:
        yield where


@pytest.fixture(params=["cpu-device-path", "cpu-emulated-cuda", "cuda"])
def device_path(request):
    """The device path alone (see `device`): for tests that compare it with the native CPU
    kernels, which on "cpu" would be compared with themselves."""
    with _on_device(request.param, request) as where:
        yield where


@pytest.fixture
def benchmark_script(monkeypatch):
    """Imports benchmarks/<name>.py as `python benchmarks/<name>.py` would see it: with that
    folder first on sys.path for this test only, so its imports of sibling scripts resolve."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback (moto's server) with one bucket; yields storage_options."""
    pytest.importorskip("moto", reason="S3 tests need the test extra (moto[server], s3fs)")
    server = LoopbackS3("pyunlearn-tests", secret=S3_SECRET)
    yield server.options
    server.stop()
