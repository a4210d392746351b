"""Recording with the model on each device of the `device` axis ("cpu", "cpu-device-path": CPU
tensors through the device path, "cpu-emulated-cuda": the same with the CUDA module's calls
emulated, "cuda": skipped without a GPU), and with float32, bfloat16 and float16 parameters.

The expectations are computed independently of the path under test: the rows a step should
give come from the native CPU kernel applied to the parameters captured after each step.
(Forgetting on each device: tests/unlearn/test_devices.py.)"""
from __future__ import annotations

import pytest
import torch

import pyunlearn as pu
from pyunlearn.data import SampleSet
from pyunlearn.errors import NonFiniteUpdateError
from pyunlearn.kernels import backends
from tests.support import TinyNet, tiny_data, tiny_training
from tests.support.devices import DTYPES, host_float32, record, trainable
from tests.support.kernels import assert_same_bits, native_prune


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value_dtype", ["float16", "float32"])
def test_recording_stores_the_pruned_update_of_every_step(native, device, tmp_path, dtype, value_dtype):
    model, store, trajectory = record(tmp_path / "s.zarr", device, dtype, value_dtype=value_dtype)
    steps = len(trajectory) - 1
    assert store.steps == steps == 12
    rows = store.read(list(range(steps)))
    for t in range(steps):
        # Δ in float32 from the float32 snapshot of the previous step's parameters.
        expected, _ = native_prune(native, trajectory[t], trajectory[t + 1], store.k, value_dtype)
        assert_same_bits([rows.index[t], rows.values[t], rows.scales[t]], expected, f"step {t}")
    assert store.final_fingerprint == pu.kernels.fingerprint(trajectory[-1])
    assert all(p.device.type == device.type and p.dtype == dtype for p in trainable(model))


def test_a_non_finite_update_stops_recording_and_keeps_the_steps_before(device, tmp_path):
    """On the CPU the step itself raises; on the device path the writer finds it in the
    background and the error comes at a later step, at flush() or at close(). Either way the
    store keeps exactly the steps before, and no final model is marked."""
    torch.manual_seed(0)
    model = TinyNet().to(device)
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.25)
    ids, x, y = tiny_data(64)
    x, y = x.to(device), y.to(device)
    rec = pu.UpdateRecorder(model, opt, store, rows_per_handoff=1)
    raised = None
    try:
        for step in range(8):
            rec.batch(ids[step * 8 : step * 8 + 8])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[step * 8 : step * 8 + 8]), y[step * 8 : step * 8 + 8]).backward()
            if step == 5:
                model.fc2.weight.grad[1, 2] = float("nan")
            opt.step()
        rec.flush()
    except NonFiniteUpdateError as exc:
        raised = exc
    try:
        rec.close()
        raised_at_close = False
    except NonFiniteUpdateError:  # the writer's error stays: close() reports it again
        raised_at_close = True
    assert raised is not None and "fc2.weight" in str(raised)
    assert raised_at_close == backends.backend_for(device).device_path
    if backends.backend_for(device).device_path:
        assert "step 5" in str(raised)
    store.close()
    reopened = pu.UpdateStore.open(tmp_path / "s.zarr")
    assert reopened.steps == 5
    assert not reopened.final_fingerprint


def test_the_device_path_reuses_its_host_buffers(device_path, tmp_path):
    """Rows go to the host through a pool of slots that the writer gives back: with one row per
    hand-off and a queue of one, a handful of slots serve every step."""
    model, store, trajectory = record(tmp_path / "s.zarr", device_path, epochs=3, rows_per_handoff=1, queue_size=1)
    assert store.steps == 18
    # Not reachable from outside: the recorder is closed; a fresh one shows the pool in use.
    opt = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    store2 = pu.UpdateStore.create(tmp_path / "t.zarr", model, keep=0.25)
    ids, x, y = tiny_data(96)
    with pu.UpdateRecorder(model, opt, store2, rows_per_handoff=1, queue_size=1) as rec:
        tiny_training(model, opt, (ids, x.to(device_path), y.to(device_path)), epochs=3, recorder=rec)
        transfer = rec._role._rows._transfer
        assert 1 <= transfer.slots <= (1 + 2) * 1  # (queue_size + 2) · rows_per_handoff
    assert store2.steps == 18


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
def test_recording_on_a_gpu_never_synchronizes_the_training_stream(tmp_path):
    """torch's sync debug mode raises on any operation that waits for the device: the steps,
    the recorder's hooks, the pruning and the hand-off included (the data is on the GPU first)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = TinyNet().to(device)
    opt = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.25)
    ids, x, y = tiny_data(96)
    x, y = x.to(device), y.to(device)
    with pu.UpdateRecorder(model, opt, store) as rec:
        for step in range(12):
            batch = slice(step * 8, step * 8 + 8)
            rec.batch(ids[batch])
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert store.steps == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
def test_recording_on_a_gpu_across_streams(native, tmp_path):
    """Steps on alternating CUDA streams: the reused device row and snapshot stay in order (each
    call waits on the device for the previous stream's work), so every stored row is right."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = TinyNet().to(device)
    opt = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.25)
    ids, x, y = tiny_data(96)
    x, y = x.to(device), y.to(device)
    streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)]
    trajectory = [host_float32(model)]
    with pu.UpdateRecorder(model, opt, store) as rec:
        for step in range(12):
            stream = streams[step % 2]
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                batch = slice(step * 8, step * 8 + 8)
                rec.batch(ids[batch])
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                opt.step()
            torch.cuda.current_stream(device).wait_stream(stream)
            trajectory.append(host_float32(model))
    rows = store.read(list(range(12)))
    for t in range(12):
        expected, _ = native_prune(native, trajectory[t], trajectory[t + 1], store.k, "float16")
        assert_same_bits([rows.index[t], rows.values[t], rows.scales[t]], expected, f"step {t}")


def test_gradient_attribution_records_and_forgets_a_model_on_the_device(device, tmp_path):
    """The optimizer family's vectors go to the host and are pruned there (a synchronization per
    step on a GPU); the result is the CPU's: forgetting every ID on a dense store gives the
    initial model back to float rounding."""
    from tests.support import recorded_store

    run = recorded_store(tmp_path / "s.zarr", keep=1.0, value_dtype="float32", attribution="gradient",
                         device=device)
    assert run.store.steps == run.steps
    pu.amnesiac_forget(run.model, run.store, run.data[0])
    for name, p in run.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach().cpu(), run.initial[name].cpu(), rtol=0, atol=1e-5)


# ---- refusals --------------------------------------------------------------------------------

def test_a_model_on_two_devices_is_refused_naming_them(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.25)
    model.fc2.to("meta")
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    message = (r"model's parameters are on more than one device \(frozen on cpu, fc2.weight on meta\): "
               r"{} needs them all on one device. Move the model there first, e.g. model.to\('cpu'\)")
    with pytest.raises(ValueError, match=message.format("recording")):
        pu.UpdateRecorder(model, opt, store)
    with pytest.raises(ValueError, match=message.format("forgetting")):
        pu.amnesiac_forget(model, store, [1000])
    data = SampleSet(*tiny_data(16))
    with pytest.raises(ValueError, match=message.format("label flip")):
        pu.unlearn.label_flip(model, data, classes=3)
    with pytest.raises(ValueError, match=message.format("evaluating")):
        pu.evaluation.metrics.accuracy(model, data)
    assert store.steps == 0 and store.ledger.removed_steps.size == 0
    store.close()
    again = pu.UpdateStore.open(tmp_path / "s.zarr")
    with again.writing():  # no writer lock was left behind
        pass
    again.close()
