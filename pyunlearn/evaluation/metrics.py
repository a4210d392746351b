"""How well a model forgot: UA, RA, TA and MIA-efficacy, in percent.

- UA (unlearning accuracy): 100 − accuracy on the forget set.
- RA, TA: accuracy on the retained training samples and on the test set.
- MIA-efficacy (as in the SalUn / Unlearn-Sparse evaluations): an RBF support-vector classifier
  on the true-class confidence learns to tell members (retained samples) from non-members (test
  samples); MIA-efficacy is the share of forget samples it calls non-members. Higher means the
  forget set looks less like training data. On a small forget set it varies with the attack's
  training sample (on 200 Fashion-MNIST samples, 17 to 37.5 across seeds): `mia_spread`
  averages it over several seeds and reports the spread.

Per-sample signals, stronger than one attack model (`compare`):

- membership gap: mean cross-entropy on the forget set − mean cross-entropy on the test set
  (nats). Near 0 when the forget set looks like unseen data; negative while it is still
  remembered.
- generalisation gap: mean cross-entropy on held-out samples − mean cross-entropy on retained
  (trained-on) samples (nats): how far a retrain should raise a forget set drawn like the
  training data (gradient ascent's held-out target).
- forget-loss KS: the two-sample Kolmogorov–Smirnov statistic between the per-sample forget-set
  losses of a model and of a reference (a retrained model): 0 for identical distributions, 1
  for disjoint ones.
- forget KL: the mean KL divergence KL(reference ‖ model) of the two models' softmax outputs on
  the forget set (nats).
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .._validate import positive_int
from ..data import SampleSet, checked_samples


@dataclass
class Evaluation:
    UA: float
    RA: float
    TA: float
    MIA: float

    def gap(self, reference: "Evaluation") -> float:
        """Average absolute difference over the four numbers (to a retrained model, say)."""
        return float(np.mean([abs(a - b) for a, b in zip(asdict(self).values(), asdict(reference).values())]))


def class_logits(output) -> torch.Tensor:
    """A model's output as class logits, (batch, classes): what the metrics, the unlearning
    methods and `pyunlearn.forget`'s guard read from `model(x)`. A tensor is the logits; a
    Hugging Face model's output (a ModelOutput, as BertForSequenceClassification returns) gives
    its `.logits`. Anything else is refused: which element of a tuple holds the logits is the
    model's to say, and logits of another shape (a language model's, per token) are not a
    class per sample, which is what these measure."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model(x) returned {type(output).__name__}, not class logits: pyunlearn reads model(x) as a "
                        "(batch, classes) tensor, or the .logits of a Hugging Face output. Wrap the model in a module "
                        "whose forward returns the logits")
    if logits.ndim != 2:
        raise ValueError(f"model(x) gave logits of shape {tuple(logits.shape)}, not (batch, classes): the metrics, "
                         "the unlearning methods and pyunlearn.forget's guard measure classifiers, one class per "
                         "sample. For other models, forget with amnesiac_forget (subtraction alone) and measure "
                         "the result your own way")
    return logits


@torch.no_grad()
def predictions(model: torch.nn.Module, data: SampleSet, batch_size: int = 1024) -> torch.Tensor:
    """Softmax probabilities on the host, in eval mode (the model's mode is restored). The model
    may live on a GPU (all of it on one device); the batches are moved there."""
    from ..kernels import supports
    from ..kernels.checks import one_device

    device = one_device(model.named_parameters(), "model", "evaluating")
    supports(device)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([torch.softmax(class_logits(model(data.x[i : i + batch_size].to(device))), dim=1).cpu()
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


MIA_PROTOCOLS = ("sampled", "reference")


def mia_efficacy(model, *, forget: SampleSet, retain: SampleSet, test: SampleSet, seed: int = 0,
                 max_samples: int = 5000, protocol: str = "sampled") -> float:
    """Percent of forget samples an RBF SVC (trained on true-class confidence of retained
    members vs test non-members) calls non-members.

    protocol="sampled" (default): the training sets are len(test) samples each, capped at
    `max_samples` (libsvm's cost grows with the square), drawn at random under `seed`.
    protocol="reference": the SalUn / Unlearn-Sparse evaluation's choice: the first len(test)
    retained samples as members and the whole test set as non-members (no cap, no draw, so
    `seed` and `max_samples` do not apply; with 10,000 test samples the attack trains on
    20,000 points, several seconds)."""
    from sklearn.svm import SVC

    if protocol not in MIA_PROTOCOLS:
        raise ValueError(f"protocol must be one of {MIA_PROTOCOLS}, got {protocol!r}")
    if protocol == "reference":
        n = min(len(test), len(retain))
        members, non_members = retain.subset(torch.arange(n)), test.subset(torch.arange(n))
    else:
        rng = np.random.default_rng(seed)
        n = min(len(test), len(retain), max_samples)
        members = retain.subset(torch.from_numpy(rng.choice(len(retain), n, replace=False)))
        non_members = test.subset(torch.from_numpy(rng.choice(len(test), n, replace=False)))
    features = np.concatenate([true_class_confidence(model, members), true_class_confidence(model, non_members)])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(features[:, None], labels)
    called_out = attack.predict(true_class_confidence(model, forget)[:, None]) == 0
    return 100.0 * float(called_out.mean())


@dataclass
class MiaSpread:
    mean: float
    sd: float  # sample standard deviation over the seeds (0 for one seed)
    values: list[float]


def mia_spread(model, *, forget: SampleSet, retain: SampleSet, test: SampleSet, seeds=(0, 1, 2),
               max_samples: int = 5000, protocol: str = "sampled") -> MiaSpread:
    """MIA-efficacy over several attack seeds (each draws its own members and non-members):
    mean, sample standard deviation and the values. protocol="reference" draws nothing, so
    one seed is enough there (more give the same value)."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    values = [mia_efficacy(model, forget=forget, retain=retain, test=test, seed=int(s), max_samples=max_samples,
                           protocol=protocol) for s in seeds]
    return MiaSpread(float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, values)


@torch.no_grad()
def losses(model: torch.nn.Module, data: SampleSet, batch_size: int = 1024) -> np.ndarray:
    """Per-sample cross-entropy (nats), in eval mode (the model's mode is restored)."""
    probs = predictions(model, data, batch_size)
    return (-torch.log(probs.gather(1, data.y[:, None]).squeeze(1).clamp_min(1e-12))).double().numpy()


def membership_gap(model: torch.nn.Module, *, forget: SampleSet, test: SampleSet) -> float:
    """Mean forget-set loss − mean test loss (nats): about 0 when the forget set looks unseen,
    negative while the model still fits it better than unseen data."""
    return float(losses(model, forget).mean() - losses(model, test).mean())


def generalisation_gap(model: torch.nn.Module, *, retain: SampleSet, held_out: SampleSet, samples: int = 8192,
                       seed: int = 0) -> float:
    """Mean cross-entropy on held-out samples − mean cross-entropy on retained (trained-on)
    samples (nats), on up to `samples` of each drawn under `seed` (held-out) and `seed` + 1
    (retained): how much lower training put the loss of the samples it saw. The estimate's
    standard error is about sd(loss) · √(2 / samples): on the Fashion-MNIST CNN ~0.012 nats at
    8,192 samples (per-sample losses' sd 0.7–0.8) against a gap of 0.03–0.045. It is a property
    of the model: measure it once and pass it to gradient_ascent(generalisation_gap=...) for
    every deletion request against that model, rather than paying these forward passes each
    time. ValueError names the set the model cannot score, or says the gap is not finite."""
    gap = measured_gap(model, retain, held_out, positive_int("samples", samples), seed, ("retain", "held_out"))
    if not math.isfinite(gap):
        raise ValueError("the model's loss on retain or held_out is not finite (NaN or Inf): no generalisation gap "
                         "can be measured; check the model and the data")
    return gap


def measured_gap(model, retain: SampleSet, held_out: SampleSet, samples: int, seed: int, args: tuple[str, str]) -> float:
    """generalisation_gap without its checks; `args` name retain and held_out in errors (the
    callers' own argument names)."""
    return (mean_loss(model, _sample_set(args[1], held_out).draw(samples, seed=seed), args[1])
            - mean_loss(model, _sample_set(args[0], retain).draw(samples, seed=seed + 1), args[0]))


def _sample_set(arg: str, data) -> SampleSet:
    return checked_samples(arg, data, when_empty="there is no loss to measure")


def mean_loss(model: torch.nn.Module, data: SampleSet, arg: str) -> float:
    """Mean per-sample cross-entropy; errors name the argument `arg` that held `data`."""
    data = _sample_set(arg, data)
    try:
        return float(losses(model, data).mean())
    except (RuntimeError, IndexError) as exc:  # wrong feature shape, labels past the model's classes
        raise ValueError(f"{arg}: the model cannot score these samples ({exc})") from exc


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov–Smirnov statistic: the largest distance between the empirical
    distribution functions of `a` and `b` (0: the same samples; 1: no overlap)."""
    a, b = np.sort(np.asarray(a, dtype=np.float64).ravel()), np.sort(np.asarray(b, dtype=np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise ValueError(f"ks_statistic needs two non-empty samples, got sizes {a.size} and {b.size}")
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / a.size
    cdf_b = np.searchsorted(b, points, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def output_kl(model: torch.nn.Module, reference: torch.nn.Module, data: SampleSet) -> float:
    """Mean over `data` of KL(reference ‖ model) between the two models' softmax outputs (nats)."""
    p = predictions(reference, data).double().clamp_min(1e-12)
    q = predictions(model, data).double().clamp_min(1e-12)
    return float((p * (p.log() - q.log())).sum(1).mean())


@dataclass
class Comparison:
    """How `model` differs from `reference` on the forget set (see the module docstring)."""

    forget_loss_ks: float
    forget_kl: float


def compare(model: torch.nn.Module, reference: torch.nn.Module, forget: SampleSet) -> Comparison:
    """The per-sample signals of `model` against `reference` (a retrained model) on `forget`."""
    return Comparison(ks_statistic(losses(model, forget), losses(reference, forget)),
                      output_kl(model, reference, forget))


def evaluate(model: torch.nn.Module, *, forget: SampleSet, retain: SampleSet, test: SampleSet, seed: int = 0,
             mia_samples: int = 5000, progress: bool | None = None, mia_protocol: str = "sampled") -> Evaluation:
    """UA, RA, TA and MIA-efficacy of `model` (one attack seed; `mia_spread` for several).
    progress: a progress bar over the four (the MIA's attack model takes longest); None
    (default): when standard error is a terminal. mia_protocol: see `mia_efficacy`."""
    for name, data in (("forget", forget), ("retain", retain), ("test", test)):
        if not isinstance(data, SampleSet):
            raise TypeError(f"{name} must be a pyunlearn.data.SampleSet, got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError(f"{name} is empty")
    if mia_protocol not in MIA_PROTOCOLS:
        raise ValueError(f"mia_protocol must be one of {MIA_PROTOCOLS}, got {mia_protocol!r}")
    phases = {
        "UA": lambda: 100.0 - accuracy(model, forget),
        "RA": lambda: accuracy(model, retain),
        "TA": lambda: accuracy(model, test),
        "MIA": lambda: mia_efficacy(model, forget=forget, retain=retain, test=test, seed=seed,
                                    max_samples=mia_samples, protocol=mia_protocol),
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
