"""Experiments that can tell forgetting apart from noise: every method beside doing nothing and
a second retrain, over several training seeds.

A single table row of one seed cannot say whether a method forgot: two retrained models with
different seeds already differ by several points of MIA-efficacy on a small forget set. `run`
therefore reports, for every training seed:

- **Original**: the trained model, nothing done (what a method must beat);
- **Retrain**: trained without the forget set under the same seed (the target);
- **Retrain seed 2**: trained without the forget set under another seed (`seed + noise_seed_offset`):
  the *noise floor*, how far a model as good as retraining can land from Retrain;
- every method, each on a fresh copy of Original.

Each model is measured with `pyunlearn.metrics`: UA, RA, TA, MIA-efficacy (averaged over
`mia_seeds`), the membership gap, and against Retrain the forget-loss KS statistic and the
forget-set output KL.

**The noise-floor rule.** A model's *distance* to Retrain on a metric, at one training seed, is
|value − Retrain's value| for UA, RA, TA, MIA and the membership gap, and the value itself for
the forget-loss KS and forget KL (they already compare with Retrain). The *noise floor* of a
metric is the largest distance of Retrain seed 2 over the training seeds. A method's difference
from Retrain on a metric counts only where its mean distance over the seeds exceeds that floor;
`Summary.beyond_noise` lists those metrics, and the table marks them. Everything else is within
what retraining itself varies by.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .._validate import positive_int
from ..data import SampleSet
from . import metrics

ORIGINAL, RETRAIN, RETRAIN_2 = "Original", "Retrain", "Retrain seed 2"
METRICS = ("UA", "RA", "TA", "MIA", "membership_gap", "forget_loss_ks", "forget_kl")
# Metrics whose value is already a distance to Retrain.
_DISTANCES = ("forget_loss_ks", "forget_kl")
# The metrics the one-number gap averages (as metrics.Evaluation.gap does).
GAP_METRICS = ("UA", "RA", "TA", "MIA")


@dataclass
class Split:
    """One training seed's data: the training set (forget set included), the forget set and the
    test set. `retain` is the training set without the forget set."""

    train: SampleSet
    forget: SampleSet
    test: SampleSet
    retain: SampleSet = field(init=False)

    def __post_init__(self):
        for name in ("train", "forget", "test"):
            value = getattr(self, name)
            if not isinstance(value, SampleSet):
                raise TypeError(f"Split.{name} must be a pyunlearn.data.SampleSet, got {type(value).__name__}")
            if len(value) == 0:
                raise ValueError(f"Split.{name} is empty")
        self.retain = self.train.without(self.forget.ids)
        if len(self.retain) == len(self.train):
            raise ValueError("Split.forget holds no ID of Split.train: there is nothing to forget")


@dataclass
class Context:
    """What a method is given besides its copy of the original model."""

    seed: int
    split: Split
    artifacts: Any  # what `train(..., record=True)` returned beside the model (e.g. update stores)
    retrain_seconds: float


@dataclass
class MethodRun:
    """One model at one training seed."""

    method: str
    seed: int
    UA: float
    RA: float
    TA: float
    MIA: float
    MIA_sd: float  # over the attack seeds, for this one model
    membership_gap: float
    forget_loss_ks: float
    forget_kl: float
    seconds: float
    retrain_seconds: float
    extra: dict = field(default_factory=dict)  # what the method returned (steps touched, say)

    @property
    def time_share(self) -> float:
        return self.seconds / self.retrain_seconds


@dataclass
class Summary:
    """One method over the training seeds."""

    method: str
    seeds: int
    mean: dict[str, float]
    sd: dict[str, float]  # sample standard deviation over the training seeds (0 for one seed)
    distance: dict[str, float]  # mean distance to Retrain (see the module docstring)
    gap: float  # mean over GAP_METRICS of `distance`
    beyond_noise: list[str]  # metrics whose distance exceeds the noise floor
    time_share: float  # mean seconds / the seed's retrain seconds


def _distance(row: MethodRun, retrain: MethodRun, metric: str) -> float:
    if metric in _DISTANCES:
        return float(getattr(row, metric))
    return abs(float(getattr(row, metric)) - float(getattr(retrain, metric)))


@dataclass
class Results:
    rows: list[MethodRun]
    config: dict = field(default_factory=dict)

    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.rows))

    def _retrain(self, seed: int) -> MethodRun:
        return next(r for r in self.rows if r.method == RETRAIN and r.seed == seed)

    def noise_floor(self) -> dict[str, float]:
        """Per metric: the largest distance of Retrain seed 2 to Retrain over the training seeds."""
        floor_rows = [r for r in self.rows if r.method == RETRAIN_2]
        if not floor_rows:
            raise ValueError("no Retrain seed 2 rows: the noise floor is unknown")
        return {m: max(_distance(r, self._retrain(r.seed), m) for r in floor_rows) for m in METRICS}

    def summary(self) -> list[Summary]:
        floor = self.noise_floor()
        out = []
        for method in self.methods():
            rows = [r for r in self.rows if r.method == method]
            values = {m: np.array([getattr(r, m) for r in rows], dtype=np.float64) for m in METRICS}
            distance = {m: float(np.mean([_distance(r, self._retrain(r.seed), m) for r in rows])) for m in METRICS}
            out.append(Summary(
                method=method, seeds=len(rows),
                mean={m: float(v.mean()) for m, v in values.items()},
                sd={m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()},
                distance=distance,
                gap=float(np.mean([distance[m] for m in GAP_METRICS])),
                beyond_noise=[] if method == RETRAIN else [m for m in METRICS if distance[m] > floor[m]],
                time_share=float(np.mean([r.time_share for r in rows])),
            ))
        return out

    def table(self) -> str:
        """A markdown table: mean ± sd over the training seeds; a * marks a value whose distance
        to Retrain exceeds the noise floor; the rule is stated under the table."""
        floor = self.noise_floor()
        head = ("| method | TA | RA | UA | MIA | membership gap | forget-loss KS vs Retrain | forget KL vs Retrain | "
                "avg gap (UA, RA, TA, MIA) | time / retrain |")
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for s in self.summary():
            def cell(m, digits=2):
                mark = "*" if m in s.beyond_noise else ""
                return f"{s.mean[m]:.{digits}f} ± {s.sd[m]:.{digits}f}{mark}"
            lines.append(f"| {s.method} | {cell('TA')} | {cell('RA')} | {cell('UA')} | {cell('MIA')} | "
                         f"{cell('membership_gap', 3)} | {cell('forget_loss_ks', 3)} | {cell('forget_kl', 3)} | "
                         f"{s.gap:.2f} | {s.time_share:.3f} |")
        seeds = sorted({r.seed for r in self.rows})
        lines.append("")
        lines.append(f"Mean ± sd over {len(seeds)} training seed(s) {seeds}. Noise floor (largest distance of Retrain "
                     "seed 2 to Retrain over the seeds): " + ", ".join(f"{m} {floor[m]:.3g}" for m in METRICS) + ". "
                     "`*`: the method's mean distance to Retrain on that metric exceeds the noise floor (|difference| "
                     "for UA, RA, TA, MIA and the membership gap; the value itself for KS and KL); only those "
                     "differences count.")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "rows": [{**asdict(r), "time_share": r.time_share} for r in self.rows],
            "noise_floor": self.noise_floor(),
            "summary": [asdict(s) for s in self.summary()],
        }


def measure(model: torch.nn.Module, retrained: torch.nn.Module, split: Split, *, mia_seeds=(0, 1, 2),
            mia_samples: int = 5000, mia_protocol: str = "sampled") -> dict[str, float]:
    """Every metric of `model` against `retrained` on one split, as a dict of METRICS (+ MIA_sd)."""
    forget, retain, test = split.forget, split.retain, split.test
    spread = metrics.mia_spread(model, forget=forget, retain=retain, test=test, seeds=mia_seeds,
                                max_samples=mia_samples, protocol=mia_protocol)
    comparison = metrics.compare(model, retrained, forget)
    return dict(UA=100.0 - metrics.accuracy(model, forget), RA=metrics.accuracy(model, retain),
                TA=metrics.accuracy(model, test), MIA=spread.mean, MIA_sd=spread.sd,
                membership_gap=metrics.membership_gap(model, forget=forget, test=test),
                forget_loss_ks=comparison.forget_loss_ks, forget_kl=comparison.forget_kl)


def run(*, seeds, prepare: Callable[[int], Split], train: Callable[[SampleSet, int, bool], tuple[torch.nn.Module, Any]],
        methods: dict[str, Callable[[torch.nn.Module, Context], Any]], noise_seed_offset: int = 1000,
        mia_seeds=(0, 1, 2), mia_samples: int = 5000, mia_protocol: str = "sampled",
        log: Callable[[str], None] | None = print, config: dict | None = None) -> Results:
    """Runs every method against Original, Retrain and Retrain seed 2 for each training seed.

    prepare(seed) → Split: the data of one training seed (the forget set may depend on it).
    train(data, seed, record) → (model, artifacts): trains a fresh model on `data` under `seed`;
    record=True only for the original model (record update stores then and return them as
    artifacts), False for the retrains. methods: name → fn(model, context), which forgets in
    place on a deep copy of the original model and may return a dict of extras for the row. A
    method's time is the wall time of its call; a retrain's, the wall time of `train`. If the
    artifacts have a close() method, it is called once the seed's methods ran (also on failure).
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one training seed")
    positive_int("noise_seed_offset", noise_seed_offset)
    if mia_protocol not in metrics.MIA_PROTOCOLS:
        raise ValueError(f"mia_protocol must be one of {metrics.MIA_PROTOCOLS}, got {mia_protocol!r}")
    if not mia_seeds:
        raise ValueError("mia_seeds must hold at least one seed")
    for name, fn in methods.items():
        if name in (ORIGINAL, RETRAIN, RETRAIN_2):
            raise ValueError(f"methods may not be named {name!r}: the runner adds that row itself")
        if not callable(fn):
            raise TypeError(f"methods[{name!r}] must be callable as fn(model, context), got {type(fn).__name__}")
    say = log or (lambda _: None)
    rows: list[MethodRun] = []
    for seed in seeds:
        split = prepare(seed)
        if not isinstance(split, Split):
            raise TypeError(f"prepare({seed}) must return a pyunlearn.experiment.Split, got {type(split).__name__}")
        start = time.perf_counter()
        original, artifacts = train(split.train, seed, True)
        original_seconds = time.perf_counter() - start
        start = time.perf_counter()
        retrained, _ = train(split.retain, seed, False)
        retrain_seconds = time.perf_counter() - start
        start = time.perf_counter()
        second, _ = train(split.retain, seed + noise_seed_offset, False)
        second_seconds = time.perf_counter() - start
        say(f"seed {seed}: trained ({original_seconds:.1f} s), retrained ({retrain_seconds:.1f} s, "
            f"{second_seconds:.1f} s); {len(split.forget)} of {len(split.train)} samples to forget")

        def add(name, model, seconds, extra=None):
            values = measure(model, retrained, split, mia_seeds=mia_seeds, mia_samples=mia_samples,
                             mia_protocol=mia_protocol)
            rows.append(MethodRun(method=name, seed=seed, seconds=seconds, retrain_seconds=retrain_seconds,
                            extra=dict(extra or {}), **values))
            say(f"  {name:<40} TA {values['TA']:6.2f} RA {values['RA']:6.2f} UA {values['UA']:6.2f} "
                f"MIA {values['MIA']:6.2f}±{values['MIA_sd']:.1f} gap {values['membership_gap']:+.3f} "
                f"KS {values['forget_loss_ks']:.3f}  {seconds / retrain_seconds:.3f}× retrain")

        add(ORIGINAL, original, 0.0)
        add(RETRAIN, retrained, retrain_seconds)
        add(RETRAIN_2, second, second_seconds)
        context = Context(seed=seed, split=split, artifacts=artifacts, retrain_seconds=retrain_seconds)
        try:
            for name, fn in methods.items():
                model = copy.deepcopy(original)
                start = time.perf_counter()
                extra = fn(model, context)
                add(name, model, time.perf_counter() - start, extra if isinstance(extra, dict) else None)
        finally:
            if callable(getattr(artifacts, "close", None)):
                artifacts.close()
    return Results(rows, dict(config or {}, seeds=seeds, noise_seed_offset=noise_seed_offset,
                              mia_seeds=list(mia_seeds), mia_samples=mia_samples, mia_protocol=mia_protocol))


def __getattr__(name: str):  # experiment.Row of earlier versions
    if name == "Row":
        import warnings

        warnings.warn("pyunlearn.evaluation.experiment.Row is now MethodRun (the name Row is the kernels' stored "
                      "row); the old name goes away in the next version", DeprecationWarning, stacklevel=2)
        return MethodRun
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
