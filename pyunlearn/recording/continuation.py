"""Which model training may go on from, once a store has deletions: the rules the recorder
applies before it records a step (pyunlearn/ledger.py holds the timeline they read)."""
from __future__ import annotations

import numpy as np

from ..errors import RecorderError, ResumeRefused
from ..kernels import Fingerprints
from ..store import UpdateStore


def refuse_forgotten(ids: np.ndarray, forgotten: np.ndarray) -> np.ndarray:
    """`ids`, or RecorderError if a deletion request asked for any of them (training on them
    again would undo the deletion)."""
    if forgotten.size:
        again = ids[np.isin(ids, forgotten)]
        if again.size:
            raise RecorderError(
                f"this batch holds {again.size} sample(s) whose deletion was requested (IDs {again[:5].tolist()}"
                f"{' ...' if again.size > 5 else ''}): training on them again would undo the deletion. Remove them "
                "from the training data; this batch was not declared")
    return ids


def settle_pending(store: UpdateStore, model: Fingerprints) -> bool:
    """A deletion still pending (its model being saved when the process stopped) is settled by
    the model training continues from: confirmed if it is the deletion's result, undone if it
    is the model before it, so that the ledger and the resume point name the model on disk.
    Until then its samples count as forgotten. Returns whether it settled one."""
    ledger = store.ledger
    settled = ledger.settled_for_training(model)
    if settled is not ledger:
        store.record_deletion(settled, replacing=ledger)
    return settled is not ledger


def seen_on_timeline(store: UpdateStore, model: Fingerprints, steps: int) -> int | None:
    """How many ledger records the model has seen, if it is on the store's timeline after
    `steps` steps; None if it is not."""
    found = store.ledger.latest_match(model, steps)
    return None if found is None else store.ledger.models[found].requests


def deletions_not_applied(store: UpdateStore, point) -> "ResumeRefused | None":
    """Training must not go on from a model that still holds steps a deletion removed (one made
    from an older model on the timeline, after this one): it would keep the deleted samples."""
    if point is None:
        return None
    behind = store.ledger.unseen_steps(point.requests, point.steps)
    if not behind.size:
        return None
    return ResumeRefused(
        f"{store.path}: deletion requests came in after this model was made, and it still holds {behind.size} of the "
        "steps they removed; training must not go on from it. Bring it up to date first: "
        "pyunlearn.amnesiac_forget(model, store, []) (then resume from the model it returns)")
