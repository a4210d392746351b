"""Selective dampening: shrink the parameters the forgotten samples need far more than the
retained ones do (selective synaptic dampening, Foster et al. 2023).

Subtracting recorded updates removes what the forgotten samples' steps did, but under random
batching those steps mostly carried retained samples' learning, and a sparse store keeps only
each step's largest entries: a behaviour that only the forgotten samples taught, such as a
backdoor trigger, survives it (measured: attack success 54% after subtraction from the default
store, 1.4% after a retrain; docs/guide.md). That behaviour lives in parameters that matter to
the forgotten samples and hardly to anything else, which is what this step finds:

    importance(p) = mean over samples of (∂ loss / ∂p)²   (the diagonal of the empirical Fisher)
    selected      = importance_forgotten(p) > select · importance_retained(p)
    p            ← p · min(strength · importance_retained(p) / importance_forgotten(p), 1)   where selected

A parameter the retained data relies on is left as it is; one that only the forgotten samples
rely on goes towards 0. On a random share of the training set nothing stands out (the
forgotten samples resemble the retained ones) and almost nothing changes; on a class, the
class's own parameters go. It costs one forward and backward pass per sample of at most
`samples` forgotten and `samples` retained ones, and needs no store.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._validate import positive_int, positive_number
from ..data import SampleSet, checked_samples
from ..errors import ModelMismatchError
from ..evaluation.metrics import class_logits
from ..store.layers import trainable_parameters
from ._loop import model_device, to_device

SELECT = 10.0  # the paper's defaults (α = 10, λ = 1), not tuned to our data
STRENGTH = 1.0
SAMPLES = 2000  # per side: a mean of squared gradients settles well before this


@dataclass(frozen=True)
class Importances:
    """Per trainable parameter (by name), the mean squared per-sample gradient of the
    cross-entropy over the forgotten and over the retained samples, and how many of each."""

    forgotten: dict[str, torch.Tensor]
    retained: dict[str, torch.Tensor]
    forgotten_samples: int
    retained_samples: int

    @property
    def samples(self) -> int:
        return self.forgotten_samples + self.retained_samples


@dataclass(frozen=True)
class DampenReport:
    """What `dampen` changed: parameters shrunk (of how many), per layer, and the samples
    whose gradients it computed (its cost)."""

    select: float
    strength: float
    dampened: int
    parameters: int
    per_layer: dict[str, int]
    samples: int

    def to_text(self) -> str:
        return (f"dampened {self.dampened} of {self.parameters} parameters (select {self.select:g}, strength "
                f"{self.strength:g}; {self.samples} samples' gradients)")


def importances(model: torch.nn.Module, forget_data: SampleSet, retain_data: SampleSet, *, samples: int = SAMPLES,
                seed: int = 0) -> Importances:
    """Both sides' importances at `model` as it is (eval mode: BatchNorm statistics and dropout
    do not move; the mode is restored), from at most `samples` of each drawn under `seed`."""
    forget_data = checked_samples("forget_data", forget_data, when_empty="there is nothing to dampen for")
    retain_data = checked_samples("retain_data", retain_data, when_empty="dampening compares with retained samples")
    forgotten, retained = drawn_samples(forget_data, retain_data, samples=positive_int("samples", samples), seed=seed)
    return Importances(_mean_squared_gradients(model, forgotten), _mean_squared_gradients(model, retained),
                       len(forgotten), len(retained))


def drawn_samples(forget_data: SampleSet, retain_data: SampleSet, *, samples: int = SAMPLES, most: int | None = None,
                  seed: int = 0) -> tuple[SampleSet, SampleSet]:
    """The forgotten and retained samples whose gradients a dampening takes: at most `samples` of
    each (a set no larger is taken whole), drawn under `seed` as `importances` draws them, so a
    caller can know the cost, or measure the same forgotten samples, before or after. most: at
    most this many in all (a cost's cap, at least 2): the forgotten side takes up to half, or
    more where the retained side cannot use its half, and the retained side the rest."""
    if most is None:
        return forget_data.draw(samples, seed=seed), retain_data.draw(samples, seed=seed + 1)
    most = positive_int("most", most)
    if most < 2:
        raise ValueError(f"most must be at least 2 (a sample of each side), got {most}")
    usable = min(len(retain_data), samples)  # what the retained side can take at most
    forgotten = forget_data.draw(min(samples, max(most // 2, most - usable)), seed=seed)
    return forgotten, retain_data.draw(min(usable, most - len(forgotten)), seed=seed + 1)


@torch.no_grad()
def apply_dampening(model: torch.nn.Module, found: Importances, *, select: float = SELECT,
                    strength: float = STRENGTH) -> DampenReport:
    """Shrinks `model`'s parameters by `found` (in place); see the module docstring."""
    select, strength = positive_number("select", select), positive_number("strength", strength)
    named = trainable_parameters(model)
    shapes = {name: tuple(p.shape) for name, p in named}
    measured = {name: tuple(v.shape) for name, v in found.forgotten.items()}
    if shapes != measured:
        differ = sorted(set(shapes) ^ set(measured)) or sorted(n for n in shapes if shapes[n] != measured[n])
        raise ModelMismatchError(f"found: these importances were measured on another model (parameters that differ: "
                                 f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}); measure them on "
                                 "this one with importances(model, ...)")
    per_layer, total = {}, 0
    for name, p in named:
        forgotten, retained = found.forgotten[name].to(p.device), found.retained[name].to(p.device)
        chosen = forgotten > select * retained
        scale = torch.clamp(strength * retained / forgotten.clamp_min(torch.finfo(forgotten.dtype).tiny), max=1.0)
        p[chosen] = (p[chosen].float() * scale[chosen]).to(p.dtype)
        per_layer[name] = int(chosen.sum())
        total += p.numel()
    return DampenReport(select, strength, sum(per_layer.values()), total, per_layer, found.samples)


def dampen(model: torch.nn.Module, forget_data: SampleSet, retain_data: SampleSet, *, select: float = SELECT,
           strength: float = STRENGTH, samples: int = SAMPLES, seed: int = 0) -> DampenReport:
    """Shrinks, in place, the parameters `forget_data` relies on more than `select` times as much
    as `retain_data` does (see the module docstring). It records nothing: after
    `amnesiac_forget`, or through `pu.forget`, which measures its probe afterwards and keeps the
    dampening only if the probe holds. select: how much more a parameter must matter to the
    forgotten samples (larger: fewer parameters); strength: λ, how far a chosen one shrinks
    (smaller: further)."""
    select, strength = positive_number("select", select), positive_number("strength", strength)
    return apply_dampening(model, importances(model, forget_data, retain_data, samples=samples, seed=seed),
                           select=select, strength=strength)


def _mean_squared_gradients(model: torch.nn.Module, data: SampleSet) -> dict[str, torch.Tensor]:
    """Per trainable parameter, the mean over `data` of the squared per-sample gradient of the
    cross-entropy, in float32: vectorised over samples with torch.func where the model allows
    it, else one sample at a time."""
    device = model_device(model, "dampening")
    named = trainable_parameters(model)
    raw = dict(model.named_parameters())
    names = [n for n, _ in named]
    # torch.func addresses parameters by the model's own names (a compiled wrapper's included)
    raw_names = [k for k, v in raw.items() if v.requires_grad]
    frozen = {k: v.detach() for k, v in raw.items() if not v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    totals = [torch.zeros(p.shape, dtype=torch.float32, device=device) for _, p in named]
    per_sample = sum(p.numel() for _, p in named)
    chunk = max(1, min(256, (1 << 26) // max(1, per_sample)))  # ≤ 64 Mi floats of gradients at once
    was_training = model.training
    model.eval()
    try:
        try:
            _vectorised(model, data, raw_names, raw, frozen, buffers, totals, chunk, device)
        except torch.OutOfMemoryError:
            raise  # not a reason to go on 100 times slower
        except (RuntimeError, NotImplementedError) as exc:  # an operation torch.func cannot batch
            warnings.warn(f"dampening: per-sample gradients one sample at a time (slower), as torch.func could not "
                          f"vectorise this model: {type(exc).__name__}: {str(exc)[:200]}", RuntimeWarning, stacklevel=3)
            for t in totals:
                t.zero_()
            _one_by_one(model, data, [p for _, p in named], totals, device)
    finally:
        model.train(was_training)
    return {n: (t / len(data)).cpu() for n, t in zip(names, totals)}


def _vectorised(model, data, raw_names, raw, frozen, buffers, totals, chunk, device):
    from torch.func import functional_call, grad, vmap

    params = {k: raw[k].detach() for k in raw_names}

    def loss(p, x, y):
        return F.cross_entropy(class_logits(functional_call(model, ({**p, **frozen}, buffers), (x[None],))), y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    for _, x, y in data.batches(chunk, shuffle=False):
        x, y = to_device((x, y), device)
        grads = per_sample(params, x, y)
        for total, k in zip(totals, raw_names):
            total += grads[k].float().pow(2).sum(0)


def _one_by_one(model, data, params, totals, device):
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    try:
        for _, x, y in data.batches(1, shuffle=False):
            x, y = to_device((x, y), device)
            grads = torch.autograd.grad(F.cross_entropy(class_logits(model(x)), y), params, allow_unused=True)
            for total, g in zip(totals, grads):
                if g is not None:
                    total += g.float().pow(2)
    finally:
        for p, g in zip(params, saved):
            p.grad = g


__all__ = ["dampen", "importances", "apply_dampening", "DampenReport", "Importances", "SELECT", "STRENGTH", "SAMPLES"]
