"""The command's errors: one line `pyunlearn <command>: error: ...`, exit 1, never a traceback:
bad files and IDs, a wrong checkpoint, a locked store, a damaged store."""
from __future__ import annotations

import pytest
import torch

import pyunlearn as pu
from tests.support import recorded_store
from tests.support.stores import recorded_path as _recorded


def _recorded_checkpoint(tmp_path):
    model = recorded_store(tmp_path / "s.zarr", keep=0.3, momentum=0.0, close=True).model
    torch.save(model.state_dict(), tmp_path / "final.pt")
    return model


def test_errors_are_messages_not_tracebacks(cli, tmp_path):
    _recorded_checkpoint(tmp_path)
    out = cli("forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "final.pt"),
               "--ids", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o.pt"))
    assert out.returncode == 1 and "--ids" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "bad.txt").write_text("12 x")
    out = cli("forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "final.pt"),
               "--ids", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "o.pt"))
    assert out.returncode == 1 and "integer sample IDs" in out.stderr
    out = cli("inspect", str(tmp_path / "missing.zarr"))
    assert out.returncode == 1 and "no update store" in out.stderr
    torch.save({"fc1.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    (tmp_path / "ok.txt").write_text("1000")
    out = cli("forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "wrong.pt"),
               "--ids", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "o.pt"))
    assert out.returncode == 1 and "checkpoint fc1.weight has shape (3, 3)" in out.stderr


def test_a_locked_store_is_one_line(cli, tmp_path):
    _recorded_checkpoint(tmp_path)
    (tmp_path / "ids.txt").write_text("1000")
    holder = pu.UpdateStore.open(tmp_path / "s.zarr")
    with holder.writing():  # another writer holds the store
        out = cli("forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "final.pt"),
                   "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "o.pt"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("pyunlearn forget: error: ") and "one writer at a time" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()


def test_a_corrupt_store_is_one_line(cli, tmp_path):
    _recorded_checkpoint(tmp_path)
    (tmp_path / "ids.txt").write_text("1000")
    for chunk in (tmp_path / "s.zarr" / "sample_ids" / "c").iterdir():
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte: the chunk's crc32c no longer matches
        chunk.write_bytes(bytes(data))
    for command in (["inspect", str(tmp_path / "s.zarr")],
                    ["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "final.pt"),
                     "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "o.pt")]):
        out = cli(*command)
        if command[0] == "inspect":  # inspect reads no sample IDs: it still works
            assert out.returncode == 0, out.stderr
            continue
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "sample_ids" in out.stderr and "damaged" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def _cli_setup(tmp_path):
    model, path = _recorded(tmp_path)
    torch.save(model.state_dict(), tmp_path / "final.pt")
    (tmp_path / "ids.txt").write_text("1000")
    return path


def _forget(cli, tmp_path, out, checkpoint="final.pt", ids="ids.txt", store="s.zarr"):
    return cli("forget", "--store", str(tmp_path / store), "--checkpoint", str(tmp_path / checkpoint),
               "--ids", str(tmp_path / ids), "--out", str(out))


@pytest.mark.parametrize("case", ["store-is-a-file", "id-past-int64", "pickled-object"])
def test_cli_bad_input_is_one_line(cli, tmp_path, case):
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
    out = _forget(cli, tmp_path, tmp_path / "o.pt", **kwargs)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("pyunlearn forget: error: ")
