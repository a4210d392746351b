"""Repair after subtraction, from what the store knows.

Subtracting a step's stored update removes everything that step learned, the retained samples
of its batch included: with random batching 1% of the data touches most steps, and dense
subtraction removes training in general. The store keeps each step's batch composition
(`UpdateStore.step_ids`), so `repair` puts back what the retained samples of the removed steps
taught: it replays each removed step, in order, on the batch's retained samples only, at that
step's learning rate; optionally fine-tunes briefly on retained data; and recomputes BatchNorm
running statistics. Its cost is reported as a share of a retrain (samples processed against the
samples the recording processed).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .._validate import positive_int, positive_number
from ..data import SampleSet
from ..evaluation.metrics import class_logits
from ..store import UpdateStore
from ..store.layers import trainable_parameters
from ._loop import model_device, to_device
from .amnesiac import ForgetReport, amnesiac_forget
from .buffers import StaleBuffersWarning, recompute_batchnorm


@dataclass
class RepairReport:
    steps_replayed: int  # removed steps that had retained samples
    samples_replayed: int
    fine_tune_steps: int
    samples_fine_tuned: int
    batchnorm_samples: int  # samples the running statistics were recomputed from (0: none)
    seconds: float
    retrain_share: float  # (replayed + fine-tuned samples) / samples the recording trained on


def subtracted_steps(report: ForgetReport) -> np.ndarray:
    """The steps an `amnesiac_forget` call subtracted from the model it was given (those earlier
    requests removed that the model had not seen, and this request's)."""
    if not isinstance(report, ForgetReport):
        raise TypeError(f"report must be a ForgetReport, got {type(report).__name__}")
    return np.asarray(report.subtracted, dtype=np.int64)


def step_learning_rates(store: UpdateStore, steps: np.ndarray) -> np.ndarray | None:
    """The recorded learning rate of each of `steps` (NaN where a step's is unknown), or None if
    the store records none (update stores before format 4)."""
    if not store.metadata.records_hyper:
        return None
    return store.read_step_hyper(store.steps)[:, 0][steps]


def repair(model: torch.nn.Module, store: UpdateStore, removed_steps, data: SampleSet, *, lr=None,
           momentum: float = 0.0, max_steps: int | None = None, fine_tune_epochs: float = 0.0,
           fine_tune_lr: float | None = None, batch_size: int = 128, recompute_buffers: bool = True,
           seed: int = 0, step_ids: list[np.ndarray] | None = None) -> RepairReport:
    """After the steps `removed_steps` were subtracted from `model` (an array of step numbers, or
    the ForgetReport of the `amnesiac_forget` call, see `subtracted_steps`), replays each of
    them in step order on the retained samples of its batch: the step's sample IDs found in
    `data` (the retained training data, with their IDs; a forgotten sample must not be in it),
    one SGD step at the step's learning rate. A step none of whose samples is in `data` is
    skipped.

    lr: None reads each step's recorded learning rate (gradient stores record it; update
    stores do not: pass it); a number is used for every step; an array gives one per recorded
    step (indexed by step number). momentum: of the replay's SGD (0: each replayed step moves the
    weights by its batch's own gradient step, as the subtraction removed it). max_steps: replay
    only the latest that many removed steps (a budget; the latest matter most to the final
    weights). fine_tune_epochs: then SGD (momentum 0.9) on random retained batches for that
    share of an epoch of `data` (may be fractional) at `fine_tune_lr` (default: the mean replay
    learning rate). recompute_buffers: finally recompute BatchNorm running statistics from
    `data`. step_ids: the removed steps' sample IDs, one array per step in ascending step order,
    as `store.step_ids` returned them, for a caller that has read them already
    (`pyunlearn.forget` measures the request with them): the store is not read twice. None
    reads them. In place; returns a RepairReport whose retrain_share is the samples processed
    over those the recording trained on.
    """
    start = time.perf_counter()
    if not isinstance(store, UpdateStore):
        raise TypeError(f"store must be an UpdateStore, got {type(store).__name__}")
    if not isinstance(data, SampleSet):
        raise TypeError(f"data must be a pyunlearn.data.SampleSet (the retained training data), got "
                        f"{type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data is empty: there are no retained samples to replay")
    given = (subtracted_steps(removed_steps) if isinstance(removed_steps, ForgetReport)
             else np.asarray(removed_steps, dtype=np.int64).ravel())
    steps = np.unique(given)
    if step_ids is not None and not np.array_equal(given, steps):  # each array belongs to the step at its place
        raise ValueError("removed_steps must be in ascending order without repeats when step_ids is given (step_ids "
                         "holds one array per step, in that order); leave step_ids out to read them from the store")
    if steps.size and (steps[0] < 0 or steps[-1] >= store.steps):
        raise ValueError(f"removed_steps must lie in [0, {store.steps}) (the store's committed steps)")
    if step_ids is not None and len(step_ids) != steps.size:
        raise ValueError(f"step_ids must hold one array per removed step ({steps.size}), got {len(step_ids)}; "
                         "leave it out to read them from the store")
    if max_steps is not None:
        latest = min(steps.size, positive_int("max_steps, if not None,", max_steps))
        steps = steps[steps.size - latest:]
        step_ids = None if step_ids is None else step_ids[len(step_ids) - latest:]
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    if float(fine_tune_epochs) < 0.0 or not math.isfinite(float(fine_tune_epochs)):
        raise ValueError(f"fine_tune_epochs must be a finite number >= 0, got {fine_tune_epochs!r}")
    batch_size = positive_int("batch_size", batch_size)
    rates = _rates(store, steps, lr)
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("model has no trainable parameters (none with requires_grad=True)")

    device = model_device(model, "repair")  # the data stays on the host; each batch goes to the model
    position = {int(i): n for n, i in enumerate(data.ids.tolist())}
    optimizer = torch.optim.SGD(params, lr=1.0, momentum=float(momentum))
    replayed = samples = 0
    was_training = model.training
    model.train()
    try:
        batches = store.step_ids(steps) if step_ids is None else step_ids
        for step, ids, rate in zip(steps.tolist(), batches, rates):
            rows = [position[i] for i in ids.tolist() if i in position]
            if not rows:
                continue
            batch = torch.as_tensor(rows, dtype=torch.int64)
            optimizer.param_groups[0]["lr"] = float(rate)
            optimizer.zero_grad()
            x, y = to_device((data.x[batch], data.y[batch]), device)
            F.cross_entropy(class_logits(model(x)), y).backward()
            optimizer.step()
            replayed, samples = replayed + 1, samples + len(rows)
        tuned = tuned_samples = 0
        if fine_tune_epochs > 0:
            if fine_tune_lr is not None:
                rate = positive_number("fine_tune_lr", fine_tune_lr)
            elif len(rates):
                rate = float(np.mean(rates))
            else:
                raise ValueError("fine_tune_lr: no step was replayed to take a learning rate from; pass it")
            tune = torch.optim.SGD(params, lr=rate, momentum=0.9)
            tune_steps = max(1, math.ceil(float(fine_tune_epochs) * len(data) / batch_size))
            generator = torch.Generator().manual_seed(seed)
            while tuned < tune_steps:
                for _, x, y in data.batches(batch_size, generator=generator):
                    x, y = to_device((x, y), device)
                    tune.zero_grad()
                    F.cross_entropy(class_logits(model(x)), y).backward()
                    tune.step()
                    tuned, tuned_samples = tuned + 1, tuned_samples + len(y)
                    if tuned >= tune_steps:
                        break
    finally:
        model.train(was_training)
    bn = recompute_batchnorm(model, data) if recompute_buffers else 0
    return RepairReport(steps_replayed=replayed, samples_replayed=samples, fine_tune_steps=tuned,
                        samples_fine_tuned=tuned_samples, batchnorm_samples=bn, seconds=time.perf_counter() - start,
                        retrain_share=(samples + tuned_samples) / max(1, store.samples))


def _rates(store: UpdateStore, steps: np.ndarray, lr) -> np.ndarray:
    if lr is None:
        rates = step_learning_rates(store, steps)
        if rates is None or not np.isfinite(rates).all():
            raise ValueError(f"lr: {store.path} records no learning rate for {'its' if rates is None else 'some'} "
                             "steps (update stores before format 4, or steps recorded without one); pass the "
                             "training learning rate (a number, or one per step)")
        return rates
    if np.ndim(lr) == 0:
        return np.full(steps.size, positive_number("lr", lr))
    per_step = np.asarray(lr, dtype=np.float64)
    if per_step.ndim != 1 or per_step.size < store.steps:
        raise ValueError(f"lr, given per step, must hold one value for each of the {store.steps} recorded steps, "
                         f"got shape {per_step.shape}")
    if not (np.isfinite(per_step[steps]).all() and (per_step[steps] > 0).all()):
        raise ValueError("lr, given per step, must be positive and finite at every removed step")
    return per_step[steps]


def forget_and_repair(model: torch.nn.Module, store: UpdateStore, ids, data: SampleSet, **repair_options):
    """`amnesiac_forget(model, store, ids)` then `repair` of the steps it subtracted, with the
    BatchNorm warning silenced when repair recomputes the statistics. Returns (ForgetReport,
    RepairReport)."""
    with warnings.catch_warnings():
        if repair_options.get("recompute_buffers", True):
            warnings.simplefilter("ignore", StaleBuffersWarning)
        report = amnesiac_forget(model, store, ids)
    return report, repair(model, store, report, data, **repair_options)
