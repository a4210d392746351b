"""`pyunlearn forget` writes the new checkpoint atomically (also over --checkpoint) between a
pending and a committed ledger entry (issue 11): a failed save, a bad --out or a failed folder
sync leaves a ledger that describes a model on disk."""
from __future__ import annotations

import torch

import pyunlearn as pu
from pyunlearn.cli import main
from tests.support import TinyNet
from tests.support.stores import recorded_path as _recorded


def _cli_setup(tmp_path):
    model, path = _recorded(tmp_path)
    torch.save(model.state_dict(), tmp_path / "final.pt")
    (tmp_path / "ids.txt").write_text("1000")
    return path


def _forget(cli, tmp_path, out, checkpoint="final.pt", ids="ids.txt", store="s.zarr"):
    return cli("forget", "--store", str(tmp_path / store), "--checkpoint", str(tmp_path / checkpoint),
               "--ids", str(tmp_path / ids), "--out", str(out))


def test_cli_forget_with_a_bad_out_leaves_the_ledger_alone(cli, tmp_path):
    path = _cli_setup(tmp_path)
    out = _forget(cli, tmp_path, tmp_path / "no-such-folder" / "o.pt")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "--out" in out.stderr
    assert not pu.UpdateStore.open(path, mode="r").ledger.has_deletions
    assert _forget(cli, tmp_path, tmp_path / "o.pt").returncode == 0  # the next request is not refused


def test_cli_forget_writes_the_model_before_the_ledger(tmp_path, monkeypatch, capsys):
    """A save that fails midway (full disk, kill) leaves the input checkpoint intact and the
    ledger describing it, also when --out is --checkpoint."""
    path = _cli_setup(tmp_path)
    original = (tmp_path / "final.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    args = ["forget", "--store", str(path), "--checkpoint", str(tmp_path / "final.pt"),
            "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "final.pt")]
    assert main(args) == 1
    assert "No space left" in capsys.readouterr().err
    assert (tmp_path / "final.pt").read_bytes() == original
    assert not pu.UpdateStore.open(path, mode="r").ledger.has_deletions
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".final")) == []  # no temp left
    monkeypatch.setattr(torch, "save", real_save)
    assert main(args) == 0  # in place, atomically: the ledger now describes the new file
    model = TinyNet()
    model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))
    store = pu.UpdateStore.open(path)
    assert store.ledger.fingerprint == pu.kernels.fingerprint(store.check_model(model))


def test_cli_a_failed_folder_sync_after_the_rename_leaves_the_deletion_pending(tmp_path, monkeypatch, capsys):
    """Once the new checkpoint is renamed into place the deletion must not be rolled back: if
    making the rename durable fails, the entry stays pending, so the model on disk is accepted."""
    import os

    import pyunlearn.integrations.checkpoints as checkpoints

    path = _cli_setup(tmp_path)

    def failing_sync(folder):
        raise OSError(5, "EIO on directory fsync")

    monkeypatch.setattr(checkpoints, "sync_folder", failing_sync)  # the CLI syncs the folder after the save
    args = ["forget", "--store", str(path), "--checkpoint", str(tmp_path / "final.pt"),
            "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "final.pt")]
    assert main(args) == 1 and "EIO" in capsys.readouterr().err
    store = pu.UpdateStore.open(path)
    assert store.ledger.pending is not None
    model = TinyNet()
    model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))  # the new model, on disk
    pu.amnesiac_forget(model, store, [1001])  # accepted: settles the pending entry
    assert os.path.exists(tmp_path / "final.pt")
