"""Which kernels run on a device: one backend object per device, chosen in one place.

    backend = backend_for(device)   # CpuNative, CpuReference or DeviceKernels
    backend.device_path             # rows and snapshot stay on the device, copies are asynchronous
    backend.kernels                 # "native" (pyunlearn's own) or "torch" (torch ops, same bits)

On the CPU: the native extension (pyunlearn.kernels._native) when it imports, otherwise the torch
reference (with one warning); PYUNLEARN_REFERENCE=1 forces the reference. On a CUDA device: the
native CUDA module (pyunlearn.kernels._native_cuda, built with PYUNLEARN_CUDA=1) when it was built,
otherwise per-layer torch ops on the device (pyunlearn.kernels.torch_ops). Every backend gives
the same bits.

Tests run CPU tensors through the device path (and through the CUDA module's calls, compiled for
the CPU) with `cpu_backend(DeviceKernels(...))`, a context manager, instead of patching globals.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass

import torch

_REFERENCE_ENV = "PYUNLEARN_REFERENCE"
_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "cpu" / "cuda": the extension module, or None where it is missing
_cpu_override: list = []  # the innermost cpu_backend(...) in effect, if any


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def native_cpu_module():
    """pyunlearn.kernels._native, or None (with one warning) where it is missing or turned off
    (PYUNLEARN_REFERENCE=1)."""
    if _truthy(_REFERENCE_ENV):
        return None
    with _lock:
        if "cpu" not in _loaded:
            try:
                from . import _native as module
            except ImportError as exc:
                module = None
                warnings.warn(
                    f"pyunlearn's native kernels are not built ({exc}); using the slow torch reference. "
                    "Reinstall with `pip install -e .` and a C++ compiler to build them.",
                    RuntimeWarning, stacklevel=3)
            _loaded["cpu"] = module
    return _loaded["cpu"]


def native_cuda_module():
    """pyunlearn.kernels._native_cuda, or None where it was not built (imported on first use: a
    CPU-only user never loads the CUDA runtime)."""
    with _lock:
        if "cuda" not in _loaded:
            try:
                from . import _native_cuda as module
            except ImportError:
                module = None
            _loaded["cuda"] = module
    return _loaded["cuda"]


@dataclass(frozen=True)
class CpuNative:
    """The OpenMP kernels of the extension, on CPU tensors."""

    module: object
    kernels = "native"
    device_path = False


@dataclass(frozen=True)
class CpuReference:
    """The pure-torch reference kernels (pyunlearn.kernels.reference), on CPU tensors."""

    module = None
    kernels = "torch"
    device_path = False


@dataclass(frozen=True)
class DeviceKernels:
    """The device path: snapshot, pruning and rows on the device, copies to the host
    asynchronous. `module`: the native CUDA module (or its CPU emulation in tests); None runs
    torch ops on the device (pyunlearn.kernels.torch_ops)."""

    module: object = None
    device_path = True

    @property
    def kernels(self) -> str:
        return "torch" if self.module is None else "native"


def backend_for(device) -> "CpuNative | CpuReference | DeviceKernels":
    """The backend for tensors on `device` (a torch.device or its name). ValueError for a device
    type pyunlearn does not run on."""
    device = torch.device(device)
    if device.type == "cpu":
        if _cpu_override:
            return _cpu_override[-1]
        module = native_cpu_module()
        return CpuReference() if module is None else CpuNative(module)
    if device.type == "cuda":
        return DeviceKernels(native_cuda_module())
    raise ValueError(f"pyunlearn runs on 'cpu' and 'cuda' devices, not on {device}: move the model (and its "
                     "tensors) to one of them with .to(...)")


@contextlib.contextmanager
def cpu_backend(backend):
    """Within the block, CPU tensors use `backend` (tests: DeviceKernels() runs the device path
    on the CPU, DeviceKernels(emulated_module) the CUDA module's calls compiled for the CPU)."""
    if not isinstance(backend, (CpuNative, CpuReference, DeviceKernels)):
        raise TypeError(f"backend must be a CpuNative, CpuReference or DeviceKernels, got {type(backend).__name__}")
    _cpu_override.append(backend)
    try:
        yield backend
    finally:
        _cpu_override.remove(backend)
