"""Builds pyunlearn._native: C++17 + OpenMP kernels over numpy buffers, bound with pybind11.

No libtorch and no torch at build time. The module runs on any x86-64: hot loops carry
function multi-versioning (see csrc/common.h). Environment switches:
  PYUNLEARN_NATIVE_TUNE=1   compile for this machine only (-march=native, no multi-versioning)
  PYUNLEARN_DEBUG=1         -O0 -g, for a debugger or sanitizer
"""
import os
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


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
    "pyunlearn._native",
    sorted(glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"],
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=compile_args,
    extra_link_args=["-fopenmp"],
    define_macros=define_macros,
)

setup(ext_modules=[native], cmdclass={"build_ext": build_ext})
