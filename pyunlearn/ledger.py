"""The deletion ledger of an update store, and the one rule that decides which steps a model
still needs subtracted.

The ledger lists the steps already subtracted and the fingerprint of the model those
subtractions produced. Two models may be forgotten from:

- the model recording ended with (the store's final fingerprint): it still holds every step,
  so every step in the ledger is subtracted too, plus the new ones;
- the model the last deletion produced (the ledger's fingerprint): only the new steps are.

Any other model is refused, so a step is never subtracted twice from any model. Callers must
hold the store's writer lock while they read the ledger, subtract and write the ledger back
(`with store.writing():`), so that two deletions cannot both start from the same ledger.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import CorruptStoreError, ModelMismatchError, StoreError


class DeletionPlan(NamedTuple):
    subtract: np.ndarray  # steps to subtract from the model passed in, sorted
    new_steps: np.ndarray  # steps no earlier deletion removed, sorted


class Ledger(NamedTuple):
    removed_steps: np.ndarray  # int64, sorted, unique: steps already subtracted
    fingerprint: str | None  # of the model those subtractions produced

    @classmethod
    def empty(cls) -> "Ledger":
        return cls(np.empty(0, np.int64), None)

    def __eq__(self, other) -> bool:  # tuple equality would compare the arrays elementwise
        return isinstance(other, Ledger) and self.fingerprint == other.fingerprint and \
            np.array_equal(self.removed_steps, other.removed_steps)

    def __ne__(self, other) -> bool:
        return not self == other

    __hash__ = None  # holds an array

    @property
    def has_deletions(self) -> bool:
        return bool(len(self.removed_steps))

    def plan(self, requested_steps: np.ndarray, *, model_fingerprint: str, final_fingerprint: str | None,
             where: str) -> DeletionPlan:
        """What forgetting `requested_steps` from the model with `model_fingerprint` subtracts,
        by the rule in the module docstring; ModelMismatchError or StoreError if it may not."""
        new_steps = np.setdiff1d(requested_steps, self.removed_steps)
        if self.fingerprint is not None and model_fingerprint == self.fingerprint:
            subtract = new_steps
        elif final_fingerprint is None:
            raise StoreError(f"{where} has no final model fingerprint: recording did not close cleanly. "
                             "Load the trained model and call store.mark_final(model) first")
        elif model_fingerprint == final_fingerprint:
            subtract = np.union1d(self.removed_steps, requested_steps)
        else:
            raise ModelMismatchError(
                f"this model is neither the one recording ended with ({final_fingerprint}) nor the one the last "
                f"deletion produced ({self.fingerprint}); it has {model_fingerprint}. Forget from one of those two")
        return DeletionPlan(subtract.astype(np.int64), new_steps.astype(np.int64))

    def after(self, new_steps: np.ndarray, fingerprint: str | None) -> "Ledger":
        """This ledger with `new_steps` removed too, describing the model with `fingerprint`."""
        return Ledger(np.union1d(self.removed_steps, new_steps).astype(np.int64), fingerprint)

    def refuse_more_training(self, where: str, action: str) -> None:
        """Recording further steps after a deletion would start from a model this ledger does
        not describe."""
        if self.has_deletions:
            raise StoreError(f"{where} has a deletion ledger ({len(self.removed_steps)} steps removed): "
                             f"cannot {action} it, since further training would start from a model the ledger "
                             "does not describe. Record further training into a new store")

    def to_attrs(self) -> dict:
        return {"removed_steps": [int(s) for s in self.removed_steps], "fingerprint": self.fingerprint}

    @classmethod
    def from_attrs(cls, attrs, where: str) -> "Ledger":
        try:
            steps = attrs["removed_steps"]
            fingerprint = attrs["fingerprint"]
            if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
                raise TypeError("removed_steps must be a list of ints")
            if fingerprint is not None and not isinstance(fingerprint, str):
                raise TypeError("fingerprint must be a string or null")
        except (KeyError, TypeError) as exc:
            raise CorruptStoreError(f"{where}: the deletion ledger in the group attributes is malformed ({exc}); "
                                    "restore the store's zarr.json from a copy") from None
        removed = np.asarray(steps, dtype=np.int64)
        if removed.size and (np.any(np.diff(removed) <= 0) or removed[0] < 0):
            raise CorruptStoreError(f"{where}: the deletion ledger's steps are not sorted, unique and non-negative")
        return cls(removed, fingerprint)
