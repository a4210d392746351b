"""Gradient attribution: what a batch contributed to the final weights, per optimizer family.

A store created with attribution="gradient" records, for every step, one vector per layer
(the batch gradient the optimizer used, in the family's own terms) and a few per-step
hyper-parameters. Forgetting a batch then subtracts c_t · v_t, where the coefficient c_t is the
factor by which that vector moved the final weights (θ_final = … − c_t·v_t), computed from the
hyper-parameters of every step up to the final model.

One class per optimizer family, all with the same small protocol:

    family = family_for(optimizer)          # a class, found by the optimizer's type
    family.check(optimizer)                 # refuses settings the arithmetic does not follow
    step = family(optimizer, params)        # per recording session
    step.vectors()                          # per step: the float32 vectors to record
    step.hyper()                            # per step, after vectors(): values of family.columns
    family.coefficients(hyper)              # (steps × columns) → c_t for every step

Adding a family is one class here and one entry in _FAMILIES: the store keeps only the family's
name and a generic per-step hyper-parameter array, and the recorder and amnesiac_forget ask
this module for everything else.
"""
from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import ClassVar, Sequence

import numpy as np
import torch

from .errors import StoreError

# The store's step_hyper array has this many columns (format version 2); a family uses the
# first len(columns) of them and leaves the rest 0.
HYPER_WIDTH = 4


class OptimizerFamily:
    """The protocol every family implements (see the module docstring)."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    shared_settings: ClassVar[tuple[str, ...]]  # must be equal in every parameter group

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]):
        self.optimizer = optimizer
        self.params = list(params)
        # Momentum carried in from steps recorded before this session exists only if the
        # optimizer's state came with it (e.g. loaded with the checkpoint).
        self._carry_in = any(len(optimizer.state.get(p, {})) for p in self.params)

    @classmethod
    def check(cls, optimizer: torch.optim.Optimizer) -> None:
        groups = optimizer.param_groups
        if any(g.get("maximize") for g in groups):
            raise ValueError("gradient attribution does not support maximize=True; record with attribution='update'")
        if any(any(g[k] != groups[0][k] for k in cls.shared_settings) for g in groups[1:]):
            raise ValueError("gradient attribution needs one learning rate and momentum for all parameter groups")

    def vectors(self) -> list[torch.Tensor]:
        """This step's vector per layer: flat, contiguous float32 on the CPU; zeros for a
        parameter without a gradient (it took no part in the step)."""
        out = []
        for p in self.params:
            if p.grad is None:
                out.append(torch.zeros(p.numel()))
            else:
                out.append(self._vector(p, p.grad.detach().to(device="cpu", dtype=torch.float32)).reshape(-1).contiguous())
        return out

    def _vector(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def hyper(self) -> tuple[float, ...]:
        raise NotImplementedError

    def _carry(self, value: float) -> float:
        """The share of the previous step's momentum this step keeps: none on a fresh
        optimizer's first step."""
        if not self._carry_in:
            self._carry_in = True
            return 0.0
        return value

    @classmethod
    def coefficients(cls, hyper: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def own_step(cls, hyper: np.ndarray) -> np.ndarray:
        """The factor by which each step's vector moved the weights *at that step* (the first
        term of `coefficients`' sum: what the batch itself did, before momentum carried it on)."""
        raise NotImplementedError


def _discounted_tail_sums(weight: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """total[t] = Σ_{s≥t} weight_s · carry_{t+1}···carry_s, for every t."""
    n = len(weight)
    total = np.zeros(n + 1)
    for t in range(n - 1, -1, -1):
        total[t] = weight[t] + (carry[t + 1] if t + 1 < n else 0.0) * total[t + 1]
    return total[:n]


class SGDMomentum(OptimizerFamily):
    """torch.optim.SGD with momentum μ (0 for plain SGD). The vector is the batch gradient;
    c_t = Σ_{s≥t} lr_s · μ_{t+1}···μ_s: exact for the gradient's linear effect, learning-rate
    schedules included. Weight decay's effect on propagation is left out (approximate)."""

    name = "sgd"
    columns = ("lr", "carry")
    shared_settings = ("lr", "momentum", "dampening", "nesterov")

    @classmethod
    def check(cls, optimizer) -> None:
        super().check(optimizer)
        if any(g.get("nesterov") or g.get("dampening", 0) != 0 for g in optimizer.param_groups):
            raise ValueError("gradient attribution follows plain SGD with momentum: nesterov and dampening "
                             "are not supported; record with attribution='update'")

    def hyper(self) -> tuple[float, ...]:
        group = self.optimizer.param_groups[0]
        return float(group["lr"]), self._carry(float(group.get("momentum", 0.0)))

    @classmethod
    def coefficients(cls, hyper: np.ndarray) -> np.ndarray:
        lr, carry = hyper[:, 0], hyper[:, 1]
        return _discounted_tail_sums(lr, carry)

    @classmethod
    def own_step(cls, hyper: np.ndarray) -> np.ndarray:
        return hyper[:, 0].astype(np.float64)


class AdamFamily(OptimizerFamily):
    """torch.optim.Adam and AdamW. The vector is g_t / (√v̂_t + ε) (the state after the step);
    c_t = (1 − β1) Σ_{s≥t} β1^(s−t) · lr_s / (1 − β1^(n_s)) with n_s Adam's step count:
    first-order, holding each later step's second-moment estimate at step t's value."""

    name = "adam"
    columns = ("lr", "carry", "adam_step", "beta1")
    shared_settings = ("lr", "betas", "eps")

    def __init__(self, optimizer, params):
        super().__init__(optimizer, params)
        self._adam_step = 0.0

    @classmethod
    def check(cls, optimizer) -> None:
        super().check(optimizer)
        if any(g.get("amsgrad") for g in optimizer.param_groups):
            raise ValueError("gradient attribution does not support amsgrad; record with attribution='update'")

    def vectors(self) -> list[torch.Tensor]:
        self._adam_step = 0.0
        return super().vectors()

    def _vector(self, param, grad):
        group = self.optimizer.param_groups[0]
        state = self.optimizer.state[param]
        step = float(state["step"])  # this parameter's own count: it may have skipped steps
        # Bias correction uses the largest count among the layers (they differ only if some
        # layer skipped steps).
        self._adam_step = max(self._adam_step, step)
        v_hat = state["exp_avg_sq"].detach().to(device="cpu", dtype=torch.float32) / (1.0 - group["betas"][1] ** step)
        return grad / (v_hat.sqrt() + group["eps"])

    def hyper(self) -> tuple[float, ...]:
        group = self.optimizer.param_groups[0]
        beta1 = float(group["betas"][0])
        return float(group["lr"]), self._carry(beta1), self._adam_step, beta1

    @classmethod
    def coefficients(cls, hyper: np.ndarray) -> np.ndarray:
        lr, carry, adam_step, beta1 = hyper.T
        weight = lr / (1.0 - beta1 ** np.maximum(adam_step, 1))
        return _discounted_tail_sums(weight, carry) * (1.0 - beta1)

    @classmethod
    def own_step(cls, hyper: np.ndarray) -> np.ndarray:
        lr, _, adam_step, beta1 = hyper.T
        return lr / (1.0 - beta1 ** np.maximum(adam_step, 1)) * (1.0 - beta1)


# Exact types: a subclass may change the arithmetic (SGD's subclasses are accepted, as they
# have been since 0.2.0, because torch's own SGD variants are separate classes).
_FAMILIES: dict[type, type[OptimizerFamily]] = {
    torch.optim.SGD: SGDMomentum,
    torch.optim.Adam: AdamFamily,
    torch.optim.AdamW: AdamFamily,
}
_BY_NAME = {family.name: family for family in _FAMILIES.values()}


def family_for(optimizer: torch.optim.Optimizer) -> type[OptimizerFamily]:
    """The family whose arithmetic `optimizer` follows, checked; ValueError if there is none."""
    family = _FAMILIES.get(type(optimizer))
    if family is None and isinstance(optimizer, torch.optim.SGD):
        family = SGDMomentum
    if family is None:
        raise ValueError(f"gradient attribution supports SGD, Adam and AdamW, not {type(optimizer).__name__}; "
                         "record with attribution='update'")
    family.check(optimizer)
    return family


def family_named(name: str) -> type[OptimizerFamily]:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise StoreError(f"the store was recorded with optimizer family {name!r}, unknown to this pyunlearn "
                         f"(it knows {', '.join(_BY_NAME)})") from None


# ---------------------------------------------------------------------------- coefficient rules
RULES = ("first-order", "own-step", "damped")
_RULE: contextvars.ContextVar[tuple[str, float]] = contextvars.ContextVar("pyunlearn_coefficient_rule",
                                                                           default=("first-order", 1.0))


def _check_rule(rule: str, damping) -> tuple[str, float]:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "damped":
        if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not 0.0 <= damping <= 1.0:
            raise ValueError(f"damping must be a number in [0, 1] with rule='damped', got {damping!r}")
        return rule, float(damping)
    if damping is not None:
        raise ValueError(f"damping applies only to rule='damped', not {rule!r}")
    return rule, 1.0 if rule == "first-order" else 0.0


@contextlib.contextmanager
def coefficient_rule(rule: str, damping: float | None = None):
    """Within the block, gradient attribution (`coefficients`, and so `amnesiac_forget` on a
    gradient store) uses `rule` (in this thread / context only):

    - "first-order" (the default outside any block): c_t, the batch's whole first-order effect
      on the final weights, momentum carried on included. Exact for a linear model; in a deep
      one later steps partly compensated, so subtracting it overshoots.
    - "own-step": only the step the batch itself took (SGD: lr_t), as if momentum had not carried
      it on.
    - "damped": own + damping · (first-order − own), damping in [0, 1] (0: own-step, 1:
      first-order).
    """
    token = _RULE.set(_check_rule(rule, damping))
    try:
        yield
    finally:
        _RULE.reset(token)


def coefficients(store, steps, rule: str | None = None, damping: float | None = None, *,
                 up_to: int | None = None) -> np.ndarray:
    """For each of `steps` of a gradient store, the factor c_t by which its stored (pruned)
    vector is subtracted: under the default rule "first-order", the factor by which it moved the
    model that took the steps [0, up_to) (default: the store's final model; a forget passes the
    steps of the model it starts from, so an older model is not given later steps' momentum).
    rule=None uses the `coefficient_rule` in force (first-order outside any block); see
    `coefficient_rule` for the rules."""
    rule, damping = _RULE.get() if rule is None else _check_rule(rule, damping)
    if store.attribution != "gradient":
        raise StoreError(f"{store.path} stores updates (attribution='update'); coefficients need 'gradient'")
    final = store.final_steps if up_to is None else int(up_to)
    if final is None:
        raise StoreError(f"{store.path} has no final model: close the recorder (or call mark_final) first")
    steps = np.asarray(steps, dtype=np.int64)
    if steps.size and steps.max() >= final:
        raise ValueError(f"steps must lie below {final}, the steps the model took")
    if store.optimizer_family is None:
        raise StoreError(f"{store.path} records no optimizer family: no recorder ran on it")
    family = family_named(store.optimizer_family)
    hyper = store.read_step_hyper(final)[:, : len(family.columns)]
    first = family.coefficients(hyper)[steps]
    if rule == "first-order":
        return first
    own = family.own_step(hyper)[steps]
    return own + damping * (first - own)
