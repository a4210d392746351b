"""Algorithm 3, optimisation-based unlearning: gradient ascent on the forget samples,
optionally with gradient descent on retained samples."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..data import SampleSet
from ._loop import UnlearnReport, check_data, optimise
from .buffers import warn_stale_buffers


def gradient_ascent(model: torch.nn.Module, forget_data: SampleSet, keep: float | None = None, *,
                    epochs: int = 3, lr: float = 0.005, retain_data: SampleSet | None = None,
                    retain_weight: float = 1.0, batch_size: int = 64, clip: float = 5.0,
                    seed: int = 0) -> UnlearnReport:
    """Maximises the cross-entropy on `forget_data` (in place). With `retain_data`, each step also
    minimises `retain_weight` × the cross-entropy on a retained batch of the same size, which
    holds accuracy up. keep=None is the naive method; keep=r updates only each layer's top-r
    share of entries by |gradient|. The gradient norm is clipped at `clip`: the ascent loss is
    unbounded and would otherwise blow the weights up. Defaults: 3 epochs, SGD lr 0.005.
    The method has a narrow useful range: on the Fashion-MNIST CNN with retained data, 300
    random samples move little at lr 0.002 and lose 14 points of test accuracy at 0.01 (naive;
    5 with keep 0.1), and forgetting a whole class (6000 samples) collapses the model to chance
    at any of these rates. Tune epochs and lr on held-out data for your model."""
    forget_data = check_data("forget_data", forget_data)
    if retain_data is not None:
        retain_data = check_data("retain_data", retain_data)

    def batches(generator):
        forget = forget_data.batches(batch_size, generator=generator)
        if retain_data is None:
            return ((b, None) for b in forget)
        retain = retain_data.batches(batch_size, generator=generator)
        return ((f, r) for f, r in zip(forget, _cycle(retain_data, retain, batch_size, generator)))

    def loss(pair):
        (_, x, y), retained = pair
        value = -F.cross_entropy(model(x), y)
        if retained is not None:
            value = value + retain_weight * F.cross_entropy(model(retained[1]), retained[2])
        return value

    report = optimise(model, "gradient ascent", batches, loss, epochs=epochs, lr=lr, keep=keep, seed=seed, clip=clip)
    warn_stale_buffers(model, "gradient_ascent")  # it trained, in train mode, on forget batches
    return report


def _cycle(data, first, batch_size, generator):
    """Retained batches without end (a small retain set is reshuffled and reused)."""
    yield from first
    while True:
        yield from data.batches(batch_size, generator=generator)
