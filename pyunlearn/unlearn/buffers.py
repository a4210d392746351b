"""Buffers that forgetting does not reach: BatchNorm's running statistics.

Amnesiac unlearning subtracts parameter updates, and label flipping / gradient ascent train on
the forget set; neither puts back the running mean and variance a BatchNorm layer gathered
while the forget samples trained (the latter even move them further with forget batches). In
eval mode a model normalises with those statistics, so they keep a trace of the forget set and
no longer match the changed weights. `recompute_batchnorm` rebuilds them from retained data; the
forgetting functions warn (`StaleBuffersWarning`) when the model has such buffers.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

from .._validate import positive_int
from ._loop import model_device, to_device
from ..data import SampleSet
from ..errors import StaleBuffersWarning


def batchnorm_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.modules.batchnorm._NormBase]]:
    """(name, module) of every BatchNorm / InstanceNorm layer that keeps running statistics."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
            and m.running_mean is not None]


def warn_stale_buffers(model: torch.nn.Module, method: str) -> None:
    """Warns once per call if `model` has running statistics that `method` left as trained."""
    layers = batchnorm_layers(model)
    if not layers:
        return
    names = ", ".join(name or "<model>" for name, _ in layers[:3]) + (", ..." if len(layers) > 3 else "")
    warnings.warn(
        f"{method} changed the weights but left the BatchNorm running statistics of {len(layers)} layer(s) "
        f"({names}) as they were trained, forget samples included: recompute them from retained data with "
        "pyunlearn.unlearn.recompute_batchnorm(model, retain_data)",
        StaleBuffersWarning, stacklevel=_user_stacklevel())


# The files whose frames a warning skips to reach the user's line: this package's and contextlib's
# (a `with forgetting(...)` block's exit runs there).
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_CONTEXTLIB = contextlib.__file__


def _user_stacklevel() -> int:
    """The stacklevel of the first caller outside pyunlearn and contextlib, for warnings.warn
    called from the function that calls this one: the user's line, whether the warning comes
    from amnesiac_forget or from the exit of a `with forgetting(...)` block."""
    frame, level = sys._getframe(2), 2  # the warning's own caller is level 1
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE)
                                 or frame.f_code.co_filename == _CONTEXTLIB):
        frame, level = frame.f_back, level + 1
    return level


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, data: SampleSet, *, batch_size: int = 256,
                        max_samples: int | None = None, seed: int = 0) -> int:
    """Resets every BatchNorm layer's running statistics and recomputes them from `data` (retained
    samples), as the cumulative average over forward passes in train mode (momentum None):
    the running mean is then the exact mean of the batches' means. No parameter changes; the
    model's mode and each layer's momentum are restored. `max_samples` caps the samples used
    (drawn under `seed`). Returns the number of samples used (0 if the model has no such layer)."""
    if not isinstance(data, SampleSet):
        raise TypeError(f"data must be a pyunlearn.data.SampleSet (ids, x, y), got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data is empty: there is nothing to recompute the statistics from")
    batch_size = positive_int("batch_size", batch_size)
    layers = [m for _, m in batchnorm_layers(model)]
    if not layers:
        return 0
    if max_samples is not None and positive_int("max_samples", max_samples) < len(data):
        data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:max_samples])
    momenta = [m.momentum for m in layers]
    was_training = model.training
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts alike
        model.train()
        device = model_device(model, "recompute_batchnorm")
        for _, x, _ in data.batches(batch_size, shuffle=False):
            model(to_device(x, device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(data)
