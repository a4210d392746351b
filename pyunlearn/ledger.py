"""The deletion ledger of an update store, and the one rule that decides which steps a model
still needs subtracted.

The ledger lists the steps already subtracted and the fingerprint of the model those
subtractions produced. Two models may be forgotten from:

- the model recording ended with (the store's final fingerprint): it still holds every step,
  so every step in the ledger is subtracted too, plus the new ones;
- the model the last deletion produced (the ledger's fingerprint): only the new steps are.

Any other model is refused, so a step is never subtracted twice from any model.

A deletion whose model is saved by the caller goes in two writes, so that the ledger always
describes a model that exists on disk, whenever the process stops: first a *pending* entry
(the steps and the fingerprint the new model will have), then — once the model is saved — the
entry itself. While an entry is pending, a model with its fingerprint is accepted as the last
deletion's result (the save went through) and a model with the ledger's own fingerprint as the
state before it (the save did not); whichever is forgotten from next settles it.

Callers must hold the store's writer lock while they read the ledger, subtract and write the
ledger back (`with store.writing():`), so that two deletions cannot both start from one ledger.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import CorruptStoreError, ModelMismatchError, StoreError


class DeletionPlan(NamedTuple):
    subtract: np.ndarray  # steps to subtract from the model passed in, sorted
    new_steps: np.ndarray  # steps no earlier deletion removed, sorted
    base: "Ledger"  # the ledger as it stands for this model (a pending entry settled)


class Pending(NamedTuple):
    steps: np.ndarray  # int64, sorted: the steps the pending deletion removes
    fingerprint: str  # of the model it produces


class Ledger(NamedTuple):
    removed_steps: np.ndarray  # int64, sorted, unique: steps already subtracted
    fingerprint: str | None  # of the model those subtractions produced
    pending: Pending | None = None  # a deletion whose model may not be saved yet

    @classmethod
    def empty(cls) -> "Ledger":
        return cls(np.empty(0, np.int64), None)

    def __eq__(self, other) -> bool:  # tuple equality would compare the arrays elementwise
        return isinstance(other, Ledger) and self.to_attrs() == other.to_attrs()

    def __ne__(self, other) -> bool:
        return not self == other

    __hash__ = None  # holds an array

    @property
    def has_deletions(self) -> bool:
        return bool(len(self.removed_steps))

    def fingerprints_on_chain(self) -> list[str]:
        """The models this ledger accepts besides the store's final model."""
        return [f for f in (self.fingerprint, self.pending and self.pending.fingerprint) if f]

    def settled_for(self, model) -> "Ledger":
        """This ledger without its pending entry: applied if the model (a fingerprint, or
        pyunlearn._model.Fingerprints) is the one the pending deletion produced, dropped otherwise."""
        if self.pending is None:
            return self
        if _matches(model, self.pending.fingerprint):
            return Ledger(np.union1d(self.removed_steps, self.pending.steps).astype(np.int64), self.pending.fingerprint)
        return Ledger(self.removed_steps, self.fingerprint)

    def plan(self, requested_steps: np.ndarray, *, model_fingerprint, final_fingerprint: str | None,
             where: str) -> DeletionPlan:
        """What forgetting `requested_steps` from the model subtracts, by the rule in the module
        docstring; ModelMismatchError or StoreError if it may not. `model_fingerprint`: the
        model's fingerprint, or pyunlearn._model.Fingerprints (which compares with stored values
        of any fingerprint algorithm)."""
        model = model_fingerprint
        base = self.settled_for(model)
        new_steps = np.setdiff1d(requested_steps, base.removed_steps)
        if base.fingerprint is not None and _matches(model, base.fingerprint):
            subtract = new_steps
        elif final_fingerprint is None:
            raise StoreError(f"{where} has no final model fingerprint: recording did not close cleanly. "
                             "Load the trained model and call store.mark_final(model) first")
        elif _matches(model, final_fingerprint):
            subtract = np.union1d(base.removed_steps, requested_steps)
        else:
            known = ", ".join([final_fingerprint] + self.fingerprints_on_chain())
            shown = model.get() if hasattr(model, "get") else model
            raise ModelMismatchError(
                f"this model ({shown}) is neither the one recording ended with nor one a deletion "
                f"produced (the store knows {known}). Forget from one of those")
        return DeletionPlan(subtract.astype(np.int64), new_steps.astype(np.int64), base)

    def after(self, new_steps: np.ndarray, fingerprint: str | None) -> "Ledger":
        """This (settled) ledger with `new_steps` removed too, describing the model with `fingerprint`."""
        return Ledger(np.union1d(self.removed_steps, new_steps).astype(np.int64), fingerprint)

    def with_pending(self, new_steps: np.ndarray, fingerprint: str) -> "Ledger":
        """This (settled) ledger with a pending deletion of `new_steps` producing `fingerprint`."""
        return Ledger(self.removed_steps, self.fingerprint, Pending(np.asarray(new_steps, dtype=np.int64), fingerprint))

    def refuse_more_training(self, where: str, action: str) -> None:
        """Recording further steps after a deletion would start from a model this ledger does
        not describe."""
        if self.has_deletions or self.pending is not None:
            raise StoreError(f"{where} has a deletion ledger ({len(self.removed_steps)} steps removed): "
                             f"cannot {action} it, since further training would start from a model the ledger "
                             "does not describe. Record further training into a new store")

    def to_attrs(self) -> dict:
        attrs = {"removed_steps": [int(s) for s in self.removed_steps], "fingerprint": self.fingerprint}
        if self.pending is not None:
            attrs["pending"] = {"steps": [int(s) for s in self.pending.steps], "fingerprint": self.pending.fingerprint}
        return attrs

    @classmethod
    def from_attrs(cls, attrs, where: str) -> "Ledger":
        try:
            removed = _steps(attrs["removed_steps"])
            fingerprint = attrs["fingerprint"]
            if fingerprint is not None and not isinstance(fingerprint, str):
                raise TypeError("fingerprint must be a string or null")
            pending = attrs.get("pending")
            if pending is not None:
                if not isinstance(pending.get("fingerprint"), str):
                    raise TypeError("pending.fingerprint must be a string")
                pending = Pending(_steps(pending["steps"]), pending["fingerprint"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptStoreError(f"{where}: the deletion ledger in the group attributes is malformed ({exc}); "
                                    "restore the store's zarr.json from a copy") from None
        return cls(removed, fingerprint, pending)


def _matches(model, stored: str | None) -> bool:
    if stored is None:
        return False
    return model.matches(stored) if hasattr(model, "matches") else model == stored


def _steps(value) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise TypeError("steps must be a list of ints")
    steps = np.asarray(value, dtype=np.int64)
    if steps.size and (np.any(np.diff(steps) <= 0) or steps[0] < 0):
        raise ValueError("steps must be sorted, unique and non-negative")
    return steps
