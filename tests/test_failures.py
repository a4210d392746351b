"""Regressions from review: stale handles, ledger safety, locks, failed writes, NaN steps."""
from __future__ import annotations

import pytest
import torch

import pyunlearn as pu
from pyunlearn.cli import main
from tests.support import TinyNet, recorded_store, tiny_data, tiny_training


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _recorded(path):
    run = recorded_store(path, keep=0.3, momentum=0.0, n=64, epochs=1, close=True)
    return run.model, run.optimizer


def _row(store, model):
    params = [p.detach() for p in store.check_model(model)]
    return pu.kernels.prune_topk([p.clone() for p in params], [p + 1 for p in params], store.k, refresh=False)


def test_a_handle_opened_earlier_does_not_overwrite_newer_commits(tmp_path):
    model, optimizer = _recorded(tmp_path / "s.zarr")
    early = pu.UpdateStore.open(tmp_path / "s.zarr")
    other = pu.UpdateStore.open(tmp_path / "s.zarr")
    other.truncate(4)
    with pu.UpdateRecorder(model, optimizer, other) as rec:
        tiny_training(model, optimizer, tiny_data(32, first_id=5000), epochs=1, recorder=rec)
    other.close()
    assert early.steps == 4  # its view is old...
    early.append(_row(early, model), [9999])
    early.flush()  # ...but writing starts from what is on disk
    fresh = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    assert fresh.steps == 7
    assert fresh.steps_for([5000, 9999]).missing.size == 0


def test_training_continues_only_from_the_model_a_deletion_produced(tmp_path):
    model, optimizer = _recorded(tmp_path / "s.zarr")
    final = {k: v.clone() for k, v in model.state_dict().items()}
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    pu.amnesiac_forget(model, store, [1000])
    stale = TinyNet()
    stale.load_state_dict(final)  # still holds the deleted sample's updates
    stale_optimizer = torch.optim.SGD(stale.parameters(), lr=0.1)
    rec = pu.UpdateRecorder(stale, stale_optimizer, store)
    rec.batch([1])
    stale(torch.randn(2, 8)).sum().backward()
    with pytest.raises(pu.RecorderError, match="deletion requests came in after this model was made"):
        stale_optimizer.step()
    rec.remove()
    rec = pu.UpdateRecorder(model, optimizer, store)  # the model after the deletion: recording goes on
    rec.batch([1])
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    rec.close()
    assert store.steps == store.ledger.models[-1].steps and store.ledger.models[-1].made_by == "training"


def test_forgetting_twice_with_fresh_handles(tmp_path):
    model, _ = _recorded(tmp_path / "s.zarr")
    pu.amnesiac_forget(model, pu.UpdateStore.open(tmp_path / "s.zarr"), [1000])
    report = pu.amnesiac_forget(model, pu.UpdateStore.open(tmp_path / "s.zarr"), [1001])  # the lock was given back
    assert report.ledger_steps >= 1


def test_overwrite_refuses_a_store_in_use(tmp_path):
    writer = pu.UpdateStore.create(tmp_path / "s.zarr", TinyNet())
    with pytest.raises(pu.StoreLockedError):
        pu.UpdateStore.create(tmp_path / "s.zarr", TinyNet(), overwrite=True)
    writer.close()
    pu.UpdateStore.create(tmp_path / "s.zarr", TinyNet(), overwrite=True).close()


def test_a_failed_append_stores_nothing(tmp_path, monkeypatch):
    model = TinyNet()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, steps_per_chunk=2)
    row = _row(store, model)
    store.append(row, [1])
    real = store._write_buffer

    def fail_once():
        monkeypatch.setattr(store, "_write_buffer", real)
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_buffer", fail_once)
    with pytest.raises(OSError, match="disk full"):
        store.append(row, [2])
    store.append(row, [2])  # the retry
    store.flush()
    assert store.steps == 2 and store.steps_for([2]).steps.tolist() == [1]



@pytest.mark.parametrize("how", ["flush", "append"])
def test_a_failed_commit_leaves_the_steps_to_be_written_again(tmp_path, monkeypatch, how):
    """The data is written, then its commit (zarr.json) fails, e.g. on a full disk: the steps
    are not committed, so a retry must write and commit them again. The buffer used to count
    them as committed once their data was written: the retried flush did nothing and close()
    released the store without them (flush: silently; append: an IndexError hid the error)."""
    import pyunlearn.store.update_store as store_module

    model = TinyNet()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, steps_per_chunk=4)
    row = _row(store, model)
    for i in range(3):
        store.append(row, [i])
    real = store_module.save_attributes

    def fail_once(*args):
        monkeypatch.setattr(store_module, "save_attributes", real)
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "save_attributes", fail_once)
    with pytest.raises(OSError, match="disk full"):
        store.flush() if how == "flush" else store.append(row, [3])
    if how == "append":
        store.append(row, [3])  # the retry
    store.flush()
    store.close()
    reopened = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    assert reopened.steps == 3 + (how == "append")
    assert reopened.steps_for([0, 2]).steps.tolist() == [0, 2]

def test_recorder_refuses_a_read_only_store_up_front(tmp_path):
    _recorded(tmp_path / "s.zarr")
    model = TinyNet()
    with pytest.raises(pu.StoreError, match="read-only"):
        pu.UpdateRecorder(model, torch.optim.SGD(_trainable(model), lr=0.1),
                          pu.UpdateStore.open(tmp_path / "s.zarr", mode="r"))


def test_a_non_finite_step_stops_recording_cleanly(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(_trainable(model), lr=0.1)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.3)
    rec = pu.UpdateRecorder(model, optimizer, store, rows_per_handoff=1)
    ids, x, y = tiny_data(8)
    rec.batch(ids[:4])
    torch.nn.functional.cross_entropy(model(x[:4]), y[:4]).backward()
    optimizer.step()
    rec.batch([777])
    for p in _trainable(model):
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(pu.NonFiniteUpdateError):
        optimizer.step()
    rec.batch([778])
    with pytest.raises(pu.RecorderError, match="NaN or Inf"):
        optimizer.step()
    rec.close()
    assert store.steps == 1 and store.final_fingerprint is None
    assert store.steps_for([777, 778]).missing.tolist() == [777, 778]


def test_cli_forget_chains_on_a_bfloat16_checkpoint(tmp_path):
    model, _ = _recorded(tmp_path / "s.zarr")
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
