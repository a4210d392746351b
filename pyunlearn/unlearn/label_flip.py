"""Algorithm 2, label flipping: train on the forget samples with random wrong labels."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..data import SampleSet
from ..evaluation.metrics import class_logits
from ._loop import RetainGuard, UnlearnReport, check_data, model_device, optimise
from .buffers import warn_stale_buffers


def random_wrong_labels(y: torch.Tensor, classes: int, generator: torch.Generator) -> torch.Tensor:
    """A label ≠ y for every sample, uniform over the other classes."""
    shift = torch.randint(1, classes, y.shape, generator=generator)
    return (y + shift) % classes


def label_flip(model: torch.nn.Module, forget_data: SampleSet, keep: float | None = None, *, epochs: int = 5,
               lr: float = 0.001, batch_size: int = 64, classes: int | None = None, seed: int = 0,
               max_steps: int | None = 25, retain_data: SampleSet | None = None, max_retain_drop: float = 5.0,
               guard_every: int = 5, guard_samples: int = 1024, mask: str = "step") -> UnlearnReport:
    """Trains `model` in place on `forget_data` with labels drawn afresh each epoch from the
    wrong classes. keep=None is the naive method; keep=r updates only each layer's top-r share
    of entries by |gradient| at each step. Defaults: 5 epochs, SGD lr 0.001, momentum 0.9, batch
    64. On the Fashion-MNIST CNN (300 random samples) they raise the forget error from 12% to 43%
    (naive) or 33% (keep 0.1), and cost 30 (naive) or 18 (partial) points of test accuracy;
    lr 0.01 forgets everything and leaves the model near chance.

    Two limits keep a large forget set from collapsing the model (at 5 epochs a 2,000-sample set
    took 160 steps and left test accuracy at chance): `max_steps` (default 25, the steps the
    defaults take on 300 samples; None: no cap) ends the run after that many steps, so a larger
    forget set is seen fewer times; and with `retain_data` a guard checks accuracy on up to
    `guard_samples` retained samples every `guard_every` steps and, once it has fallen more than
    `max_retain_drop` points below its value before the run, puts the model back to the last
    check that passed and stops. The report says why a run stopped early (`stopped`).

    mask (with keep): "step" updates each step's top-|grad| entries; "saliency" fixes, before
    the first step, each layer's top entries by the forget set's loss-gradient magnitude (true
    labels; SalUn's weight saliency), so the update goes where the forget set is encoded."""
    forget_data = check_data("forget_data", forget_data)
    guard = None if retain_data is None else RetainGuard(retain_data, max_drop=max_retain_drop, every=guard_every,
                                                          samples=guard_samples, seed=seed)
    if classes is None:  # one probe, in eval mode: BatchNorm must neither fail nor update on it
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                classes = int(class_logits(model(forget_data.x[:1].to(model_device(model, "label flip")))).shape[1])
        finally:
            model.train(was_training)
    if classes < 2:
        raise ValueError(f"label flipping needs at least 2 classes, got {classes}")
    if int(forget_data.y.max()) >= classes or int(forget_data.y.min()) < 0:
        raise ValueError(f"forget_data labels must lie in [0, {classes})")

    def batches(generator):
        flipped = random_wrong_labels(forget_data.y, classes, generator)
        relabelled = SampleSet(forget_data.ids, forget_data.x, flipped)
        return relabelled.batches(batch_size, generator=generator)

    report = optimise(model, "label flip", batches, lambda b: F.cross_entropy(class_logits(model(b[1])), b[2]),
                      epochs=epochs, lr=lr, keep=keep, seed=seed, max_steps=max_steps, guard=guard,
                      mask=mask, saliency_data=forget_data)
    warn_stale_buffers(model, "label_flip")  # it trained, in train mode, on forget batches
    return report
