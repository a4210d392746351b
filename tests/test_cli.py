"""The `pyunlearn` command: demo, inspect, forget."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.cli import main
from tests.support import recorded_store


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pyunlearn.cli", *args], capture_output=True, text=True)


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
    pu.kernels.subtract_sparse_reference(expected, store.read(store.steps_for([1000, 1001, 1002]).steps), store.k)
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
    assert "fc1.weight" in out.stdout and "dense float32 equivalent" in out.stdout and "ledger: 0 deletion requests, 0 steps removed" in out.stdout


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
    for chunk in (tmp_path / "s.zarr" / "sample_ids" / "c").iterdir():
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
        assert "sample_ids" in out.stderr and "damaged" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------- issue 14: version, early checks, checkpoints
def test_version():
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"pyunlearn {pu.__version__}"


@pytest.mark.parametrize("args, message", [
    (["--forget", "0"], "argument --forget: must be at least 1"),
    (["--epochs", "0"], "argument --epochs: must be at least 1"),
    (["--keep", "0"], r"argument --keep: must be in \(0, 1\]"),
    (["--keep", "1.5"], r"argument --keep: must be in \(0, 1\]"),
    (["--forget", "many"], "argument --forget: expected a whole number"),
])
def test_demo_arguments_are_refused_before_any_work(args, message):
    started = time.perf_counter()
    out = _run("demo", *args)
    assert out.returncode == 2 and re.search(message, out.stderr), out.stderr
    assert "trained in" not in out.stdout and time.perf_counter() - started < 30


def test_demo_refuses_forgetting_more_than_the_training_set_before_training():
    out = _run("demo", "--forget", "100000")
    assert out.returncode == 1, out.stderr
    assert "forget must be at most the 1438 training samples" in out.stderr and "trained in" not in out.stdout


def test_inspect_a_folder_without_stores(tmp_path):
    (tmp_path / "empty").mkdir()
    out = _run("inspect", str(tmp_path / "empty"))
    assert out.returncode == 1 and "no update store" in out.stderr


def _forget_cli(tmp_path, checkpoint, *extra):
    (tmp_path / "ids.txt").write_text("1000 1001")
    return main(["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(checkpoint),
                 "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "out.pt"), *extra])


def _expected_after_forgetting(tmp_path, model):
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    store = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    tensors = list(expected.values())
    pu.kernels.subtract_sparse_reference(tensors, store.read(store.steps_for([1000, 1001]).steps), store.k)
    return dict(zip(expected, tensors))


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "model_state_dict"])
def test_forget_a_checkpoint_that_wraps_the_state_dict(tmp_path, wrapper):
    model = _recorded_checkpoint(tmp_path)
    torch.save({wrapper: model.state_dict(), "epoch": 3, "note": "kept as it is"}, tmp_path / "wrapped.pt")
    assert _forget_cli(tmp_path, tmp_path / "wrapped.pt") == 0
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["epoch"] == 3 and got["note"] == "kept as it is" and set(got[wrapper]) == set(model.state_dict())
    for name, want in _expected_after_forgetting(tmp_path, model).items():
        assert torch.equal(got[wrapper][name], want)


def test_forget_a_lightning_checkpoint_with_a_prefix_and_a_key(tmp_path, capsys):
    """A Lightning checkpoint holds the LightningModule's state_dict under "state_dict"; a store
    created from the module's inner network ("net" here) has the names without "net.", which the
    command finds. --key picks an entry by hand."""
    model = _recorded_checkpoint(tmp_path)
    lightning_like = {"epoch": 1, "global_step": 14, "pytorch-lightning_version": "2.6.6",
                      "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
                      "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}
    torch.save(lightning_like, tmp_path / "last.ckpt")
    assert _forget_cli(tmp_path, tmp_path / "last.ckpt") == 0
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["pytorch-lightning_version"] == "2.6.6" and set(got["state_dict"]) == set(lightning_like["state_dict"])
    for name, want in _expected_after_forgetting(tmp_path, model).items():
        assert torch.equal(got["state_dict"][f"net.{name}"], want)

    torch.save({"ema": model.state_dict(), "weights": model.state_dict()}, tmp_path / "two.pt")
    capsys.readouterr()
    assert _forget_cli(tmp_path, tmp_path / "two.pt") == 1
    assert "it has 'ema', 'weights': name the entry with --key" in capsys.readouterr().err
    assert _forget_cli(tmp_path, tmp_path / "two.pt", "--key", "nope") == 1
    assert re.search(r"--key nope: .* has no entry 'nope'; it has 'ema', 'weights'", capsys.readouterr().err)
    assert _forget_cli(tmp_path, tmp_path / "two.pt", "--key", "ema") == 0
    assert set(torch.load(tmp_path / "out.pt", weights_only=True)) == {"ema", "weights"}


def test_the_package_ships_type_information_and_its_license():
    import importlib.resources
    from pathlib import Path

    assert importlib.resources.files("pyunlearn").joinpath("py.typed").is_file()
    root = Path(__file__).resolve().parents[1]
    assert 'pyunlearn = ["py.typed"]' in (root / "pyproject.toml").read_text()  # shipped in wheels too
    license_text = (root / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = { text = "Apache-2.0" }' in (root / "pyproject.toml").read_text()


def test_evaluate_progress_is_off_unless_asked(capsys):
    from pyunlearn import data
    from pyunlearn.evaluation import metrics
    from pyunlearn.models import DigitsCNN

    train_set, test_set = data.split(data.digits(), 0.2, seed=0)
    forget = train_set.subset(torch.arange(10))
    retain = train_set.without(forget.ids)
    metrics.evaluate(DigitsCNN(), forget=forget, retain=retain, test=test_set, mia_samples=50)
    assert "evaluating" not in capsys.readouterr().err  # standard error is not a terminal here
    metrics.evaluate(DigitsCNN(), forget=forget, retain=retain, test=test_set, mia_samples=50, progress=True)
    assert "evaluating: 100%" in capsys.readouterr().err
