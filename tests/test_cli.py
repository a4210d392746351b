"""The `pyunlearn` command: demo, inspect, forget."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

import pyunlearn as pu
from pyunlearn.cli import main
from pyunlearn.testing import recorded_store


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pyunlearn.cli", *args], capture_output=True, text=True)


def test_demo_runs_and_reports(tmp_path):
    out = _run("demo", "--epochs", "2", "--forget", "5", "--store", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for row in ("trained", "partial amnesiac (keep=0.01)", "dense amnesiac (keep=1)", "retrained without them"):
        assert row in out.stdout
    assert "smaller than dense float32 updates" in out.stdout
    assert (tmp_path / "partial.zarr" / "zarr.json").exists()


def _recorded_checkpoint(tmp_path):
    model = recorded_store(tmp_path / "s.zarr", keep=0.3, momentum=0.0, close=True).model
    torch.save(model.state_dict(), tmp_path / "final.pt")
    return model


def test_forget_on_a_checkpoint_matches_the_library(tmp_path, capsys):
    model = _recorded_checkpoint(tmp_path)
    (tmp_path / "ids.txt").write_text("1000\n1001, 1002\n424242\n")
    code = main(["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "final.pt"),
                 "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "forgot.pt")])
    assert code == 0
    assert "(1 never seen)" in capsys.readouterr().out
    got = torch.load(tmp_path / "forgot.pt", weights_only=True)
    assert set(got) == set(model.state_dict())
    expected = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    store = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    pu.ops.subtract_sparse_reference(expected, store.read(store.steps_for([1000, 1001, 1002]).steps), store.k)
    for layer, want in zip(store.layers, expected):
        assert torch.equal(got[layer.name], want)
    assert torch.equal(got["frozen"], model.frozen)
    # Forgetting more from the output checkpoint continues the ledger.
    np.save(tmp_path / "more.npy", np.array([1003]))
    assert main(["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "forgot.pt"),
                 "--ids", str(tmp_path / "more.npy"), "--out", str(tmp_path / "forgot2.pt")]) == 0


def test_inspect(tmp_path):
    _recorded_checkpoint(tmp_path)
    out = _run("inspect", str(tmp_path / "s.zarr"))
    assert out.returncode == 0, out.stderr
    assert "fc1.weight" in out.stdout and "dense float32 equivalent" in out.stdout and "ledger: 0 steps" in out.stdout


def test_errors_are_messages_not_tracebacks(tmp_path):
    _recorded_checkpoint(tmp_path)
    out = _run("forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "final.pt"),
               "--ids", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o.pt"))
    assert out.returncode == 1 and "--ids" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "bad.txt").write_text("12 x")
    out = _run("forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "final.pt"),
               "--ids", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "o.pt"))
    assert out.returncode == 1 and "integer sample IDs" in out.stderr
    out = _run("inspect", str(tmp_path / "missing.zarr"))
    assert out.returncode == 1 and "no update store" in out.stderr
    torch.save({"fc1.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    (tmp_path / "ok.txt").write_text("1000")
    out = _run("forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "wrong.pt"),
               "--ids", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "o.pt"))
    assert out.returncode == 1 and "checkpoint fc1.weight has shape (3, 3)" in out.stderr


def test_a_locked_store_is_one_line(tmp_path):
    _recorded_checkpoint(tmp_path)
    (tmp_path / "ids.txt").write_text("1000")
    holder = pu.UpdateStore.open(tmp_path / "s.zarr")
    with holder.writing():  # another writer holds the store
        out = _run("forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "final.pt"),
                   "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "o.pt"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("pyunlearn forget: error: ") and "one writer at a time" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()


def test_a_corrupt_store_is_one_line(tmp_path):
    _recorded_checkpoint(tmp_path)
    (tmp_path / "ids.txt").write_text("1000")
    for chunk in (tmp_path / "s.zarr" / "lookup").glob("*.ids/c/*"):  # the sample-ID index
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte: the chunk's crc32c no longer matches
        chunk.write_bytes(bytes(data))
    for command in (["inspect", str(tmp_path / "s.zarr")],
                    ["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "final.pt"),
                     "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "o.pt")]):
        out = _run(*command)
        if command[0] == "inspect":  # inspect reads no sample IDs: it still works
            assert out.returncode == 0, out.stderr
            continue
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "lookup/" in out.stderr and "damaged" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
