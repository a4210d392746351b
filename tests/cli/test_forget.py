"""`pyunlearn forget`: the checkpoint it writes equals the library's result, whatever wraps the
state_dict (Lightning checkpoints, --key), chains over its own outputs (bfloat16 too), and
forgets by keys with the request in the audit trail that `inspect --ledger/--json` exports."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.cli import main
from tests.support import TinyNet, recorded_store
from tests.support.stores import small_recorded_run
from tests.support.timeline import SECRET, Year


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
    assert "applied (3 of 4 IDs found, 1 never seen by a recorded step)" in capsys.readouterr().out
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


def test_cli_forget_chains_on_a_bfloat16_checkpoint(tmp_path):
    """A model trained in bfloat16: the output keeps the dtype and is the input of the next forget."""
    torch.manual_seed(0)
    model = TinyNet().to(torch.bfloat16)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for first in range(1000, 1064, 16):
            rec.batch(range(first, first + 16))
            model(torch.randn(16, 8, dtype=torch.bfloat16)).float().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    store.close()
    torch.save(model.state_dict(), tmp_path / "final.pt")
    (tmp_path / "a.txt").write_text("1000")
    (tmp_path / "b.txt").write_text("1017")
    args = ["forget", "--store", str(tmp_path / "s.zarr")]
    assert main(args + ["--checkpoint", str(tmp_path / "final.pt"), "--ids", str(tmp_path / "a.txt"),
                        "--out", str(tmp_path / "one.pt")]) == 0
    assert torch.load(tmp_path / "one.pt", weights_only=True)["fc1.weight"].dtype == torch.bfloat16
    assert main(args + ["--checkpoint", str(tmp_path / "one.pt"), "--ids", str(tmp_path / "b.txt"),
                        "--out", str(tmp_path / "two.pt")]) == 0
    assert [r["status"] for r in pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").ledger.audit()] == ["applied"] * 2


def test_a_lower_precision_copy_is_not_the_model_training_ended_with(tmp_path, capsys):
    """A bfloat16 copy of a float32 run is another model: marking it final would put a model on
    the timeline that no recorded step produced (issue 24, case 5), so it is refused and the
    store is unchanged; the CLI refuses to forget from it, naming the models it would accept."""
    model, _ = small_recorded_run(tmp_path / "s.zarr")
    half = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save(half, tmp_path / "half.pt")
    before = (tmp_path / "s.zarr" / "zarr.json").read_bytes()
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    with pytest.raises(pu.ModelMismatchError, match="cannot be marked as their end"):
        store.mark_final(_bf16_model(half))
    store.close()
    assert (tmp_path / "s.zarr" / "zarr.json").read_bytes() == before
    (tmp_path / "a.txt").write_text("1000")
    assert main(["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "half.pt"),
                 "--ids", str(tmp_path / "a.txt"), "--out", str(tmp_path / "one.pt")]) == 1
    assert "is not on the store's timeline" in capsys.readouterr().err
    assert not (tmp_path / "one.pt").exists()


def _bf16_model(state):
    model = TinyNet().to(torch.bfloat16)
    model.load_state_dict(state)
    return model


def test_forget_by_keys_on_the_command_line_and_the_ledger_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(pu.keys.SECRET_ENV, SECRET)
    year = Year(tmp_path / "s.zarr")
    year.train([f"user{i}@example.com" for i in range(8)], seed=0)
    year.store.close()
    torch.save(year.model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "keys.txt").write_text("user1@example.com\nuser5@example.com\nnobody@example.com\n")
    assert main(["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "model.pt"),
                 "--keys", str(tmp_path / "keys.txt"), "--request-id", "TICKET-42",
                 "--out", str(tmp_path / "model.pt")]) == 0
    assert "request TICKET-42 applied (2 of 3 keys found, 1 never seen by a recorded step)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "s.zarr"), "--ledger"]) == 0
    table = capsys.readouterr().out
    assert "TICKET-42" in table and "applied" in table and "1 deletion requests" in table
    assert main(["inspect", str(tmp_path / "s.zarr"), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    (request,) = exported["requests"]
    assert request["request"] == "TICKET-42" and request["status"] == "applied" and request["keys"] == 3
    assert request["missing"] == 1 and request["version"] == pu.__version__ and request["time"].endswith("+00:00")
    assert [m["made_by"] for m in exported["models"]] == ["training", "deletion"]
    assert "example.com" not in json.dumps(exported)
