"""The optimisation loop the unlearning methods share: epochs of mini-batches, a loss, and a
plain or layer-wise partial optimizer step."""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .._validate import positive_int, positive_number
from ..data import SampleSet, checked_samples
from ..evaluation.metrics import accuracy, class_logits, mean_loss, measured_gap
from ..kernels import ops
from ..kernels.checks import one_device
from ..store.layers import trainable_parameters
from .partial import LayerwiseMask, check_keep


@dataclass
class UnlearnReport:
    method: str
    keep: float | None  # None: naive (every entry may change)
    steps: int
    seconds: float
    stopped: str | None = None  # why training ended: early (the step budget, the guard) or at the target


class RetainGuard:
    """Stops an unlearning run before it collapses the model: every `every` steps, accuracy on a
    fixed probe of up to `samples` retained samples (drawn under `seed`) is compared with its
    value before the run; once it has fallen more than `max_drop` points, the model (parameters
    and buffers) is put back to the last check that passed, and the run stops."""

    def __init__(self, data: SampleSet, *, max_drop: float, every: int, samples: int, seed: int):
        data = check_data("retain_data", data)
        self.max_drop = positive_number("max_retain_drop", max_drop)
        self.every = positive_int("guard_every", every)
        self.probe = data.draw(positive_int("guard_samples", samples), seed=seed)

    def accuracy(self, model) -> float:
        return accuracy(model, self.probe)


class HeldOutTarget:
    """Ends a forgetting run once the forget set has lost what training on it gave it.

    Training lowers the loss of the samples it sees below that of samples it never saw: by the
    model's generalisation gap, mean held-out − mean retained loss, on average over a
    random training sample. A model retrained without the forget set scores it like unseen
    data, so a forget set drawn like the rest of the training data should rise by about that
    gap. This target measures the gap once, before the first step, on probes of up to `samples`
    held-out and retained samples (or takes `gap`, measured already); then, and after every
    epoch, the mean loss of a probe of up to PROBE forget samples less that of a probe of up to
    PROBE held-out ones (a change of the same samples: small probes measure it well). It is
    reached once that difference has risen by the gap (at once if the gap is not positive: the
    model fits its training data no better than unseen data). Against held-out samples, not
    alone: an ascent that harms the model raises every loss (on 2,000 Fashion-MNIST samples the
    forget probe's own loss rose 0.10 nats while the set's distance to the test loss closed by
    0.009). After a whole epoch, not every step: an ascent step raises the loss of its own
    batch's samples most, so mid-epoch a probe that happens to hold the batches seen so far
    rises ahead of the forget set. The epoch that reaches the gap passes it (on the
    Fashion-MNIST CNN by half the gap, more than the gap estimate's error): `optimise` then
    interpolates between the last two checks (`between`).

    The rise is compared, not the level: a forget set of 200 samples can hold harder or easier
    samples than average by more than the whole gap (on the Fashion-MNIST CNN the gap is
    ~0.04 nats, the standard error of 200 samples' mean loss ~0.05). A forget set unlike the
    rest (a whole class) loses far more than the average gap when retrained away: there the
    target stops too early."""

    PROBE = 512
    PROBE_SEEDS = 1_000_003  # the probes' seeds: the run's seed + this (+ 1, + 2, + 3)

    def __init__(self, model, forget: SampleSet, held_out: SampleSet, retained: SampleSet | None, *, samples: int,
                 seed: int, gap: float | None = None):
        samples = positive_int("held_out_samples", samples)
        # Drawn apart from the batches, which permute the forget set under `seed` itself: a probe
        # of the first batches is no random sample of the set (with momentum, the batches ascended
        # first are pushed longest).
        seed += self.PROBE_SEEDS
        self.forget = check_data("forget_data", forget).draw(self.PROBE, seed=seed)
        # The gap's held-out probe, drawn once: measured_gap's own draw of it under the same seed
        # is the probe itself, and the epoch checks' probe is drawn from it.
        held_out = check_data("held_out_data", held_out).draw(samples, seed=seed + 1)
        scored = "forget_data or held_out_data"
        if gap is None:
            gap = measured_gap(model, check_data("retain_data", retained), held_out, samples, seed + 1,
                               ("retain_data", "held_out_data"))
            scored = "forget_data, held_out_data or retain_data"
        self.gap = gap
        self.held_out = held_out.draw(self.PROBE, seed=seed + 3)
        self.start = self.forget_against_held_out(model)
        if not math.isfinite(self.gap) or not math.isfinite(self.start):
            raise ValueError(f"the model's loss on {scored} is not finite (NaN or Inf): no held-out target can be "
                             "measured; check the model and the data")

    def forget_against_held_out(self, model) -> float:
        """Mean loss of the forget probe − mean loss of the held-out probe, in nats."""
        return (mean_loss(model, self.forget, "forget_data")
                - mean_loss(model, self.held_out, "held_out_data"))

    def rise(self, model) -> float:
        """How far the forget set's mean loss has risen against the held-out one, in nats."""
        return self.forget_against_held_out(model) - self.start

    def between(self, model, before: dict, rise_before: float, rise_after: float) -> float:
        """Puts `model` (now at rise_after ≥ gap) on the straight line from the state `before`
        (a state_dict, at rise_before < gap) where the rise, taken as linear along it, equals the
        gap; returns the share of the way from `before` (in (0, 1]). Floating-point parameters
        and buffers are interpolated, each tensor once however many modules share it; integer
        buffers (BatchNorm's batch count) and extra state keep their current value."""
        way = (self.gap - rise_before) / (rise_after - rise_before)
        with torch.no_grad():
            for name, value in itertools.chain(model.named_parameters(), model.named_buffers()):
                if value.is_floating_point():
                    value.copy_(torch.lerp(before[name].to(value.device), value, way))
        return way


def check_data(arg: str, data) -> SampleSet:
    return checked_samples(arg, data, when_empty="there is nothing to train on")


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


MASKS = ("step", "saliency")


def saliency(model: torch.nn.Module, data: SampleSet, batch_size: int = 256) -> list[torch.Tensor]:
    """Per trainable parameter, |∇ of the summed cross-entropy over `data`| (true labels), in
    eval mode so that BatchNorm statistics do not move; gradients are left as they were."""
    from torch.nn import functional as F

    params = [p for _, p in trainable_parameters(model)]
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.grad = None
        device = model_device(model, "saliency")
        for _, x, y in data.batches(batch_size, shuffle=False):
            x, y = to_device((x, y), device)
            F.cross_entropy(class_logits(model(x)), y, reduction="sum").backward()
        return [None if p.grad is None else p.grad.detach().abs().clone() for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        model.train(was_training)


def optimise(model: torch.nn.Module, method: str, batches: Callable, loss: Callable, *, epochs: int,
             lr: float, keep: float | None, momentum: float = 0.9, weight_decay: float = 0.0,
             seed: int = 0, clip: float | None = None, max_steps: int | None = None,
             guard: RetainGuard | None = None, target: Callable[[], HeldOutTarget] | None = None, mask: str = "step",
             saliency_data: SampleSet | None = None) -> UnlearnReport:
    """SGD over `batches(generator)` (a fresh iterator each epoch, on the host; each batch moved
    to the model's device) minimising `loss(batch)`, for `epochs` epochs or `max_steps` steps,
    whichever ends first, stopped early by `guard` (put back) or once the HeldOutTarget that
    `target()` builds (after the arguments are checked: it costs forward passes) is reached
    (checked before the first step and after each epoch: a model already there takes no step;
    one that passes it in an epoch is put back on the line between the two checks where the
    rise meets the gap, so the state of the last check is kept; a non-finite rise puts that
    state back and stops; where the step budget ends an epoch, the budget is reported). With
    keep, mask="step" selects each step's top-|grad| entries; mask="saliency" fixes, before the
    first step, each layer's top entries by |gradient of the cross-entropy on `saliency_data`|
    (the forget set with its true labels: SalUn's weight saliency)."""
    epochs, lr = positive_int("epochs", epochs), positive_number("lr", lr)
    device = model_device(model, method)
    if max_steps is not None:
        max_steps = positive_int("max_steps, if not None,", max_steps)
    keep = check_keep(keep)
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if mask == "saliency" and keep is None:
        raise ValueError("mask='saliency' needs keep (the share of each layer to update); keep=None updates everything")
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("model has no trainable parameters (none with requires_grad=True)")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    masker = LayerwiseMask(model, optimizer, keep) if keep is not None else None
    if mask == "saliency":
        masker.fix_saliency(saliency(model, check_data("saliency_data", saliency_data)))
    target = target() if target is not None else None
    generator = torch.Generator().manual_seed(seed)
    start, steps, stopped = time.perf_counter(), 0, None
    floor = last_good = None
    if guard is not None:
        floor = guard.accuracy(model) - guard.max_drop
        last_good = (0, copy.deepcopy(model.state_dict()))  # (steps, state) of the last check that passed
    was_training = model.training
    model.train()

    def guard_fails() -> str | None:
        """Checks the guard: None if it passes; if not, puts the last state that passed back and
        says so."""
        nonlocal last_good
        accuracy = guard.accuracy(model)
        model.train()
        if accuracy < floor:
            model.load_state_dict(last_good[1])
            return (f"retained-accuracy guard at step {steps}: accuracy fell more than {guard.max_drop:g} points; "
                    f"put back to step {last_good[0]}")
        last_good = (steps, copy.deepcopy(model.state_dict()))
        return None

    checked = None  # the target's last check: (steps, rise, state) while the target is not yet reached
    interpolated = False

    def target_reached() -> str | None:
        """Checks the target; once reached past a previous check, interpolates back to the gap."""
        nonlocal checked, interpolated
        rise = target.rise(model)
        model.train()
        if math.isnan(rise):  # the ascent blew the loss up: the last check's state is the last sound one
            before_steps, _, before = checked
            model.load_state_dict(before)
            return (f"held-out target: the forget or held-out loss is not finite after step {steps}; put back to "
                    f"step {before_steps}")
        if rise < target.gap:
            checked = (steps, rise, copy.deepcopy(model.state_dict()))
            return None
        where = f"at step {steps}"
        if checked is not None:
            before_steps, before_rise, before = checked
            way = target.between(model, before, before_rise, rise)
            interpolated = True
            rise = target.rise(model)
            model.train()
            where = f"{way:.3f} of the way from step {before_steps} to step {steps}"
        return (f"held-out target {where}: the forget set's mean loss rose {rise:.4f} nats against the "
                f"held-out samples', the generalisation gap is {target.gap:.4f}")

    try:
        if target is not None:
            stopped = target_reached()
        for _ in range(epochs if stopped is None else 0):
            for batch in batches(generator):
                batch = to_device(batch, device)
                optimizer.zero_grad()
                loss(batch).backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                (masker.step if masker is not None else optimizer.step)()
                steps += 1
                if guard is not None and steps % guard.every == 0 and (stopped := guard_fails()):
                    break
                if max_steps is not None and steps >= max_steps:
                    stopped = f"step budget: max_steps={max_steps}"
                    break
            if stopped is not None:
                break
            if target is not None and (stopped := target_reached()):
                break
        # The last steps since a check, or a state interpolated between checks: checked too.
        if guard is not None and not (stopped or "").startswith("retained") and (steps % guard.every or interpolated):
            stopped = guard_fails() or stopped
    finally:
        model.train(was_training)
    return UnlearnReport(method, keep, steps, time.perf_counter() - start, stopped)
