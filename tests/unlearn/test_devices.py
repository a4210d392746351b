"""Forgetting, the partial methods and fine-tuning with the model on each device of the `device`
axis (see tests/recording/test_devices.py), with float32, bfloat16 and float16 parameters. A
forget is compared with the native CPU subtraction of the stored rows."""
from __future__ import annotations

import pytest
import torch

import pyunlearn as pu
from pyunlearn.data import SampleSet
from pyunlearn.kernels import ops
from tests.support import TinyNet, tiny_data
from tests.support.devices import DTYPES, host_float32, record, trainable
from tests.support.kernels import assert_same_bits, native_subtract


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forgetting_subtracts_the_stored_rows_on_the_models_device(native, device, tmp_path, dtype):
    model, store, trajectory = record(tmp_path / "s.zarr", device, dtype)
    steps = store.steps_for([1000, 1050]).steps
    assert steps.size > 0
    verdict, expected = native_subtract(native, host_float32(model), store.read(steps), store.k)
    assert verdict is None
    report = pu.amnesiac_forget(model, store, [1000, 1050])
    assert report.steps_removed == steps.size
    # The float32 result, rounded once into the parameters' dtype.
    assert_same_bits([p.detach().cpu() for p in trainable(model)], [e.to(dtype) for e in expected], "parameters")
    assert all(p.device.type == device.type and p.dtype == dtype for p in trainable(model))
    assert store.ledger.fingerprint == pu.kernels.fingerprint(trainable(model))
    again = pu.amnesiac_forget(model, store, [1000])
    assert again.steps_removed == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_forgetting_of_every_step_restores_the_initial_model(device, tmp_path, dtype):
    """keep=1.0 with float32 values: every step's Δ, computed in float32, subtracted in float32,
    then rounded once into the parameters' dtype (the README's exactness note)."""
    model, store, trajectory = record(tmp_path / "s.zarr", device, dtype, keep=1.0, value_dtype="float32")
    pu.amnesiac_forget(model, store, torch.arange(1000, 1096))
    initial, got = trajectory[0], host_float32(model)
    assert all(bool((t.abs() < 1).all()) for step in trajectory for t in step)  # the premise below
    if dtype == torch.float16:
        # A float16 value below 1 is a multiple of 2^-24 below 1, which float32 holds exactly; so
        # are the steps' differences and the subtraction's partial sums while they stay below 1
        # (small steps, as here): no float32 operation rounds, and the result is exact.
        assert_same_bits(got, initial, "parameters")
    elif dtype == torch.bfloat16:
        # bfloat16 values need not share a grid float32 holds: at most one bfloat16 rounding.
        for g, w in zip(got, initial):
            ulp = torch.nextafter(w.to(dtype), torch.full_like(w, float("inf")).to(dtype)).float() - w
            assert bool(((g - w).abs() <= ulp).all())
    else:
        # Two float32 roundings (Δ, then its subtraction) per step of values below 1.
        bound = 2 * (len(trajectory) - 1) * 2.0**-24
        for g, w in zip(got, initial):
            assert float((g - w).abs().max()) <= bound


# ---- the other methods -----------------------------------------------------------------------

@pytest.mark.parametrize("method, keep", [("label_flip", None), ("label_flip", 0.2), ("gradient_ascent", None),
                                          ("gradient_ascent", 0.2), ("fine_tune", None)])
def test_the_optimisation_methods_run_on_the_models_device(device, method, keep):
    """The data stays on the host; the model's device does the work, and the partial methods
    change only each layer's top-k entries by |gradient| (on that device)."""
    torch.manual_seed(0)
    model = TinyNet().to(device)
    before = host_float32(model)
    data = SampleSet(*tiny_data(64))
    args = dict(epochs=1, batch_size=64)  # one step: the partial mask's effect is exact
    if method == "fine_tune":
        report = pu.unlearn.fine_tune(model, data, lr=0.1, **args)
    elif method == "label_flip":
        report = pu.unlearn.label_flip(model, data, keep, lr=0.1, **args)
    else:
        report = pu.unlearn.gradient_ascent(model, data, keep, lr=0.1, **args)
    assert report.steps == 1
    changed = [int((a != b).sum()) for a, b in zip(host_float32(model), before)]
    assert all(p.device.type == device.type for p in trainable(model))
    if keep is None:
        assert sum(changed) > 0.5 * sum(p.numel() for p in before)
    else:
        limits = ops.k_for([p.numel() for p in before], keep)
        assert all(0 < c <= k for c, k in zip(changed, limits)), (changed, limits)
