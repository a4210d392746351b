"""How pyunlearn.kernels._native_cuda is compiled, in one place for setup.py (the real build),
tests/test_cuda_build.py (compiles every source with exactly these flags wherever nvcc exists)
and tests/test_cuda_kernels.py (builds the CPU-emulated twin, see emulate.h).

No torch and no libtorch: nvcc compiles the kernels, the pybind11 bindings are plain C++, and
the CUDA runtime is linked statically (nvcc's default), so the module only needs a driver that
runs this toolkit's code.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent
SOURCES = ("prune.cu", "subtract.cu", "runtime.cu", "bindings.cpp")
HEADERS = ("kernels.h", "device.cuh", "emulate.h")
MODULE = "pyunlearn.kernels._native_cuda"
DEFAULT_ARCHS = ("80", "90")  # A100, H100/H200; PTX of the newest for later GPUs


def find_nvcc() -> str | None:
    """nvcc from $PYUNLEARN_NVCC, $CUDA_HOME/bin or the PATH; None if there is none."""
    explicit = os.environ.get("PYUNLEARN_NVCC")
    if explicit:
        return explicit
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def archs() -> tuple[str, ...]:
    """Compute capabilities to build for: $PYUNLEARN_CUDA_ARCHS ("80;90;100") or 80 and 90."""
    spec = os.environ.get("PYUNLEARN_CUDA_ARCHS", "").replace(",", ";").strip()
    found = tuple(a.strip() for a in spec.split(";") if a.strip())
    return found or DEFAULT_ARCHS


def gencode_flags(targets=None) -> list[str]:
    targets = tuple(targets or archs())
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in targets]
    newest = max(targets, key=lambda a: int("".join(ch for ch in a if ch.isdigit())))
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def include_dirs() -> list[str]:
    import pybind11  # only when building: a plain install without CUDA never gets here

    return [str(CSRC), pybind11.get_include(), sysconfig.get_paths()["include"]]


def compile_command(nvcc: str, source: str | Path, output: str | Path, *, targets=None, debug: bool = False) -> list[str]:
    """One nvcc invocation: `source` (a name in SOURCES or a path) → object file `output`."""
    source = Path(source) if Path(source).is_absolute() else HERE / source
    optimise = ["-O0", "-g", "-lineinfo"] if debug else ["-O3"]
    return [
        nvcc, "-c", str(source), "-o", str(output), "-std=c++17", *optimise,
        # Rounding as the CPU kernels do it: no fused multiply-add on the device or the host.
        "-fmad=false", "-Xcompiler", "-fPIC,-fvisibility=hidden,-ffp-contract=off",
        "--threads", "0",  # the -gencode targets in parallel
        *gencode_flags(targets), *(f"-I{d}" for d in include_dirs()),
    ]


def link_command(nvcc: str, objects, output: str | Path) -> list[str]:
    return [nvcc, "-shared", *map(str, objects), "-o", str(output), "-Xcompiler", "-fPIC"]


def _run_all(commands: list[list[str]]) -> None:
    """Runs the commands at once; raises RuntimeError naming each failure with its output."""
    procs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for cmd in commands]
    failures = []
    for cmd, proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"$ {' '.join(cmd)}\n{out}")
    if failures:
        raise RuntimeError("compiling pyunlearn's CUDA module failed:\n" + "\n".join(failures))


def build(output: str | Path, build_dir: str | Path, *, nvcc: str | None = None, debug: bool = False) -> Path:
    """Compiles SOURCES with nvcc (in parallel) and links the extension module at `output`."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or PYUNLEARN_NVCC, or put nvcc on the PATH)")
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    objects = [build_dir / (Path(s).stem + ".o") for s in SOURCES]
    _run_all([compile_command(nvcc, s, o, debug=debug) for s, o in zip(SOURCES, objects)])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _run_all([link_command(nvcc, objects, output)])
    return output


def up_to_date(output: str | Path) -> bool:
    """Whether `output` is newer than every CUDA source and header (a rebuild can be skipped)."""
    output = Path(output)
    if not output.exists():
        return False
    newest = max(p.stat().st_mtime for p in (HERE / name for name in SOURCES + HEADERS + ("build.py",)))
    return output.stat().st_mtime > newest


def build_emulated(build_dir: str | Path, *, name: str = "_native_cuda_emu", cxx: str | None = None) -> Path:
    """The same sources compiled as host C++ over emulate.h (no GPU, no CUDA toolkit): a module
    `name` whose kernels run on the CPU. For tests of the kernels' logic only."""
    cxx = cxx or os.environ.get("CXX") or shutil.which("g++") or "c++"
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-DPYUNLEARN_CUDA_EMULATE",
             f"-DPYUNLEARN_CUDA_MODULE_NAME={name}", *(f"-I{d}" for d in include_dirs())]
    objects = [build_dir / (Path(s).stem + ".o") for s in SOURCES]
    _run_all([[cxx, "-x", "c++", *flags, "-c", str(HERE / s), "-o", str(o)] for s, o in zip(SOURCES, objects)])
    output = build_dir / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    _run_all([[cxx, "-shared", *map(str, objects), "-o", str(output)]])
    return output
