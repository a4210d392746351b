"""The optimisation loop the unlearning methods share: epochs of mini-batches, a loss, and a
plain or layer-wise partial optimizer step."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops
from .._model import one_device, trainable_parameters
from .._validate import positive_int, positive_number
from ..data import SampleSet
from .partial import LayerwiseMask, check_keep


@dataclass
class UnlearnReport:
    method: str
    keep: float | None  # None: naive (every entry may change)
    steps: int
    seconds: float


def check_data(arg: str, data) -> SampleSet:
    if not isinstance(data, SampleSet):
        raise TypeError(f"{arg} must be a pyunlearn.data.SampleSet (ids, x, y), got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{arg} is empty: there is nothing to train on")
    return data


def model_device(model: torch.nn.Module, doing: str) -> torch.device:
    """The device of all of `model`'s parameters (ValueError if they are on several, or on a
    device pyunlearn does not run on): batches are moved there."""
    device = one_device(model.named_parameters(), "model", doing)
    ops.supports(device)
    return device


def to_device(batch, device: torch.device):
    """A batch (tensors in nested tuples, None allowed) on `device`; the data sets stay on the host."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple):
        return tuple(to_device(b, device) for b in batch)
    return batch


def optimise(model: torch.nn.Module, method: str, batches: Callable, loss: Callable, *, epochs: int,
             lr: float, keep: float | None, momentum: float = 0.9, weight_decay: float = 0.0,
             seed: int = 0, clip: float | None = None) -> UnlearnReport:
    """SGD over `batches(generator)` (a fresh iterator each epoch, on the host) minimising
    `loss(batch)`, each batch moved to the model's device."""
    epochs, lr = positive_int("epochs", epochs), positive_number("lr", lr)
    device = model_device(model, method)
    keep = check_keep(keep)
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("model has no trainable parameters (none with requires_grad=True)")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    mask = LayerwiseMask(model, optimizer, keep) if keep is not None else None
    generator = torch.Generator().manual_seed(seed)
    start, steps = time.perf_counter(), 0
    was_training = model.training
    model.train()
    try:
        for _ in range(epochs):
            for batch in batches(generator):
                batch = to_device(batch, device)
                optimizer.zero_grad()
                loss(batch).backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                (mask.step if mask is not None else optimizer.step)()
                steps += 1
    finally:
        model.train(was_training)
    return UnlearnReport(method, keep, steps, time.perf_counter() - start)
