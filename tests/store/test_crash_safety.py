"""A writer that dies or fails midway: a killed recording leaves a consistent prefix that
training resumes from; an append or a commit that fails (a full disk) stores nothing, and the
retry writes it. (tests/store/test_sigkill.py kills runs at random points.)"""
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
from tests.support.stores import plus_one_row as _row
from tests.support.stores import stored_ids


_CRASHING_TRAINER = r"""
import sys, torch, pyunlearn as pu
from tests.support import TinyNet, tiny_data, tiny_training
path, checkpoints = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = TinyNet()
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
store = pu.UpdateStore.create(path, model, keep=0.5, steps_per_chunk=3)
rec = pu.UpdateRecorder(model, optimizer, store)
def after_step(step):
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f"{checkpoints}/{step}.pt")
    print(step, flush=True)
tiny_training(model, optimizer, tiny_data(), epochs=10**6, recorder=rec, after_step=after_step)
"""


def test_killed_recording_leaves_a_consistent_prefix_and_resumes(tmp_path):
    path, checkpoints = tmp_path / "s.zarr", tmp_path / "ckpt"
    checkpoints.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_TRAINER, str(path), str(checkpoints)],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if int(line) >= 150:  # past two hand-offs of 64 rows to the writer
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = pu.UpdateStore.open(path)
        committed = store.steps
        assert 3 <= committed <= 160 and committed % 3 == 0  # whole chunks only
        offsets = stored_ids(store)[1]
        assert offsets[-1] == store.samples and np.all(np.diff(offsets) > 0)
        rows = store.read(np.arange(committed))
        pu.kernels.subtract_sparse([torch.zeros(layer.shape) for layer in store.layers], rows, store.k)  # decodes
        resume_at = committed - 1
        store.truncate(resume_at)  # takes over the dead writer's lock
    assert any("no longer runs" in str(w.message) for w in caught)

    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    state = torch.load(checkpoints / f"{resume_at}.pt", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        tiny_training(model, optimizer, tiny_data(32, first_id=7000), epochs=1, recorder=rec)
    assert store.steps == resume_at + 2
    assert store.steps_for([7000]).steps.min() >= resume_at
    report = pu.amnesiac_forget(model, store, [7000])
    assert report.steps_removed == 1


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
