"""UpdateRecorder: recording is faithful, harmless to training, and fails loudly."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.kernels import fingerprint
from tests.support import TinyNet, recorded_store, tiny_data, tiny_training
from tests.support.stores import small_recorded_run as _recorded
from tests.support.stores import stored_ids


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


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
def test_recording_does_not_change_training(tmp_path, name, device):
    make = _optimizers()[name]
    plain = _model().to(device)
    ids, x, y = tiny_data()
    tiny_training(plain, make([p for p in plain.parameters() if p.requires_grad]), (ids, x.to(device), y.to(device)))
    recorded = recorded_store(tmp_path / "s.zarr", keep=0.1, optimizer=make, device=device).model
    for a, b in zip(plain.state_dict().values(), recorded.state_dict().values()):
        assert torch.equal(a, b)


def test_dense_store_is_exact(tmp_path, device):
    """keep=1, float32: the stored updates sum to θ_final − θ_initial, and forgetting every ID
    gives θ_initial back (to float rounding)."""
    run = recorded_store(tmp_path / "s.zarr", keep=1.0, value_dtype="float32", steps_per_chunk=4, epochs=3,
                         device=device)
    model, store, steps = run.model, run.store, run.steps
    initial = {name: value.cpu() for name, value in run.initial.items()}
    assert store.steps == steps
    total = [torch.zeros(layer.shape) for layer in store.layers]
    pu.kernels.subtract_sparse(total, store.read(np.arange(steps)), store.k, alpha=-1.0)
    for t, (name, p) in zip(total, ((n, p) for n, p in model.named_parameters() if p.requires_grad)):
        torch.testing.assert_close(t, p.detach().cpu() - initial[name], rtol=0, atol=1e-5)
    report = pu.amnesiac_forget(model, store, run.data[0])
    assert report.steps_removed == steps
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach().cpu(), initial[name], rtol=0, atol=1e-5)


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



@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_a_reused_ids_buffer_does_not_change_the_ids_already_declared(tmp_path, kind):
    """Gradient accumulation that refills one IDs buffer per micro-batch: rec.batch keeps the IDs
    it was given, not a view of the buffer (which recorded the last micro-batch's IDs for all of
    them, so a deletion of the first micro-batch's samples found no step)."""
    model, optimizer, store = _setup(tmp_path, keep=0.5)
    ids, x, y = tiny_data(20)
    buffer = torch.empty(5, dtype=torch.int64)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for step in range(2):
            optimizer.zero_grad()
            for micro in range(2):
                sel = slice(step * 10 + micro * 5, step * 10 + micro * 5 + 5)
                buffer.copy_(ids[sel])
                rec.batch(buffer if kind == "tensor" else buffer.numpy())
                torch.nn.functional.cross_entropy(model(x[sel]), y[sel]).backward()
            optimizer.step()
    assert [s.tolist() for s in store.step_ids([0, 1])] == [sorted(ids[:10].tolist()), sorted(ids[10:20].tolist())]
    assert store.steps_for(ids[:5]).missing.size == 0

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
    stranger = torch.nn.Parameter(torch.zeros(2))  # not the model's: it would change unrecorded
    with pytest.raises(ValueError, match="has 1 others"):
        pu.UpdateRecorder(model, torch.optim.SGD([*model.parameters(), stranger], lr=0.1), store)


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


# ------------------------------------------------------------------ flushing, and changes mid-run
def _record_tiny(path, *, steps_per_chunk=5, epochs=12, after_step=None, **recorder_options):
    """300 small steps (TinyNet, plain SGD, batches of 16 of 400 samples), every row handed to
    the writer on its own; after_step(store, step) runs in the training thread after each."""
    model = _model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    store = pu.UpdateStore.create(path, model, keep=0.5, steps_per_chunk=steps_per_chunk)
    rec = pu.UpdateRecorder(model, optimizer, store, rows_per_handoff=1, **recorder_options)
    tiny_training(model, optimizer, tiny_data(400), epochs=epochs, recorder=rec,
                  after_step=None if after_step is None else lambda step: after_step(store, step))
    rec.close()
    return store


def test_store_flush_from_the_training_thread_while_the_recorder_writes(tmp_path):
    """store.flush() at every step, racing the writer thread's appends, commits exactly what an
    undisturbed recording commits: every step with its own IDs and row."""
    reference = _record_tiny(tmp_path / "reference.zarr")
    flushed = _record_tiny(tmp_path / "flushed.zarr", after_step=lambda store, step: store.flush())
    assert flushed.steps == reference.steps == 300
    assert flushed.samples == reference.samples
    for flushed_array, reference_array in zip(stored_ids(flushed), stored_ids(reference)):  # sample IDs, offsets
        assert np.array_equal(flushed_array, reference_array)
    for a, b in zip(flushed.read(np.arange(300)), reference.read(np.arange(300))):
        assert torch.equal(a, b)


def test_recorder_flush_makes_every_recorded_step_durable(tmp_path):
    model, optimizer, store = _setup(tmp_path, keep=0.5)  # a chunk holds thousands of steps
    rec = pu.UpdateRecorder(model, optimizer, store, flush_every_s=None)
    tiny_training(model, optimizer, tiny_data(160), epochs=1, recorder=rec)
    assert pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").steps == 0  # store.flush() alone cannot reach them
    store.flush()
    assert pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").steps == 0
    assert rec.flush() == rec.steps == 10
    reader = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    assert reader.steps == 10 and reader.steps_for(np.arange(1000, 1160)).missing.size == 0
    point = reader.metadata.resume_point
    assert point.steps == 10 and point.fingerprint == fingerprint(store.check_model(model))
    tiny_training(model, optimizer, tiny_data(32, first_id=5000), epochs=1, recorder=rec)
    assert rec.flush() == 12 == pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").steps
    rec.close()


def test_flush_every_s_zero_flushes_after_every_append(tmp_path, monkeypatch):
    model, optimizer, store = _setup(tmp_path, keep=0.5)
    events = []
    real_append, real_flush = store.append, store.flush

    def append(row, ids, hyper=None):
        events.append("append")
        real_append(row, ids, hyper)

    def flush():
        events.append("flush")
        real_flush()

    monkeypatch.setattr(store, "append", append)
    monkeypatch.setattr(store, "flush", flush)
    rec = pu.UpdateRecorder(model, optimizer, store, flush_every_s=0.0)
    tiny_training(model, optimizer, tiny_data(160), epochs=1, recorder=rec)
    reader = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    deadline = time.monotonic() + 10
    while reader.steps < 10 and time.monotonic() < deadline:  # durable without rec.flush() or close()
        time.sleep(0.01)
        reader.refresh()
    assert reader.steps == 10
    rec.close()
    appends = [i for i, e in enumerate(events) if e == "append"]
    assert len(appends) == 10 and all(events[i + 1] == "flush" for i in appends)
    with pytest.raises(ValueError, match="flush_every_s must be a number of seconds >= 0, or None"):
        pu.UpdateRecorder(model, optimizer, store, flush_every_s=-1)


def test_recorder_flush_raises_the_writer_error(tmp_path, monkeypatch):
    model, optimizer, store = _setup(tmp_path)
    rec = pu.UpdateRecorder(model, optimizer, store)

    def broken_append(row, ids, hyper=None):
        raise OSError("disk full")

    monkeypatch.setattr(store, "append", broken_append)
    tiny_training(model, optimizer, tiny_data(32), epochs=1, recorder=rec)
    with pytest.raises(pu.RecorderError, match="disk full"):
        rec.flush()
    with pytest.raises(pu.RecorderError, match="disk full"):
        rec.close()
    assert store.final_fingerprint is None


def _change(model, optimizer, how):
    if how == "model.half()":
        model.half()
    elif how == "param.data = double":
        model.fc1.weight.data = model.fc1.weight.data.double()
    elif how == "add_param_group":  # a frozen layer unfrozen mid-run
        model.frozen.requires_grad_(True)
        optimizer.add_param_group({"params": [model.frozen]})
    elif how == "nesterov":  # gradient attribution does not follow Nesterov momentum
        optimizer.param_groups[0]["nesterov"] = True
    elif how == "per-group lr":  # nor one learning rate per group
        moved = optimizer.param_groups[0]["params"][2:]
        del optimizer.param_groups[0]["params"][2:]
        optimizer.add_param_group({"params": moved, "lr": 0.5})  # the same parameters, in the same order


@pytest.mark.parametrize("how, attribution, message", [
    ("model.half()", "update", r"parameter fc1.weight changed from torch.float32 on cpu, shape \(16, 8\), to "
                               r"torch.float16"),
    ("param.data = double", "update", r"parameter fc1.weight changed from torch.float32.* to torch.float64"),
    ("add_param_group", "update", r"the optimizer's parameters changed since recording started \(1 added, 0 removed"),
    ("nesterov", "gradient", r"the optimizer's settings changed since recording started: .*nesterov"),
    ("per-group lr", "gradient", r"settings changed since recording started: .*one learning rate"),
])
def test_a_change_mid_run_is_refused_before_the_step(tmp_path, how, attribution, message):
    model = _model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.5, attribution=attribution)
    rec = pu.UpdateRecorder(model, optimizer, store, rows_per_handoff=1)
    tiny_training(model, optimizer, tiny_data(32), epochs=1, recorder=rec)  # 2 steps
    _change(model, optimizer, how)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec.batch([1])
    with pytest.raises(pu.RecorderError, match=message):
        optimizer.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), "a refused step changed the model"
    rec.batch([2])
    with pytest.raises(pu.RecorderError, match="recording stopped"):
        optimizer.step()
    rec.close()
    assert store.steps == 2 and store.final_fingerprint is None  # the steps before it, and no final model


def test_the_per_step_checks_cost_microseconds(tmp_path):
    model, optimizer, store = _setup(tmp_path)
    rec = pu.UpdateRecorder(model, optimizer, store)
    check = rec._role._changed
    assert check() is None
    n = 2000
    best = min(_timed(check, n) for _ in range(5))
    rec.close()
    assert best < 50e-6, f"{best * 1e6:.1f} µs a step"  # ~2 µs measured on the development machine


def _timed(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


# ----------------------------------------------------------------- issue 14: frozen parameters, wrapped optimizers
def test_an_optimizer_may_hold_frozen_parameters(tmp_path):
    """SGD(model.parameters()) with a frozen backbone: the frozen parameters are not recorded,
    and the store equals the one recorded with the trainable parameters alone."""
    stores = []
    for name, everything in (("all.zarr", True), ("trainable.zarr", False)):
        torch.manual_seed(0)
        model = TinyNet()
        model.fc1.requires_grad_(False)  # the "backbone"
        params = list(model.parameters()) if everything else [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
        store = pu.UpdateStore.create(tmp_path / name, model, keep=1.0, value_dtype="float32")
        frozen_before = model.fc1.weight.detach().clone()
        with pu.UpdateRecorder(model, optimizer, store) as rec:
            tiny_training(model, optimizer, tiny_data(48), epochs=1, recorder=rec)
        assert torch.equal(model.fc1.weight, frozen_before)
        assert [layer.name for layer in store.layers] == ["fc2.weight", "fc2.bias"]
        stores.append(store)
    assert stores[0].steps == stores[1].steps == 3
    for a, b in zip(stores[0].read(range(3)), stores[1].read(range(3))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["requires_grad_(True)", "a gradient set by hand"])
def test_a_frozen_parameter_that_starts_to_train_is_refused(tmp_path, how):
    torch.manual_seed(0)
    model = TinyNet()
    model.fc1.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.5)
    rec = pu.UpdateRecorder(model, optimizer, store)
    tiny_training(model, optimizer, tiny_data(32), epochs=1, recorder=rec)  # 2 steps
    rec.batch([1])
    optimizer.zero_grad()
    if how == "requires_grad_(True)":
        model.fc1.requires_grad_(True)  # unfrozen mid-run: the optimizer already holds it
    torch.nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.zeros(4, dtype=torch.long)).backward()
    if how == "a gradient set by hand":
        model.fc1.weight.grad = torch.ones_like(model.fc1.weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(pu.RecorderError, match=r"parameter fc1\.\w+ was frozen \(requires_grad=False\) when "
                                               r"recording started.*This step did not run"):
        optimizer.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), "a refused step changed the model"
    rec.close()
    assert store.steps == 2 and store.final_fingerprint is None


def test_an_accelerate_style_wrapper_is_unwrapped(tmp_path):
    """AcceleratedOptimizer subclasses torch.optim.Optimizer without running its __init__ (no
    hooks of its own) and steps the wrapped optimizer; the recorder hooks the wrapped one. A
    stand-in here: tests/integrations/test_transformers.py runs the real one."""

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, optimizer):  # noqa: super().__init__ deliberately not called
            self.optimizer = optimizer

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        def step(self, closure=None):
            return self.optimizer.step(closure)

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none)

    from pyunlearn.recording.recorder import unwrap_optimizer

    torch.manual_seed(0)
    model = TinyNet()
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    wrapped = Wrapper(inner)
    assert unwrap_optimizer(wrapped) is inner and unwrap_optimizer(inner) is inner
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model)
    with pu.UpdateRecorder(model, wrapped, store) as rec:
        assert tiny_training(model, wrapped, tiny_data(32), epochs=1, recorder=rec) == 2
    assert store.steps == 2


# ------------------------------------------------------------------ a read-only store, a non-finite step
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
