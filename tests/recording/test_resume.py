"""Resuming a recording from a checkpoint: the recorder's state, the store's resume point, and
the refusals that keep an abandoned run's steps out of the store."""
from __future__ import annotations

import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import pyunlearn as pu
from tests.support import TinyNet, tiny_data, tiny_training


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _dense_store(path):
    """A TinyNet, plain SGD (no momentum) and a dense store: forgetting every step is exact."""
    torch.manual_seed(0)
    model = TinyNet()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(_trainable(model), lr=0.1)
    store = pu.UpdateStore.create(path, model, keep=1.0, value_dtype="float32", steps_per_chunk=4)
    return model, optimizer, store, initial


def _step(rec, model, optimizer, ids, x, y):
    rec.batch(ids)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _checkpointed_run(path, *, checkpoint_at=5, steps=10):
    """Records `steps` steps of a dense run, taking a checkpoint (model, optimizer, recorder
    state) after `checkpoint_at` of them; the run goes on and closes (it is then abandoned)."""
    model, optimizer, store, initial = _dense_store(path)
    ids, x, y = tiny_data(16 * steps)
    rec = pu.UpdateRecorder(model, optimizer, store)
    checkpoint = None
    for s in range(steps):
        sel = slice(16 * s, 16 * s + 16)
        _step(rec, model, optimizer, ids[sel], x[sel], y[sel])
        if s + 1 == checkpoint_at:
            checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                          "optimizer": optimizer.state_dict(), "recorder": rec.state_dict()}
    rec.close()
    store.close()
    return checkpoint, initial


def _restored(checkpoint):
    model = TinyNet()
    model.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.SGD(_trainable(model), lr=0.1)
    optimizer.load_state_dict(checkpoint["optimizer"])
    return model, optimizer


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resuming_from_an_earlier_checkpoint_without_the_state_is_refused_before_the_step(tmp_path):
    checkpoint, _ = _checkpointed_run(tmp_path / "s.zarr")
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    model, optimizer = _restored(checkpoint)
    rec = pu.UpdateRecorder(model, optimizer, store)
    before = _params(model)
    ids, x, y = tiny_data(16, first_id=5000)
    with pytest.raises(pu.RecorderError, match=r"already holds 10 steps, and this model is not the one they end with"
                                               r".*rec\.load_state_dict\(ckpt\[\"recorder\"\]\).*store\.truncate"):
        _step(rec, model, optimizer, ids, x, y)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a refused step changed the model"
    rec.close()
    assert store.steps == 10 and store.steps_for([5000]).missing.tolist() == [5000]
    assert store.final_steps == 10  # still the abandoned run's: the refused model was not marked final


def test_load_state_dict_drops_the_abandoned_branch_and_forgetting_everything_is_exact(tmp_path):
    checkpoint, initial = _checkpointed_run(tmp_path / "s.zarr")
    assert checkpoint["recorder"]["steps"] == 5
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    model, optimizer = _restored(checkpoint)
    rec = pu.UpdateRecorder(model, optimizer, store)
    with pytest.warns(RuntimeWarning, match=r"dropped the store's 5 later steps \(steps 5\.\.9"):
        assert rec.load_state_dict(checkpoint["recorder"]) == 5
    assert store.steps == 5 and rec.steps == 5
    ids, x, y = tiny_data(64, first_id=5000)
    for s in range(4):
        _step(rec, model, optimizer, ids[16 * s:16 * s + 16], x[16 * s:16 * s + 16], y[16 * s:16 * s + 16])
    rec.close()
    assert store.steps == 9 and store.final_steps == 9
    assert store.steps_for(np.arange(1080, 1160)).steps.size == 0  # the abandoned steps' samples are gone
    everything = np.concatenate([np.arange(1000, 1080), np.arange(5000, 5064)])
    assert pu.amnesiac_forget(model, store, everything).steps_removed == 9
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), initial[name], rtol=0, atol=1e-6)


def test_state_given_at_construction(tmp_path):
    checkpoint, _ = _checkpointed_run(tmp_path / "s.zarr", checkpoint_at=3, steps=6)
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    model, optimizer = _restored(checkpoint)
    with pytest.warns(RuntimeWarning, match="dropped the store's 3 later steps"):
        rec = pu.UpdateRecorder(model, optimizer, store, state=checkpoint["recorder"])
    ids, x, y = tiny_data(16, first_id=5000)
    _step(rec, model, optimizer, ids, x, y)
    rec.close()
    assert store.steps == 4 and store.steps_for([5000]).steps.tolist() == [3]


def test_a_state_of_another_checkpoint_is_refused(tmp_path):
    checkpoint, _ = _checkpointed_run(tmp_path / "s.zarr")
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    model, optimizer = _restored(checkpoint)
    with torch.no_grad():
        model.fc1.bias.add_(1.0)
    rec = pu.UpdateRecorder(model, optimizer, store)
    with pytest.raises(pu.ModelMismatchError, match="the state belongs to another checkpoint"):
        rec.load_state_dict(checkpoint["recorder"])
    assert store.steps == 10  # nothing dropped
    rec.close()
    with pytest.raises(ValueError, match="must be a recorder state"):
        pu.UpdateRecorder(*_restored(checkpoint), store, state={"steps": 5})


def test_a_store_that_lost_steps_the_checkpoint_had_is_refused(tmp_path):
    checkpoint, _ = _checkpointed_run(tmp_path / "s.zarr")
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    store.truncate(3)  # e.g. restored from an older copy: the checkpoint's steps 3 and 4 are gone
    model, optimizer = _restored(checkpoint)
    rec = pu.UpdateRecorder(model, optimizer, store)
    with pytest.raises(pu.RecorderError, match=r"holds only 3 committed steps: the store lost steps the checkpoint "
                                               r"had \(it was not flushed before the checkpoint was saved"):
        rec.load_state_dict(checkpoint["recorder"])
    rec.close()
    assert store.steps == 3


def test_the_right_model_continues_without_a_state(tmp_path):
    """A store continued by the model its steps end with (the last flush's or the final one)
    needs no state; store.truncate(step) by hand also lets the checkpoint's model continue."""
    checkpoint, _ = _checkpointed_run(tmp_path / "s.zarr")
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    model, optimizer = _restored(checkpoint)
    rec = pu.UpdateRecorder(model, optimizer, store)
    ids, x, y = tiny_data(32, first_id=5000)
    with pytest.raises(pu.RecorderError, match="already holds 10 steps"):
        _step(rec, model, optimizer, ids[:16], x[:16], y[:16])
    store.truncate(5)  # the message's other way: by hand, then step again
    _step(rec, model, optimizer, ids[:16], x[:16], y[:16])
    rec.close()
    assert store.steps == 6 and store.final_steps == 6
    rec = pu.UpdateRecorder(model, optimizer, store)  # the final model continues
    _step(rec, model, optimizer, ids[16:], x[16:], y[16:])
    assert rec.flush() == 7 == store.steps
    assert store.metadata.resume_point.steps == 7
    rec.close()


def test_truncate_keeps_the_resume_point_only_at_its_step(tmp_path):
    _checkpointed_run(tmp_path / "s.zarr")
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    point = store.metadata.resume_point
    assert point.steps == 10 and point.fingerprint == store.final_fingerprint  # mark_final sets it
    store.truncate(10)
    assert store.metadata.resume_point == point
    store.truncate(4)
    assert store.metadata.resume_point.steps == 4 and store.metadata.resume_point.fingerprint == ""  # model unknown
    with pytest.raises(pu.StoreError, match="holds 4 committed steps, not 5"):
        store.mark_resume_point(TinyNet(), steps=5)


_KILLED_AFTER_A_FLUSH = r"""
import sys, torch, pyunlearn as pu
from tests.support import TinyNet, tiny_data, tiny_training
path, checkpoint = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = TinyNet()
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
store = pu.UpdateStore.create(path, model, keep=0.5)  # a chunk holds thousands of steps: none fills here
rec = pu.UpdateRecorder(model, optimizer, store, flush_every_s=None)
def after_step(step):
    if step == 37:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "recorder": rec.state_dict()},
                   checkpoint)
        print("flushed", rec.steps, flush=True)
    elif step > 37:
        print("step", step, flush=True)
tiny_training(model, optimizer, tiny_data(), epochs=10**6, recorder=rec, after_step=after_step)
"""


def test_a_process_killed_right_after_a_flush_keeps_the_flushed_steps(tmp_path):
    path, checkpoint = tmp_path / "s.zarr", tmp_path / "ckpt.pt"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_AFTER_A_FLUSH, str(path), str(checkpoint)],
                            stdout=subprocess.PIPE, text=True)
    flushed = None
    for line in proc.stdout:
        word, number = line.split()
        if word == "flushed":
            flushed = int(number)
        elif int(number) >= 80:  # well past the flush: these steps are only in memory
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert flushed == 37

    reader = pu.UpdateStore.open(path, mode="r")
    assert reader.steps == flushed and reader.metadata.resume_point.steps == flushed
    state = torch.load(checkpoint, weights_only=True)
    model = TinyNet()
    model.load_state_dict(state["model"])
    optimizer = torch.optim.SGD(_trainable(model), lr=0.1, momentum=0.9)
    optimizer.load_state_dict(state["optimizer"])
    store = pu.UpdateStore.open(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = pu.UpdateRecorder(model, optimizer, store, state=state["recorder"])  # takes over the dead lock
    assert [str(w.message) for w in caught if "dropped" in str(w.message)] == []  # the checkpoint's steps exactly
    tiny_training(model, optimizer, tiny_data(32, first_id=7000), epochs=1, recorder=rec)
    rec.close()
    assert store.steps == flushed + 2
    assert store.steps_for([7000]).steps.min() >= flushed
