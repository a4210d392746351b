"""Helpers of the tests that run on each device of the `device` axis (tests/conftest.py): the
parameter dtypes they cover, and a recorded run that keeps the parameters after every step."""
from __future__ import annotations

import torch

import pyunlearn as pu
from tests.support import TinyNet, tiny_data, tiny_training

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def host_float32(model):
    return [p.detach().to("cpu", torch.float32).clone() for p in trainable(model)]


def record(path, device, dtype=torch.float32, *, keep=0.25, value_dtype="float16", epochs=2, **recorder_args):
    """TinyNet on `device` in `dtype`, trained with SGD + momentum while recorded; returns
    (model, store, the float32 host copies of the parameters before and after every step)."""
    torch.manual_seed(0)
    model = TinyNet().to(device=device, dtype=dtype)
    opt = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(path, model, keep=keep, value_dtype=value_dtype)
    ids, x, y = tiny_data(96)
    trajectory = [host_float32(model)]
    with pu.UpdateRecorder(model, opt, store, **recorder_args) as rec:
        tiny_training(model, opt, (ids, x.to(device, dtype), y.to(device)), epochs=epochs, recorder=rec,
                      after_step=lambda _: trajectory.append(host_float32(model)))
    return model, store, trajectory
