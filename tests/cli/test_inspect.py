"""`pyunlearn inspect`: a store's size, layers and ledger; a folder without stores."""
from __future__ import annotations

from tests.support import recorded_store


def _recorded_checkpoint(tmp_path):
    model = recorded_store(tmp_path / "s.zarr", keep=0.3, momentum=0.0, close=True).model
    return model


def test_inspect(cli, tmp_path):
    _recorded_checkpoint(tmp_path)
    out = cli("inspect", str(tmp_path / "s.zarr"))
    assert out.returncode == 0, out.stderr
    assert "fc1.weight" in out.stdout and "dense float32 equivalent" in out.stdout and "audit log: 1 records, 0 deletion requests, 0 steps removed" in out.stdout


def test_inspect_a_folder_without_stores(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = cli("inspect", str(tmp_path / "empty"))
    assert out.returncode == 1 and "no update store" in out.stderr
