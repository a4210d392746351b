"""`pyunlearn forget` writes what it read (issue 26): safetensors in, safetensors out; a Lightning
checkpoint stays one, with its recorder state naming the forgotten model, so fit(ckpt_path=...)
continues from it; --reset-optimizer empties the optimizer state and keeps its settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.cli import main
from tests.support import recorded_store


def _expected(store_path, model, ids):
    store = pu.UpdateStore.open(store_path, mode="r")
    expected = {layer.name: p.detach().clone() for layer, p in zip(store.layers, store.check_model(model))}
    tensors = list(expected.values())
    pu.kernels.subtract_sparse_reference(tensors, store.read(store.steps_for(ids).steps), store.k)
    return dict(zip(expected, tensors))


def test_safetensors_in_safetensors_out(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    recorded = recorded_store(tmp_path / "s.zarr", close=True)
    state = {k: v.contiguous() for k, v in recorded.model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt", "note": "kept"})
    np.save(tmp_path / "ids.npy", np.array([1000, 1001]))
    args = ["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "model.safetensors"),
            "--ids", str(tmp_path / "ids.npy")]
    assert main(args + ["--out", str(tmp_path / "out.pt")]) == 1  # a torch file out of a safetensors one: refused
    assert "name it *.safetensors" in capsys.readouterr().err
    assert [row["status"] for row in pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").ledger.audit()] == ["undone"]
    assert main(args + ["--out", str(tmp_path / "out.safetensors")]) == 0
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert set(got) == set(state) and torch.equal(got["frozen"], state["frozen"])
    for name, want in _expected(tmp_path / "s.zarr", recorded.model, [1000, 1001]).items():
        assert torch.equal(got[name], want), name


def test_a_plain_checkpoint_keeps_its_structure_and_its_recorder_state_follows(tmp_path, capsys):
    recorded = recorded_store(tmp_path / "s.zarr")
    store, model, optimizer = recorded.store, recorded.model, recorded.optimizer
    with pu.UpdateRecorder(model, optimizer, store) as rec:  # a resumable checkpoint, as the docs show it
        checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "recorder": rec.state_dict()}
    store.close()
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    np.save(tmp_path / "ids.npy", np.array([1003]))
    assert main(["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "ckpt.pt"),
                 "--ids", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "out.pt"), "--reset-optimizer"]) == 0
    assert "1 recorder state updated" in capsys.readouterr().out
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["optimizer"]["state"] == {} and out["optimizer"]["param_groups"] == checkpoint["optimizer"]["param_groups"]
    resumed = type(model)()
    resumed.load_state_dict(out["model"])
    fresh = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    fresh.load_state_dict(out["optimizer"])
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    with pu.UpdateRecorder(resumed, fresh, store, state=out["recorder"]) as rec:  # training goes on from it
        ids, x, y = recorded.data
        rec.batch(ids[40:56])
        fresh.zero_grad()
        torch.nn.functional.cross_entropy(resumed(x[40:56]), y[40:56]).backward()
        fresh.step()
    assert store.steps == recorded.steps + 1


@pytest.mark.slow
def test_cli_forget_on_a_lightning_checkpoint_then_fit_continues(tmp_path, capsys):
    import lightning

    from pyunlearn.integrations.lightning import RecordUpdates
    from tests.support import tiny_data, tiny_lightning_module

    ids, x, y = tiny_data(64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, x, y), batch_size=16, shuffle=False)

    def trainer(epochs, *callbacks):
        return lightning.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, default_root_dir=tmp_path,
                                 callbacks=[RecordUpdates(str(tmp_path / "s.zarr"), create=dict(keep=0.5)), *callbacks])

    saving = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="epoch1", save_top_k=-1)
    trainer(1, saving).fit(tiny_lightning_module()(), loader)  # the checkpoint carries the recorder state
    np.save(tmp_path / "ids.npy", np.array([1003]))
    assert main(["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "epoch1.ckpt"),
                 "--ids", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "forgotten.ckpt")]) == 0
    assert "1 recorder state updated" in capsys.readouterr().out
    keep = [i for i in range(64) if i != 3]  # the forgotten sample leaves the data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids[keep], x[keep], y[keep]), batch_size=16)
    trainer(2).fit(tiny_lightning_module()(), loader, ckpt_path=str(tmp_path / "forgotten.ckpt"))
    store = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    assert store.steps == 4 + 4 and [r.kind for r in store.ledger.records][-1] == "segment"
