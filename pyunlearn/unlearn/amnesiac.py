"""Algorithm 1, (partial) amnesiac unlearning: subtract the stored updates of every step whose
batch held a sample to forget. Dense amnesiac unlearning (Graves et al.) is the same call on a
store created with keep=1.0, value_dtype="float32". On a store with attribution="gradient" each
step's stored gradient is subtracted times its coefficient (pyunlearn.attribution): the
batch's whole first-order contribution, momentum included."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .._version import __version__
from ..kernels import Fingerprints, as_float32_work, fingerprint, ops
from ..kernels.checks import one_device
from ..attribution import coefficients
from ..errors import CorruptStoreError, StoreError
from ..ledger import Ledger, new_request_id, utc_now
from ..store import StepLookup, UpdateStore
from .buffers import warn_stale_buffers


READ_BATCH_BYTES = 256 << 20


@dataclass
class ForgetReport:
    request_id: str  # the request's id in the store's audit trail (caller-given or generated)
    steps_removed: int  # steps newly subtracted for this request
    steps_applied: int  # steps subtracted from the model passed in (more when it was the original)
    missing_ids: np.ndarray  # requested IDs no recorded step used
    seconds: float
    change_norm: float  # L2 norm of the change to the parameters
    ledger_steps: int  # steps the ledger lists as removed after this request
    ledger_before: Ledger  # the store's ledger before this request
    ledger_after: Ledger  # the ledger that describes the model this request produced
    ledger_pending: Ledger | None  # commit=False: what was written (ledger_before with this deletion pending)
    committed: bool  # whether ledger_after was written (commit=True)
    subtracted: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # the steps applied


def amnesiac_forget(model: torch.nn.Module, store: UpdateStore, ids, *, request_id: str | None = None,
                    commit: bool = True) -> ForgetReport:
    """Forgets `ids` (int64 sample IDs, or str/bytes/UUID keys on a store of keys) from `model`
    in place and records the request in the store's ledger (its audit trail; `request_id`:
    yours, e.g. the ticket number, or one generated).

    `model` must be on the store's timeline (pyunlearn.ledger): the end of a training segment
    or a deletion's result, e.g. last week's deployed checkpoint. It is brought to the current
    deletion state: the steps below its own that earlier requests removed and it has not seen
    are subtracted too, then those of this request; a step is never subtracted twice, and a
    model not on the timeline is refused. Pass no ids (`[]`) to only catch up. Stored rows
    holding NaN or Inf, or damaged or missing chunks, are refused and the model is left as it was.
    The model may live on a GPU (all of it on one device): the rows are read on the host and
    subtracted there, with the same bits as on the CPU; half-precision parameters are worked on
    in float32 and rounded back.

    The ledger must describe a model that exists, whenever the process stops. With commit=True
    (default) the ledger is written once the model changed (if that write fails, the model is
    put back); save the model next, and if saving fails undo the entry with
    store.record_deletion(report.ledger_before, replacing=report.ledger_after). For a save
    that may be interrupted, use commit=False: the deletion is written as *pending* (both the
    model before and the model after it are then accepted); save the model (atomically: a
    temporary file renamed over the target), then
    store.record_deletion(report.ledger_after, replacing=report.ledger_pending), or on failure
    store.record_deletion(report.ledger_before, replacing=report.ledger_pending). That is what
    `pyunlearn forget` does. The call runs in a write session: it holds the store's writer
    lock from reading the ledger to writing it.
    """
    start = time.perf_counter()
    if not isinstance(store, UpdateStore):
        raise TypeError(f"store must be an UpdateStore, got {type(store).__name__}")
    if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= 200):
        raise ValueError(f"request_id must be a non-empty string of at most 200 characters, got {request_id!r}")
    if store.recorder is not None:
        raise StoreError(f"a recorder is recording into {store.path} through this handle: close it (rec.close()) "
                         "before forgetting, and continue training with a new recorder from the model forgetting returns")
    if isinstance(model, torch.nn.Module):  # (check_model says what is wrong with anything else)
        ops.supports(one_device(model.named_parameters(), "model", "forgetting"))
    with store.writing():  # the lock first: the ledger read below must be current
        params = store.check_model(model)
        wanted = np.unique(store.ids_for(ids, allow_empty=True))
        lookup = store.steps_for(wanted) if wanted.size else StepLookup(np.empty(0, np.int64), wanted)
        ledger, now = store.ledger, utc_now()
        plan = ledger.plan(lookup.steps, model_fingerprint=Fingerprints(params), where=store.path, now=now)
        work = [as_float32_work(p) for p in params]
        rollback = _Rollback(work, store, plan.subtract.size)
        with torch.no_grad():
            try:
                _subtract(work, store, plan.subtract, rollback)
            except BaseException:
                rollback.restore()
                raise
            for p, w in zip(params, work):
                if w is not p and w.data_ptr() != p.data_ptr():
                    p.copy_(w.view_as(p))
            result = fingerprint(params)
            change = rollback.change_norm()  # before the ledger write: once it is written, nothing may fail
            request_id = request_id or new_request_id()
            written = plan.base.with_deletion(
                plan, fingerprint_after=result, request_id=request_id, keys=wanted.size,
                keys_digest=store.keys.digest(wanted, store.metadata.key_check), missing_keys=lookup.missing.size, method="amnesiac",
                params={"keep": store.keep, "value_dtype": store.value_dtype, "attribution": store.attribution},
                version=__version__, pending=not commit, now=now)
            ledger_after = written if commit else written.confirmed(now=now)
            try:
                store.record_deletion(written, replacing=ledger, forgotten_ids=wanted)
            except BaseException:
                rollback.restore()
                for p, w in zip(params, work):
                    if w is not p and w.data_ptr() != p.data_ptr():
                        p.copy_(w.view_as(p))
                raise
    warn_stale_buffers(model, "amnesiac_forget")
    return ForgetReport(
        request_id=request_id, steps_removed=int(plan.new_steps.size), steps_applied=int(plan.subtract.size), missing_ids=lookup.missing,
        seconds=time.perf_counter() - start, change_norm=change, ledger_steps=int(ledger_after.removed_steps.size),
        ledger_before=ledger, ledger_after=ledger_after, ledger_pending=None if commit else written,
        committed=bool(commit), subtracted=plan.subtract,
    )


def _subtract(work: list[torch.Tensor], store: UpdateStore, steps: np.ndarray, rollback: "_Rollback") -> None:
    """work −= the stored rows of `steps` (times their coefficients on a gradient store), read
    in batches of ~256 MB so that a long run's matched steps need not fit in memory."""
    row_bytes = store.row_length * (4 + np.dtype(store.value_dtype).itemsize) + 4 * len(store.layers)
    per_batch = max(1, READ_BATCH_BYTES // row_bytes)
    # The batch moved the weights by −c_t·g_t; undoing it subtracts −c_t·g_t.
    factors = -coefficients(store, steps).astype(np.float32) if store.attribution == "gradient" else None
    names = [layer.name for layer in store.layers]
    for first in range(0, steps.size, per_batch):
        batch = steps[first : first + per_batch]
        rows = store.read(batch)
        if factors is not None:
            rows = rows._replace(scales=rows.scales * torch.from_numpy(factors[first : first + per_batch])[:, None])
        _refuse_non_finite(rows, batch, store)
        rollback.save(rows)
        ops.subtract_sparse(work, rows, store.k, names=names, steps=batch)


def _refuse_non_finite(rows, steps: np.ndarray, store: UpdateStore) -> None:
    """NaN or Inf in a stored row would be written into the parameters: refuse it (the caller
    puts back what earlier batches changed)."""
    bad = ~(torch.isfinite(rows.values).all(dim=1) & torch.isfinite(rows.scales).all(dim=1))
    if bool(bad.any()):
        step = int(steps[int(bad.nonzero()[0, 0])])
        raise CorruptStoreError(f"{store.path}: the stored row of step {step} holds NaN or Inf; nothing was "
                                "subtracted. The store is damaged: restore it from a copy")


class _Rollback:
    """What a failed forget needs to put the parameters back: the values of the entries each
    batch of rows is about to change (a forget of a few steps touches a small share of a large
    model), or a whole copy when the rows would touch more entries than the model holds."""

    def __init__(self, work: list[torch.Tensor], store: UpdateStore, rows: int):
        self._work, self._k = work, store.k
        self._copy = [w.clone() for w in work] if rows * store.row_length >= sum(w.numel() for w in work) else None
        self._saved: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per batch, per layer: (positions, values)

    def save(self, rows) -> None:
        """Before a batch of rows is subtracted: the values at every position they change."""
        if self._copy is not None:
            return
        saved, start = [], 0
        for w, k in zip(self._work, self._k):
            positions = (rows.index[:, start : start + k].to(torch.int64).cumsum(1) - 1).reshape(-1)  # on the host
            saved.append((positions, w.view(-1)[positions.to(w.device)]))
            start += k
        self._saved.append(saved)

    def restore(self) -> None:
        with torch.no_grad():
            if self._copy is not None:
                for w, c in zip(self._work, self._copy):
                    w.copy_(c)
                return
            for saved in reversed(self._saved):  # latest batch first: the earliest values win
                for w, (positions, values) in zip(self._work, saved):
                    w.view(-1)[positions.to(w.device)] = values

    def change_norm(self) -> float:
        """L2 norm of the change, each entry counted once with its earliest saved value: by
        np.unique over a layer's few saved positions, or, where they are many, by scattering
        the differences into one reused zeroed buffer."""
        if self._copy is not None:
            return math.sqrt(sum(float(torch.linalg.vector_norm(w - c)) ** 2 for w, c in zip(self._work, self._copy)))
        total, buffer = 0.0, None
        for i, w in enumerate(self._work):
            positions = [saved[i][0] for saved in self._saved]
            values = [saved[i][1] for saved in self._saved]
            count = sum(len(p) for p in positions)
            if count == 0:
                continue
            if count * 8 < w.numel():
                flat = torch.cat(positions).numpy()
                unique, first = np.unique(flat, return_index=True)  # first: the earliest batch's value
                original = torch.cat(values)[torch.from_numpy(first).to(w.device)]
                total += float(torch.linalg.vector_norm(w.view(-1)[torch.from_numpy(unique).to(w.device)] - original)) ** 2
                continue
            if buffer is None:
                buffer = torch.zeros(max(t.numel() for t in self._work), device=w.device)
            diff = buffer[: w.numel()]
            positions = [pos.to(w.device) for pos in positions]
            for pos, val in zip(reversed(positions), reversed(values)):  # the earliest saved value wins
                diff[pos] = w.view(-1)[pos] - val
            total += float(torch.linalg.vector_norm(diff)) ** 2
            for pos in positions:
                diff[pos] = 0.0
        return math.sqrt(total)
