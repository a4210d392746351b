"""The package as a user meets it: exports, version, the command, the fallback, the README."""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyunlearn

ROOT = Path(__file__).resolve().parents[1]


def test_all_names_exist():
    for name in pyunlearn.__all__:
        assert getattr(pyunlearn, name) is not None, name
    for name in pyunlearn.ops.__all__:
        assert getattr(pyunlearn.ops, name) is not None, name


def test_one_version():
    assert pyunlearn.__version__ == importlib.metadata.version("pyunlearn")


def test_import_does_not_load_the_extension():
    code = "import sys, pyunlearn; print('pyunlearn._native' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_selfcheck_command_reports_native_kernels():
    out = subprocess.run([sys.executable, "-m", "pyunlearn.cli", "selfcheck"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kernels: native (" in out.stdout
    assert out.stdout.count("bit for bit: yes") == 2


_FALLBACK = r"""
import sys, warnings
sys.modules["pyunlearn._native"] = None  # as if the extension had not been built
import torch
from pyunlearn import ops
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        row = ops.prune_topk([torch.zeros(8)], [torch.arange(8.0)], [2], "float32", refresh=False)
print(len([w for w in caught if "not built" in str(w.message)]), row.index.tolist(), ops.backend())
"""


def test_missing_extension_falls_back_with_one_warning():
    out = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1 [7, 1] reference (torch; extension not built)"


def test_env_variable_forces_the_reference():
    env = dict(os.environ, PYUNLEARN_REFERENCE="1")
    out = subprocess.run([sys.executable, "-m", "pyunlearn.cli", "selfcheck"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "kernels: reference (torch; PYUNLEARN_REFERENCE is set)" in out.stdout


def _readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("block", range(len(_readme_python_blocks())))
def test_readme_snippet_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_python_blocks()[block], f"README.md block {block}", "exec"), {})


def test_readme_opens_with_the_two_commands():
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("bash scripts/dev.sh")]
    assert lines[:2] == ["bash scripts/dev.sh main", "bash scripts/dev.sh test"]
    assert "bash scripts/dev.sh test" in (ROOT / ".ci" / "run").read_text()
