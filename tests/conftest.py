"""Shared fixtures: the native module, layer-set builders, bitwise comparisons."""
from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path

import pytest
import torch

from pyunlearn.kernels import backends, ops


ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Processes the tests start (DDP ranks, killed writers, torchrun) import tests.support too.
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def native_module():
    try:
        from pyunlearn.kernels import _native
    except ImportError:  # pragma: no cover - the build is part of the test command
        return None
    return _native


@pytest.fixture
def native():
    module = native_module()
    if module is None:
        pytest.fail("pyunlearn.kernels._native is not built: run `bash scripts/dev.sh test`, which builds it")
    return module


@contextlib.contextmanager
def prune_tuning(native, small_layer_limit, serial_below=0):
    saved = native._prune_tuning()
    native._set_prune_tuning(small_layer_limit, serial_below)
    try:
        yield
    finally:
        native._set_prune_tuning(*saved)


@pytest.fixture(params=["default", "all-parallel"])
def small_layer_limit(request, native):
    """Runs a test twice: with the built-in thread split, and with every layer of 16+ elements
    split across all threads (so small test layers cover the parallel path too)."""
    if request.param == "default":
        yield request.param
    else:
        with prune_tuning(native, 16):
            yield request.param


@pytest.fixture(scope="session")
def emulated_cuda(tmp_path_factory):
    """pyunlearn.kernels._native_cuda's sources compiled for the CPU over csrc/cuda/emulate.h (each CUDA
    thread a fiber): the same calls as the real module, on CPU pointers. Built once a session."""
    import importlib.util
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.fail("no C++ compiler to build the emulated CUDA kernels (the native build needs one too)")
    path = cuda_build_helpers().build_emulated(tmp_path_factory.mktemp("cuda-emulated"))
    spec = importlib.util.spec_from_file_location("_native_cuda_emu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.EMULATED
    return module


@contextlib.contextmanager
def _on_device(param, request):
    """The torch.device the tensors of a device-axis case go to, with the CPU's backend set for
    the cases that run the device path on CPU tensors."""
    from tests.support import DEVICES

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
    """The device axis of the recorder and forgetting tests (tests/support.py's DEVICES): "cpu"
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


@pytest.fixture
def benchmark_script(monkeypatch):
    """Imports benchmarks/<name>.py as `python benchmarks/<name>.py` would see it: with that
    folder first on sys.path for this test only, so its imports of sibling scripts resolve."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback (moto's server) with one bucket; yields storage_options."""
    pytest.importorskip("moto", reason="S3 tests need the test extra (moto[server], s3fs)")
    from tests.support import LoopbackS3

    server = LoopbackS3("pyunlearn-tests", secret=S3_SECRET)
    yield server.options
    server.stop()


S3_SECRET = "never-print-this-secret"


def mix64(x: int) -> int:
    """csrc/cpu/prune.cpp's scramble of sample positions (the CUDA twin uses the same),
    replicated to build a layer the sampler is wrong about."""
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def cuda_build_helpers():
    """csrc/cuda/build.py (the nvcc flags setup.py uses), loaded by path."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "pyunlearn_cuda_build", Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def misleading_layer(n: int, groups: int):
    """A layer whose update is 1 exactly where the kernels' position sampler looks (16 entries
    in each of `groups` groups, placed by mix64) and 0 elsewhere: the sampled floor then admits
    fewer entries than k, so the kernel must fall back to an exact pass."""
    import torch

    delta = torch.zeros(n)
    for g in range(groups):
        start = g * n // groups
        room = (g + 1) * n // groups - start - 16
        if room > 0:
            start += mix64(g) % room
        delta[start : min(n, start + 16)] = 1.0
    return delta
