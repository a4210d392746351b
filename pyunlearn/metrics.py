"""How well a model forgot: UA, RA, TA and MIA-efficacy, in percent.

- UA (unlearning accuracy): 100 − accuracy on the forget set.
- RA, TA: accuracy on the retained training samples and on the test set.
- MIA-efficacy (as in the SalUn / Unlearn-Sparse evaluations): an RBF support-vector classifier
  on the true-class confidence learns to tell members (retained samples) from non-members (test
  samples); MIA-efficacy is the share of forget samples it calls non-members. Higher means the
  forget set looks less like training data.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data import SampleSet


@dataclass
class Evaluation:
    UA: float
    RA: float
    TA: float
    MIA: float

    def gap(self, reference: "Evaluation") -> float:
        """Average absolute difference over the four numbers (to a retrained model, say)."""
        return float(np.mean([abs(a - b) for a, b in zip(asdict(self).values(), asdict(reference).values())]))


@torch.no_grad()
def predictions(model: torch.nn.Module, data: SampleSet, batch_size: int = 1024) -> torch.Tensor:
    """Softmax probabilities on the host, in eval mode (the model's mode is restored). The model
    may live on a GPU (all of it on one device); the batches are moved there."""
    from ._model import one_device
    from .ops import supports

    device = one_device(model.named_parameters(), "model", "evaluating")
    supports(device)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([torch.softmax(model(data.x[i : i + batch_size].to(device)), dim=1).cpu()
                          for i in range(0, len(data), batch_size)])
    finally:
        model.train(was_training)


def accuracy(model: torch.nn.Module, data: SampleSet) -> float:
    if len(data) == 0:
        raise ValueError("cannot measure accuracy on an empty set")
    return 100.0 * float((predictions(model, data).argmax(1) == data.y).float().mean())


def true_class_confidence(model: torch.nn.Module, data: SampleSet) -> np.ndarray:
    probs = predictions(model, data)
    return probs.gather(1, data.y[:, None]).squeeze(1).numpy()


def mia_efficacy(model, *, forget: SampleSet, retain: SampleSet, test: SampleSet, seed: int = 0,
                 max_samples: int = 5000) -> float:
    """Percent of forget samples an RBF SVC (trained on true-class confidence of retained
    members vs test non-members) calls non-members. The training sets are len(test) samples
    each, capped at `max_samples` (libsvm's cost grows with the square), drawn under `seed`."""
    from sklearn.svm import SVC

    rng = np.random.default_rng(seed)
    n = min(len(test), len(retain), max_samples)
    members = retain.subset(torch.from_numpy(rng.choice(len(retain), n, replace=False)))
    non_members = test.subset(torch.from_numpy(rng.choice(len(test), n, replace=False)))
    features = np.concatenate([true_class_confidence(model, members), true_class_confidence(model, non_members)])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(features[:, None], labels)
    called_out = attack.predict(true_class_confidence(model, forget)[:, None]) == 0
    return 100.0 * float(called_out.mean())


def evaluate(model: torch.nn.Module, *, forget: SampleSet, retain: SampleSet, test: SampleSet, seed: int = 0,
             mia_samples: int = 5000, progress: bool | None = None) -> Evaluation:
    """UA, RA, TA and MIA-efficacy of `model`. progress: a progress bar over the four (the MIA's
    attack model takes longest); None (default): when standard error is a terminal."""
    for name, data in (("forget", forget), ("retain", retain), ("test", test)):
        if not isinstance(data, SampleSet):
            raise TypeError(f"{name} must be a pyunlearn.data.SampleSet, got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError(f"{name} is empty")
    phases = {
        "UA": lambda: 100.0 - accuracy(model, forget),
        "RA": lambda: accuracy(model, retain),
        "TA": lambda: accuracy(model, test),
        "MIA": lambda: mia_efficacy(model, forget=forget, retain=retain, test=test, seed=seed,
                                    max_samples=mia_samples),
    }
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return Evaluation(**{name: measure() for name, measure in phases.items()})
    from tqdm import tqdm

    values = {}
    with tqdm(total=len(phases), desc="evaluating", unit="metric") as bar:
        for name, measure in phases.items():
            bar.set_postfix_str(name)
            values[name] = measure()
            bar.update()
    return Evaluation(**values)
