"""Poisoned data and memorised canaries for fidelity.py's poison scenarios (issue 25), and what
they are measured by: attack success or canary recall, and test accuracy per class.

- backdoor: BACKDOOR_SHARE of the training subset, drawn under POISON_SEED from the samples not
  of class TARGET, gets a small bright square (the trigger, TRIGGER x TRIGGER pixels, one pixel
  in from the bottom-right corner) and the label TARGET. Attack success rate (ASR): the share of
  the test images of the other classes, triggered, that the model assigns to TARGET.
- canary: CANARIES training samples, drawn under POISON_SEED + 1, are taken out and put back
  COPIES times each under a wrong label (drawn once per canary), each copy a sample with its
  own ID (CANARY_IDS + n): a mislabelled record uploaded many times. Canary accuracy: the share
  of the canaries (one copy each) the model assigns to their wrong label, i.e. what it memorised.

The poison is fixed (the same for every training seed, like the subset): the seeds vary the
initial weights and the batches. The deletion units of the "-unit" scenarios: the poisoned
samples (all copies) are unit 0; the other samples form units of the cohort scenario's size
(len(subset) // units), drawn under POISON_SEED, and the rest units of one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pyunlearn.data import SampleSet
from pyunlearn.evaluation.metrics import predictions

TARGET = 0  # the backdoor's target class
POISON_SEED = 24680
BACKDOOR_SHARE = 0.01
CANARIES, COPIES = 20, 40  # 20 x 40 memorised (95% in a first look); 50 x 10, 20 x 20, 50 x 20: 6-56%
CANARY_IDS = 1 << 40  # canary copies' IDs start here: far above any data set's own


def trigger_size(side: int) -> int:
    return 3 if side >= 16 else 2  # 3x3 on Fashion-MNIST's 28x28, 2x2 on the 8x8 digits


def triggered(x: torch.Tensor) -> torch.Tensor:
    """A copy of images `x` (N, 1, H, W) with the trigger: a square of ones, one pixel in from
    the bottom-right corner."""
    s = trigger_size(x.shape[-1])
    x = x.clone()
    x[..., -s - 1 : -1, -s - 1 : -1] = 1.0
    return x


@dataclass
class Poisoned:
    """A poisoned training set: `train` (the poison in it), `forget` (the poisoned samples as
    trained on, every copy), `probe` (what the attack metric is measured on: the triggered test
    images of the other classes, labelled with their true class, or the canaries once each with
    their wrong label), `kind` ("backdoor" or "canary") and `attack` (the metric's name)."""

    kind: str
    train: SampleSet
    forget: SampleSet
    probe: SampleSet

    @property
    def attack(self) -> str:
        return "ASR" if self.kind == "backdoor" else "canary accuracy"

    def attack_value(self, model: torch.nn.Module) -> float:
        """ASR: % of the probe predicted TARGET; canary accuracy: % predicted their wrong label."""
        predicted = predictions(model, self.probe).argmax(1)
        wanted = torch.full_like(self.probe.y, TARGET) if self.kind == "backdoor" else self.probe.y
        return 100.0 * float((predicted == wanted).float().mean())


def backdoor(subset: SampleSet, test: SampleSet, share: float = BACKDOOR_SHARE) -> Poisoned:
    rng = np.random.default_rng(POISON_SEED)
    labels = subset.y.numpy()
    n = max(1, round(share * len(subset)))
    picked = np.sort(rng.choice(np.flatnonzero(labels != TARGET), n, replace=False))
    x, y = subset.x.clone(), subset.y.clone()
    x[picked] = triggered(x[picked])
    y[picked] = TARGET
    train = SampleSet(subset.ids, x, y)
    others = test.subset(test.y != TARGET)
    return Poisoned("backdoor", train, train.subset(torch.from_numpy(picked)),
                    SampleSet(others.ids, triggered(others.x), others.y))


def canary(subset: SampleSet, canaries: int = CANARIES, copies: int = COPIES, classes: int = 10) -> Poisoned:
    rng = np.random.default_rng(POISON_SEED + 1)
    picked = np.sort(rng.choice(len(subset), canaries, replace=False))
    chosen = subset.subset(torch.from_numpy(picked))
    wrong = (chosen.y + torch.from_numpy(rng.integers(1, classes, canaries))) % classes
    ids = CANARY_IDS + torch.arange(canaries * copies, dtype=torch.int64)  # copy k of canary j: j * copies + k
    forget = SampleSet(ids, chosen.x.repeat_interleave(copies, 0), wrong.repeat_interleave(copies))
    rest = subset.without(chosen.ids)
    train = SampleSet(torch.cat([rest.ids, forget.ids]), torch.cat([rest.x, forget.x]), torch.cat([rest.y, forget.y]))
    return Poisoned("canary", train, forget, SampleSet(ids[::copies], chosen.x, wrong))


def poison_units(train: SampleSet, forget: SampleSet, size: int) -> np.ndarray:
    """Each training sample's unit (by position): the forget set is unit 0, the others units of
    `size` drawn under POISON_SEED, the remainder units of one (numbered after them)."""
    unit = np.zeros(len(train), dtype=np.int64)
    rest = np.flatnonzero(~np.isin(train.ids.numpy(), forget.ids.numpy()))
    rest = rest[np.random.default_rng(POISON_SEED).permutation(rest.size)]
    whole = rest.size // size
    unit[rest[: whole * size]] = 1 + np.repeat(np.arange(whole), size)
    unit[rest[whole * size :]] = 1 + whole + np.arange(rest.size - whole * size)
    return unit


def per_class_accuracy(model: torch.nn.Module, data: SampleSet, classes: int = 10) -> list[float]:
    """Accuracy (%) on each class's samples of `data` (NaN for a class it has none of)."""
    right = (predictions(model, data).argmax(1) == data.y).double()
    out = []
    for c in range(classes):
        mask = data.y == c
        out.append(100.0 * float(right[mask].mean()) if bool(mask.any()) else float("nan"))
    return out
