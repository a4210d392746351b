"""Algorithm 1, (partial) amnesiac unlearning: subtract the stored updates of every step whose
batch held a sample to forget. Dense amnesiac unlearning (Graves et al.) is the same call on a
store created with keep=1.0, value_dtype="float32". On a store with attribution="gradient" each
step's stored gradient is subtracted times its coefficient (UpdateStore.coefficients): the
batch's whole first-order contribution, momentum included."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import ops
from .._ids import as_ids
from .._model import as_float32_work, fingerprint
from ..errors import ModelMismatchError, StoreError
from ..store import UpdateStore


READ_BATCH_BYTES = 256 << 20


@dataclass
class ForgetReport:
    steps_removed: int  # steps newly subtracted for this request
    steps_applied: int  # steps subtracted from the model passed in (more when it was the original)
    missing_ids: np.ndarray  # requested IDs no recorded step used
    seconds: float
    change_norm: float  # L2 norm of the change to the parameters
    ledger_steps: int  # steps the ledger lists as removed after this request


def amnesiac_forget(model: torch.nn.Module, store: UpdateStore, ids) -> ForgetReport:
    """Forgets `ids` from `model` in place and records it in the store's ledger.

    `model` must be either the model the recording ended with (e.g. reloaded from its
    checkpoint: every step in the ledger is subtracted too) or the model the last deletion
    produced (only the new steps are subtracted). Any other model is refused. A step is never
    subtracted twice. The ledger is written after the model changed; if that write fails, the
    model is put back and the error raised.
    """
    start = time.perf_counter()
    if not isinstance(store, UpdateStore):
        raise TypeError(f"store must be an UpdateStore, got {type(store).__name__}")
    holds_lock = store._lock.held
    try:
        return _forget(model, store, ids, start)
    finally:
        if not holds_lock:  # a lock this call took is given back: others may forget next
            store._lock.release()


def _forget(model, store: UpdateStore, ids, start: float) -> ForgetReport:
    store._require_writer()  # the lock first: the ledger read below must be current
    params = store.check_model(model)
    ids = as_ids(ids)
    lookup = store.steps_for(ids)
    ledger = store.ledger
    current = fingerprint(params)
    if ledger.fingerprint is not None and current == ledger.fingerprint:
        apply = np.setdiff1d(lookup.steps, ledger.removed_steps)
    elif store.final_fingerprint is None:
        raise StoreError(f"{store.path} has no final model fingerprint: recording did not close cleanly. "
                         "Load the trained model and call store.mark_final(model) first")
    elif current == store.final_fingerprint:
        apply = np.union1d(ledger.removed_steps, lookup.steps)
    else:
        raise ModelMismatchError(
            f"this model is neither the one recording ended with ({store.final_fingerprint}) nor the one the last "
            f"deletion produced ({ledger.fingerprint}); it has {current}. Forget from one of those two"
        )
    new_steps = np.setdiff1d(lookup.steps, ledger.removed_steps)
    ledger_after = np.union1d(ledger.removed_steps, new_steps)

    work = [as_float32_work(p) for p in params]
    backup = [w.clone() for w in work]
    names = [layer.name for layer in store.layers]
    with torch.no_grad():
        try:
            # Rows in batches of ~256 MB: a long run's matched steps need not fit in memory.
            row_bytes = store.row_length * (4 + np.dtype(store.value_dtype).itemsize) + 4 * len(store.layers)
            per_batch = max(1, READ_BATCH_BYTES // row_bytes)
            # The batch moved the weights by −c_t·g_t; undoing it subtracts −c_t·g_t.
            factors = -store.coefficients(apply).astype(np.float32) if store.attribution == "gradient" else None
            for first in range(0, apply.size, per_batch):
                rows = store.read(apply[first : first + per_batch])
                if factors is not None:
                    batch_factors = torch.from_numpy(factors[first : first + per_batch])
                    rows = rows._replace(scales=rows.scales * batch_factors[:, None])
                ops.subtract_sparse(work, rows, store.k, names=names)
        except BaseException:
            for w, b in zip(work, backup):
                w.copy_(b)
            raise
        for p, w in zip(params, work):
            if w is not p and w.data_ptr() != p.data_ptr():
                p.copy_(w.view_as(p))
        try:
            store._record_deletion(ledger_after, fingerprint(params))
        except BaseException:
            for p, b in zip(params, backup):
                p.copy_(b.view_as(p))
            raise
    change = math.sqrt(sum(float(torch.linalg.vector_norm(w - b)) ** 2 for w, b in zip(work, backup)))
    return ForgetReport(
        steps_removed=int(new_steps.size), steps_applied=int(apply.size), missing_ids=lookup.missing,
        seconds=time.perf_counter() - start, change_norm=change,
        ledger_steps=int(ledger_after.size),
    )
