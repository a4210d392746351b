"""Builds pyunlearn.kernels._native: C++17 + OpenMP kernels over numpy buffers, bound with pybind11;
and, where asked for or usable, pyunlearn.kernels._native_cuda: the CUDA twins (csrc/cuda/).

No libtorch and no torch at build time. The module runs on any x86-64: hot loops carry
function multi-versioning (see csrc/common.h). Environment switches:
  PYUNLEARN_NATIVE_TUNE=1   compile for this machine only (-march=native, no multi-versioning)
  PYUNLEARN_DEBUG=1         -O0 -g, for a debugger or sanitizer

The CUDA module (nvcc; pybind11 over device pointers, the CUDA runtime linked statically):
  PYUNLEARN_CUDA=1          build it; the install fails if nvcc is missing or the build fails
  PYUNLEARN_CUDA=0          never build it
  unset                     build it only where nvcc is found AND a CUDA driver reports a GPU
                            (libcuda answers cuInit and counts at least one device); if that
                            build fails, warn and install without it. A machine with nvcc but
                            no GPU (a CI runner, a build container) builds exactly what it built
                            before: set PYUNLEARN_CUDA=1 there to build the module anyway.
  PYUNLEARN_CUDA_ARCHS      compute capabilities, "80;90" by default (A100, H100/H200), plus
                            PTX of the newest for later GPUs
  CUDA_HOME / PYUNLEARN_NVCC  where nvcc is, if it is not on the PATH
The flags live in csrc/cuda/build.py, shared with tests/test_cuda_build.py.
"""
import importlib.util
import os
import sys
from glob import glob
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import Extension, setup


def _flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


compile_args = ["-fopenmp", "-ffp-contract=off"]  # no FMA contraction: native == torch reference, bit for bit
define_macros = []
if _flag("PYUNLEARN_DEBUG"):
    compile_args += ["-O0", "-g"]
else:
    compile_args += ["-O3"]
if _flag("PYUNLEARN_NATIVE_TUNE"):
    compile_args += ["-march=native"]
    define_macros += [("PYUNLEARN_NATIVE_TUNE", "1")]

native = Pybind11Extension(
    "pyunlearn.kernels._native",
    sorted(glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"],
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=compile_args,
    extra_link_args=["-fopenmp"],
    define_macros=define_macros,
)

CUDA_MODULE = "pyunlearn.kernels._native_cuda"
CUDA_BUILD_HELPERS = Path(__file__).resolve().parent / "csrc" / "cuda" / "build.py"


def _cuda_build_helpers():
    spec = importlib.util.spec_from_file_location("pyunlearn_cuda_build", CUDA_BUILD_HELPERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_visible():
    """Whether a CUDA driver is installed and reports at least one device (no CUDA toolkit or
    torch needed: libcuda alone)."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    try:
        return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except (AttributeError, OSError):
        return False


def _cuda_mode():
    """'required', 'optional' or None (see the docstring)."""
    value = os.environ.get("PYUNLEARN_CUDA", "").strip().lower()
    if value in {"0", "false", "no", "off"}:
        return None
    if value in {"1", "true", "yes", "on"}:
        return "required"
    if value:
        raise SystemExit(f"PYUNLEARN_CUDA={value!r}: use 1 (build the CUDA module), 0 (never) or leave it unset")
    if not CUDA_BUILD_HELPERS.exists():  # a source tree without csrc/cuda/
        return None
    return "optional" if _cuda_build_helpers().find_nvcc() and _gpu_visible() else None


class BuildExt(build_ext):
    """pybind11's build_ext; the CUDA module, if listed, is compiled and linked by nvcc."""

    def build_extensions(self):
        cuda = [ext for ext in self.extensions if ext.name == CUDA_MODULE]
        self.extensions = [ext for ext in self.extensions if ext.name != CUDA_MODULE]
        super().build_extensions()
        for ext in cuda:
            try:
                self._build_cuda(ext)
                self.extensions.append(ext)
            except Exception as exc:  # noqa: BLE001 - an optional build never fails the install
                if CUDA_MODE == "required":
                    raise
                print(f"WARNING: pyunlearn's CUDA module was not built ({exc}); installing the CPU kernels only. "
                      "Set PYUNLEARN_CUDA=1 to make this an error, PYUNLEARN_CUDA=0 to skip it.", file=sys.stderr)

    def _build_cuda(self, ext):
        helpers = _cuda_build_helpers()
        output = self.get_ext_fullpath(ext.name)
        if not self.force and helpers.up_to_date(output):
            return
        print(f"building {ext.name} with nvcc for sm_{', sm_'.join(helpers.archs())}", file=sys.stderr)
        helpers.build(output, Path(self.build_temp) / "cuda", debug=_flag("PYUNLEARN_DEBUG"))


CUDA_MODE = _cuda_mode()
ext_modules = [native]
if CUDA_MODE is not None:
    cuda_dir = Path("csrc") / "cuda"
    ext_modules.append(Extension(CUDA_MODULE, [str(cuda_dir / name) for name in _cuda_build_helpers().SOURCES]))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
