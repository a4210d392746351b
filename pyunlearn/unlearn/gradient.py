"""Algorithm 3, optimisation-based unlearning: gradient ascent on the forget samples,
optionally with gradient descent on retained samples."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..data import SampleSet
from .._validate import finite_number, positive_int
from ..evaluation.metrics import class_logits
from ._loop import HeldOutTarget, RetainGuard, UnlearnReport, check_data, optimise
from .buffers import warn_stale_buffers


def gradient_ascent(model: torch.nn.Module, forget_data: SampleSet, keep: float | None = None, *,
                    epochs: int = 3, lr: float = 0.005, retain_data: SampleSet | None = None,
                    retain_weight: float = 1.0, batch_size: int = 64, clip: float = 5.0,
                    seed: int = 0, max_steps: int | None = 15, max_retain_drop: float | None = 5.0,
                    guard_every: int = 5, guard_samples: int = 1024, mask: str = "step",
                    held_out_data: SampleSet | None = None, held_out_samples: int = 8192,
                    generalisation_gap: float | None = None) -> UnlearnReport:
    """Maximises the cross-entropy on `forget_data` (in place). With `retain_data`, each step also
    minimises `retain_weight` × the cross-entropy on a retained batch of the same size, which
    holds accuracy up. keep=None is the naive method; keep=r updates only each layer's top-r
    share of entries by |gradient|. The gradient norm is clipped at `clip`: the ascent loss is
    unbounded and would otherwise blow the weights up. Defaults: 3 epochs, SGD lr 0.005.
    The method has a narrow useful range: on the Fashion-MNIST CNN with retained data, 300
    random samples move little at lr 0.002 and lose 14 points of test accuracy at 0.01 (naive;
    5 with keep 0.1), and forgetting a whole class (6000 samples) collapses the model to chance
    at any of these rates. Tune epochs and lr on held-out data for your model.

    Two limits keep a large forget set from collapsing the model: `max_steps` (default 15, the
    steps the defaults take on 300 samples; None: no cap) ends the run after that many steps;
    and with `retain_data` a guard checks accuracy on up to `guard_samples` retained samples
    every `guard_every` steps and, once it has fallen more than `max_retain_drop` points below
    its value before the run, puts the model back to the last check that passed and stops
    (max_retain_drop=None: no guard). The report says why a run stopped early (`stopped`). The
    budget alone does not hold a model up: without retained data, 15 steps on 2,000 samples
    collapsed a small CNN (retained accuracy 18%; tests/unlearn/test_retained_accuracy_guard.py); pass `retain_data`.

    With `held_out_data` (samples of the training distribution the model never trained on: a
    validation split, not the test set you report on) and `retain_data`, the run also ends at
    the first check (before the first step, then after each epoch) where the forget set's mean
    loss, against the held-out mean loss, has risen by the model's generalisation gap: mean
    held-out − mean retained loss, measured before the run on up to `held_out_samples` of each
    (the estimate's standard error shrinks with them: ~0.012 nats at 8192 on the Fashion-MNIST
    CNN, whose gap is 0.03–0.045), or passed as `generalisation_gap` (from
    pyunlearn.metrics.generalisation_gap: measure it once for a model that serves many
    deletion requests; it costs forward passes over up to 2 × held_out_samples samples; a gap
    passed in is used as given, and the run's own measurement draws other samples, so the two
    differ by their sampling error). Then the forget set is scored like unseen data, which is
    where retraining puts a forget set drawn like the rest of the training data (see
    HeldOutTarget; not a class, which retraining scores far worse). The epoch that reaches the
    gap passes it: the model is put back on the straight line between the last two checks
    where the rise meets the gap (`stopped` says where and the rise measured there). A model
    that fits its training data no better than unseen data takes no step.
    The target ends the run only within `epochs` and `max_steps`: raise them (max_steps=None)
    to let it decide, and keep the guard.

    mask (with keep): "step" updates each step's top-|grad| entries; "saliency" fixes, before
    the first step, each layer's top entries by the forget set's loss-gradient magnitude (SalUn's
    weight saliency)."""
    forget_data = check_data("forget_data", forget_data)
    target = None
    if held_out_data is not None:
        if generalisation_gap is not None:
            generalisation_gap = finite_number("generalisation_gap", generalisation_gap)
        elif retain_data is None:
            raise ValueError("held_out_data needs retain_data too (or generalisation_gap): the target is the rise "
                             "from the retained loss to the held-out loss (the model's generalisation gap)")
        held_out_samples = positive_int("held_out_samples", held_out_samples)
        target = lambda: HeldOutTarget(model, forget_data, held_out_data, retain_data, samples=held_out_samples,  # noqa: E731
                                       seed=seed, gap=generalisation_gap)
    elif generalisation_gap is not None:
        raise ValueError("generalisation_gap needs held_out_data too: the target compares the forget set's loss "
                         "with the held-out loss after every epoch")
    guard = None
    if retain_data is not None:
        retain_data = check_data("retain_data", retain_data)
        if max_retain_drop is not None:
            guard = RetainGuard(retain_data, max_drop=max_retain_drop, every=guard_every, samples=guard_samples,
                                seed=seed)

    def batches(generator):
        forget = forget_data.batches(batch_size, generator=generator)
        if retain_data is None:
            return ((b, None) for b in forget)
        retain = retain_data.batches(batch_size, generator=generator)
        return ((f, r) for f, r in zip(forget, _cycle(retain_data, retain, batch_size, generator)))

    def loss(pair):
        (_, x, y), retained = pair
        value = -F.cross_entropy(class_logits(model(x)), y)
        if retained is not None:
            value = value + retain_weight * F.cross_entropy(class_logits(model(retained[1])), retained[2])
        return value

    report = optimise(model, "gradient ascent", batches, loss, epochs=epochs, lr=lr, keep=keep, seed=seed, clip=clip,
                      max_steps=max_steps, guard=guard, target=target, mask=mask, saliency_data=forget_data)
    warn_stale_buffers(model, "gradient_ascent")  # it trained, in train mode, on forget batches
    return report


def _cycle(data, first, batch_size, generator):
    """Retained batches without end (a small retain set is reshuffled and reused)."""
    yield from first
    while True:
        yield from data.batches(batch_size, generator=generator)
