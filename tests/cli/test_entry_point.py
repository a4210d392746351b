"""The command as installed, in processes of its own: --version, selfcheck, the demo end to end
(with `inspect` on its folder), and a forget through the `pyunlearn` console script. The other
CLI tests call pyunlearn.cli.main in the test process (tests/cli/conftest.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import pyunlearn as pu
from tests.support import recorded_store


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pyunlearn.cli", *args], capture_output=True, text=True)


def test_version():
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"pyunlearn {pu.__version__}"


def test_selfcheck_command_reports_native_kernels():
    out = subprocess.run([sys.executable, "-m", "pyunlearn.cli", "selfcheck"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kernels: native (" in out.stdout
    gpu = torch.cuda.is_available()  # then the same checks run on the GPU too
    assert out.stdout.count("bit for bit: yes") == (4 if gpu else 2)
    assert ("cuda: native kernels" in out.stdout or "cuda: torch kernels" in out.stdout) if gpu else \
        "cuda: no GPU visible to torch" in out.stdout


def test_demo_runs_and_reports(tmp_path):
    out = _run("demo", "--epochs", "2", "--forget", "5", "--store", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for row in ("trained", "partial amnesiac (keep=0.01)", "dense amnesiac (keep=1)", "retrained without them"):
        assert row in out.stdout
    assert "smaller than dense float32 updates" in out.stdout
    assert (tmp_path / "partial.zarr" / "zarr.json").exists()
    # The column is the accuracy on the forgotten samples, and says so.
    assert "acc. forgotten %" in out.stdout and "accuracy on the forgotten samples" in out.stdout
    assert "training (recording)" not in out.stderr  # not a terminal: no progress bars
    # inspect on the demo's folder finds both stores.
    found = _run("inspect", str(tmp_path))
    assert found.returncode == 0, found.stderr
    assert f"== {tmp_path / 'dense.zarr'} ==" in found.stdout and f"== {tmp_path / 'partial.zarr'} ==" in found.stdout
    assert found.stdout.count("dense float32 equivalent") == 2
    # The next step it prints runs as printed: a forget from the checkpoint it left, then the log.
    commands = [line.split() for line in out.stdout.splitlines() if line.startswith("  pyunlearn ")]
    assert [c[1] for c in commands] == ["forget", "inspect"]
    forgot = _run(*commands[0][1:])
    assert forgot.returncode == 0, forgot.stderr
    assert "applied (3 of 3 IDs found)" in forgot.stdout and (tmp_path / "forgotten.pt").exists()
    table = _run(*commands[1][1:])
    assert table.returncode == 0 and table.stdout.count("deletion  applied") == 2


def test_the_installed_command_forgets_end_to_end(tmp_path):
    """`pyunlearn forget` as installed (the console script pip made from [project.scripts]):
    the checkpoint it writes holds the library's result."""
    import shutil

    command = shutil.which("pyunlearn", path=str(Path(sys.executable).parent)) or shutil.which("pyunlearn")
    assert command is not None, "the pyunlearn command is not installed (pip install -e .)"
    model = recorded_store(tmp_path / "s.zarr", keep=0.3, momentum=0.0, close=True).model
    torch.save(model.state_dict(), tmp_path / "final.pt")
    (tmp_path / "ids.txt").write_text("1000 1001")
    out = subprocess.run([command, "forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "final.pt"),
                          "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "out.pt")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "applied (2 of 2 IDs found)" in out.stdout
    expected = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    store = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    pu.kernels.subtract_sparse_reference(expected, store.read(store.steps_for([1000, 1001]).steps), store.k)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for layer, want in zip(store.layers, expected):
        assert torch.equal(got[layer.name], want)
    assert store.ledger.fingerprint == pu.kernels.fingerprint(expected)
