"""The CUDA sources compile with nvcc, wherever nvcc is installed (so a compile error cannot land
unnoticed on a machine without a GPU): each source in csrc/cuda/ with exactly the flags setup.py
uses (csrc/cuda/build.py), for sm_80 and sm_90, all at once. Skipped only where there is no nvcc.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.kernels import cuda_build_helpers

ROOT = Path(__file__).resolve().parents[2]


def test_every_cuda_source_is_built():
    """A new .cu or .cpp in csrc/cuda/ must be listed in build.py's SOURCES (setup.py's list)."""
    found = {p.name for p in (ROOT / "csrc" / "cuda").iterdir() if p.suffix in {".cu", ".cpp"}}
    assert found == set(cuda_build_helpers().SOURCES)


@pytest.mark.slow  # nvcc, two architectures
def test_cuda_sources_compile_with_nvcc(tmp_path):
    helpers = cuda_build_helpers()
    nvcc = helpers.find_nvcc()
    if nvcc is None or shutil.which(nvcc) is None:
        pytest.skip("nvcc is not installed here (the CUDA sources are compiled where it is)")
    targets = ("80", "90")
    commands = [helpers.compile_command(nvcc, source, tmp_path / (Path(source).stem + ".o"), targets=targets)
                for source in helpers.SOURCES]
    for command in commands:
        assert "-gencode=arch=compute_80,code=sm_80" in command and "-gencode=arch=compute_90,code=sm_90" in command
    procs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for cmd in commands]
    failures = []
    for cmd, proc in procs:
        output, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"$ {' '.join(map(str, cmd))}\n{output}")
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    for source in helpers.SOURCES:
        assert (tmp_path / (Path(source).stem + ".o")).stat().st_size > 0
