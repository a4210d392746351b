"""`pyunlearn forget`: the model written before the ledger (atomically, also over --checkpoint),
bad input as one line, chaining checkpoints."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import pyunlearn as pu
from pyunlearn.cli import main
from tests.support import TinyNet
from tests.support.stores import recorded_path as _recorded
from tests.support.stores import small_recorded_run


def _cli_setup(tmp_path):
    model, path = _recorded(tmp_path)
    torch.save(model.state_dict(), tmp_path / "final.pt")
    (tmp_path / "ids.txt").write_text("1000")
    return path


def _forget(tmp_path, out, checkpoint="final.pt", ids="ids.txt", store="s.zarr"):
    return subprocess.run([sys.executable, "-m", "pyunlearn.cli", "forget", "--store", str(tmp_path / store),
                           "--checkpoint", str(tmp_path / checkpoint), "--ids", str(tmp_path / ids),
                           "--out", str(out)], capture_output=True, text=True)


def test_cli_forget_with_a_bad_out_leaves_the_ledger_alone(tmp_path):
    path = _cli_setup(tmp_path)
    out = _forget(tmp_path, tmp_path / "no-such-folder" / "o.pt")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "--out" in out.stderr
    assert not pu.UpdateStore.open(path, mode="r").ledger.has_deletions
    assert _forget(tmp_path, tmp_path / "o.pt").returncode == 0  # the next request is not refused


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


@pytest.mark.parametrize("case", ["store-is-a-file", "id-past-int64", "pickled-object"])
def test_cli_bad_input_is_one_line(tmp_path, case):
    _cli_setup(tmp_path)
    kwargs = {}
    if case == "store-is-a-file":
        (tmp_path / "file.zarr").write_text("x")
        kwargs["store"] = "file.zarr"
    elif case == "id-past-int64":
        (tmp_path / "big.txt").write_text(str(2**63))
        kwargs["ids"] = "big.txt"
    else:
        torch.save({"fc1.weight": torch.zeros(1), "extra": pu.ForgetReport}, tmp_path / "pickled.pt")
        kwargs["checkpoint"] = "pickled.pt"
    out = _forget(tmp_path, tmp_path / "o.pt", **kwargs)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("pyunlearn forget: error: ")


def test_cli_a_failed_folder_sync_after_the_rename_leaves_the_deletion_pending(tmp_path, monkeypatch, capsys):
    """Once the new checkpoint is renamed into place the deletion must not be rolled back: if
    making the rename durable fails, the entry stays pending, so the model on disk is accepted."""
    import os

    import pyunlearn.cli as cli

    path = _cli_setup(tmp_path)

    def failing_sync(folder):
        raise OSError(5, "EIO on directory fsync")

    monkeypatch.setattr(cli, "_sync_folder", failing_sync)
    args = ["forget", "--store", str(path), "--checkpoint", str(tmp_path / "final.pt"),
            "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "final.pt")]
    assert main(args) == 1 and "EIO" in capsys.readouterr().err
    store = pu.UpdateStore.open(path)
    assert store.ledger.pending is not None
    model = TinyNet()
    model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))  # the new model, on disk
    pu.amnesiac_forget(model, store, [1001])  # accepted: settles the pending entry
    assert os.path.exists(tmp_path / "final.pt")


def test_cli_forget_chains_on_a_bfloat16_checkpoint(tmp_path):
    model, _ = small_recorded_run(tmp_path / "s.zarr")
    half = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save(half, tmp_path / "final.pt")
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    store.mark_final(_bf16_model(half))  # the deployed model is the bfloat16 one
    store.close()
    (tmp_path / "a.txt").write_text("1000")
    (tmp_path / "b.txt").write_text("1001")
    args = ["forget", "--store", str(tmp_path / "s.zarr")]
    assert main(args + ["--checkpoint", str(tmp_path / "final.pt"), "--ids", str(tmp_path / "a.txt"),
                        "--out", str(tmp_path / "one.pt")]) == 0
    assert torch.load(tmp_path / "one.pt", weights_only=True)["fc1.weight"].dtype == torch.bfloat16
    assert main(args + ["--checkpoint", str(tmp_path / "one.pt"), "--ids", str(tmp_path / "b.txt"),
                        "--out", str(tmp_path / "two.pt")]) == 0


def _bf16_model(state):
    model = TinyNet().to(torch.bfloat16)
    model.load_state_dict(state)
    return model
