"""UpdateRecorder: recording is faithful, harmless to training, and fails loudly."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.testing import TinyNet, recorded_store, tiny_data, tiny_training


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def _setup(tmp_path, **store_options):
    """A fresh TinyNet, plain SGD over its trainable parameters, and an empty store for it."""
    model = _model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, optimizer, pu.UpdateStore.create(tmp_path / "s.zarr", model, **store_options)


def _optimizers():
    return {
        "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    }


@pytest.mark.parametrize("name", list(_optimizers()))
def test_recording_does_not_change_training(tmp_path, name):
    make = _optimizers()[name]
    plain = _model()
    tiny_training(plain, make([p for p in plain.parameters() if p.requires_grad]), tiny_data())
    recorded = recorded_store(tmp_path / "s.zarr", keep=0.1, optimizer=make).model
    for a, b in zip(plain.state_dict().values(), recorded.state_dict().values()):
        assert torch.equal(a, b)


def test_dense_store_is_exact(tmp_path):
    """keep=1, float32: the stored updates sum to θ_final − θ_initial, and forgetting every ID
    gives θ_initial back (to float rounding)."""
    run = recorded_store(tmp_path / "s.zarr", keep=1.0, value_dtype="float32", steps_per_chunk=4, epochs=3)
    model, store, steps, initial = run.model, run.store, run.steps, run.initial
    assert store.steps == steps
    total = [torch.zeros(layer.shape) for layer in store.layers]
    pu.ops.subtract_sparse(total, store.read(np.arange(steps)), store.k, alpha=-1.0)
    for t, (name, p) in zip(total, ((n, p) for n, p in model.named_parameters() if p.requires_grad)):
        torch.testing.assert_close(t, p.detach() - initial[name], rtol=0, atol=1e-5)
    report = pu.amnesiac_forget(model, store, run.data[0])
    assert report.steps_removed == steps
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), initial[name], rtol=0, atol=1e-5)


def test_step_ids_and_gradient_accumulation(tmp_path):
    model, optimizer, store = _setup(tmp_path, keep=0.5)
    ids, x, y = tiny_data(40)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for step in range(4):
            optimizer.zero_grad()
            for micro in range(2):  # two micro-batches per step
                sel = slice(step * 10 + micro * 5, step * 10 + micro * 5 + 5)
                rec.batch(ids[sel].tolist() if micro else ids[sel])
                torch.nn.functional.cross_entropy(model(x[sel]), y[sel]).backward()
            optimizer.step()
    assert store.steps == 4
    for step in range(4):
        lookup = store.steps_for(ids[step * 10 : step * 10 + 10])
        assert lookup.steps.tolist() == [step] and lookup.missing.size == 0


def test_step_without_ids_is_refused_before_it_runs(tmp_path):
    model, optimizer, store = _setup(tmp_path)
    rec = pu.UpdateRecorder(model, optimizer, store)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 8)).sum().backward()
    with pytest.raises(pu.RecorderError, match=r"rec.batch\(ids\)"):
        optimizer.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), "a refused step changed the model"
    rec.close()
    assert store.steps == 0


def test_unlabeled_steps_when_allowed(tmp_path):
    model, optimizer, store = _setup(tmp_path)
    with pu.UpdateRecorder(model, optimizer, store, allow_unlabeled_steps=True):
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
    assert store.steps == 1 and store.samples == 0


def test_optimizer_must_hold_the_trainable_parameters(tmp_path):
    model = _model()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model)
    with pytest.raises(ValueError, match=r"lacks \['fc2.weight', 'fc2.bias'\]"):
        pu.UpdateRecorder(model, torch.optim.SGD(model.fc1.parameters(), lr=0.1), store)
    with pytest.raises(ValueError, match="has 1 others"):
        pu.UpdateRecorder(model, torch.optim.SGD(list(model.parameters()), lr=0.1), store)  # includes the frozen one


def test_model_changed_since_create_is_refused(tmp_path):
    model = _model()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    with pytest.raises(pu.ModelMismatchError, match="differs from the one the store was created for"):
        pu.UpdateRecorder(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), store)


def test_writer_error_surfaces_in_the_training_thread(tmp_path, monkeypatch):
    model, optimizer, store = _setup(tmp_path)
    rec = pu.UpdateRecorder(model, optimizer, store, rows_per_handoff=1)

    def broken_append(row, ids, hyper=None):
        raise OSError("disk full")

    monkeypatch.setattr(store, "append", broken_append)
    ids, x, y = tiny_data(10)
    rec.batch(ids)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # recorded; the writer fails in the background
    deadline = time.monotonic() + 10
    while rec._role._writer.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    rec.batch(ids)
    with pytest.raises(pu.RecorderError, match="disk full"):
        optimizer.step()
    with pytest.raises(pu.RecorderError, match="disk full"):
        rec.close()
    assert store.final_fingerprint is None  # a failed recording is not marked final


def test_queue_applies_back_pressure(tmp_path, monkeypatch):
    """With a stalled writer, training blocks after queue_size rows instead of buffering all."""
    model, optimizer, store = _setup(tmp_path)
    release = threading.Event()
    real_append = store.append

    def stalled_append(row, ids, hyper=None):
        release.wait(30)
        real_append(row, ids, hyper)

    monkeypatch.setattr(store, "append", stalled_append)
    rec = pu.UpdateRecorder(model, optimizer, store, queue_size=2, rows_per_handoff=1)
    trainer = threading.Thread(target=tiny_training, args=(model, optimizer, tiny_data(160)),
                               kwargs=dict(epochs=1, batch_size=16, recorder=rec))
    trainer.start()
    deadline = time.monotonic() + 10
    while rec.steps < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # One row in the writer's hands, two in the queue, one step blocked on put: 4 steps done.
    assert rec.steps == 4 and trainer.is_alive()
    release.set()
    trainer.join(30)
    rec.close()
    assert store.steps == 10


def test_close_removes_the_hooks(tmp_path):
    model, optimizer, store = _setup(tmp_path)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        tiny_training(model, optimizer, tiny_data(32), epochs=1, recorder=rec)
    steps = store.steps
    tiny_training(model, optimizer, tiny_data(32), epochs=1)  # no recorder: no error, nothing recorded
    assert store.steps == steps
    with pytest.raises(pu.RecorderError, match="closed"):
        rec.batch([1])


def test_rows_reach_the_store_in_hand_offs(tmp_path):
    model, optimizer, store = _setup(tmp_path, steps_per_chunk=2)
    with pu.UpdateRecorder(model, optimizer, store, rows_per_handoff=3) as rec:
        tiny_training(model, optimizer, tiny_data(80), epochs=1, recorder=rec)  # 5 steps
        deadline = time.monotonic() + 10
        while store.steps < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.steps == 2  # the first hand-off (3 rows) filled one chunk of 2
    assert store.steps == 5
    with pytest.raises(ValueError, match="rows_per_handoff must be a positive int"):
        pu.UpdateRecorder(model, optimizer, store, rows_per_handoff=0)


def test_bad_ids(tmp_path):
    model = _model()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model)
    rec = pu.UpdateRecorder(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), store)
    with pytest.raises(TypeError, match="ids must hold integers"):
        rec.batch(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="ids is empty"):
        rec.batch([])
    with pytest.raises(ValueError, match="must be 1-D"):
        rec.batch(np.zeros((2, 2), dtype=np.int64))
    rec.close()
