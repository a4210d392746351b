"""Algorithm 1, (partial) amnesiac unlearning: subtract the stored updates of every step whose
batch held a sample to forget. Dense amnesiac unlearning (Graves et al.) is the same call on a
store created with keep=1.0, value_dtype="float32". On a store with attribution="gradient" each
step's stored gradient is subtracted times its coefficient (pyunlearn.attribution): the
batch's whole first-order contribution, momentum included."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import ledger
from .._version import __version__
from ..attribution import coefficients
from ..errors import CorruptStoreError, NotFoundError, StoreError
from ..kernels import Fingerprints, fingerprint, ops
from ..kernels.checks import one_device
from ..store import StepLookup, UpdateStore
from .buffers import warn_stale_buffers


READ_BATCH_BYTES = 256 << 20
NOT_FOUND = ("raise", "record")


@dataclass
class ForgetReport:
    request_id: str | None  # the request's id in the store's audit trail (caller-given or generated); None: no request
    status: str  # "applied", "not-found" (recorded, nothing of it matched), "pending" (commit=False),
    #              "caught-up" (no request; the model was brought up to date) or "up-to-date" (nothing done)
    steps_removed: int  # steps newly removed for this request
    steps_applied: int  # steps subtracted from the model passed in (more when it was behind)
    missing_ids: np.ndarray  # requested IDs no recorded step used
    seconds: float
    change_norm: float  # L2 norm of the change to the parameters
    ledger_steps: int  # steps the timeline lists as removed after this call (a pending deletion's included)
    record: int | None  # the index of the deletion (or catch-up) record written, if one was
    head: str  # the audit log's head after this call: keep it outside the store (pyunlearn audit verify --head)
    committed: bool  # False for commit=False: the deletion is pending until store.confirm(record)
    subtracted: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # the steps applied
    matched: int = 0  # requested IDs some recorded step used


def amnesiac_forget(model: torch.nn.Module, store: UpdateStore, ids, *, request_id: str | None = None,
                    commit: bool = True, not_found: str = "raise") -> ForgetReport:
    """Forgets `ids` (keys on a store of keys; int64 sample IDs on a store of integer IDs) from
    `model` in place and records the request in the store's audit log (`request_id`: yours, e.g.
    the ticket number, or one generated; an id used before is refused).

    `model` must be on the store's timeline (pyunlearn.ledger): the end of a training segment
    or a deletion's result, e.g. last week's deployed checkpoint. It is brought to the current
    deletion state: the steps below its own that earlier requests removed and it has not had
    are subtracted too, then those of this request; a step is never subtracted twice, and a
    model not on the timeline is refused. Pass no ids (`[]`) to only catch up: that is a
    catch-up record (or nothing, if the model is up to date), not a request.

    A request none of whose keys a recorded step used removes nothing: NotFoundError before
    anything changes (not_found="raise", the default), or recorded with status "not-found"
    (not_found="record"). A request partly found is applied; `missing_ids` says which were not.
    Everything that can refuse — the keys without their secret, integer IDs on a store of keys,
    stored rows that are damaged, moved (their place-bound digests) or hold NaN — refuses
    before the model changes, or puts it back.

    The log must describe a model that exists whenever the process stops. With commit=True
    (default) the record is written once the model changed (if that write fails, the model is
    put back); save the model next (if saving fails, store.undo(report.record)). For a save that
    may be interrupted, commit=False writes the deletion as *pending*; save the model
    (atomically), then store.confirm(report.record), or store.undo(report.record) if the save
    failed. A pending deletion is never undone implicitly: forgetting from its model or
    training from it confirms it, and forgetting from an earlier model applies it too. That is
    what `pyunlearn forget` does. The call holds the store's writer lock from reading the
    timeline to writing it. Half-precision parameters are worked on in float32 and rounded
    back; float64 ones in float64. The model may live on a GPU (all of it on one device).
    """
    with forgetting(model, store, ids, request_id=request_id, commit=commit, not_found=not_found) as deletion:
        pass
    return deletion.report


class Deletion:
    """A forget in progress (see `forgetting`): the steps subtracted, the request's facts, and
    what the caller notes before it is recorded."""

    def __init__(self, store: UpdateStore, plan, wanted: np.ndarray, lookup: StepLookup, request_id: str | None):
        self.store, self.plan, self.ids, self.lookup, self.request_id = store, plan, wanted, lookup, request_id
        self.method, self.params = "amnesiac", {"keep": repr(store.keep), "value_dtype": store.value_dtype,
                                                "attribution": store.attribution}
        self.guard: dict[str, str] | None = None
        self.evidence: dict[str, str] | None = None
        self.change_norm = 0.0
        self.report: ForgetReport | None = None  # once recorded

    @property
    def subtracted(self) -> np.ndarray:
        """The steps subtracted from the model (those earlier requests removed that it had not
        had, and this request's new ones)."""
        return self.plan.subtract

    @property
    def requested(self) -> bool:
        return self.ids.size > 0

    def note(self, *, method: str | None = None, params: dict | None = None, guard: dict | None = None,
             evidence: dict | None = None) -> None:
        """What the deletion's record says beside the subtraction: the method as a whole (e.g.
        "amnesiac+repair"), its parameters, what a guard measured and did, a membership check at
        deletion time (names → values, written as strings)."""
        if method is not None:
            self.method = str(method)
        if params is not None:
            self.params.update({str(k): str(v) for k, v in params.items()})
        if guard is not None:
            self.guard = {str(k): str(v) for k, v in guard.items()}
        if evidence is not None:
            self.evidence = {str(k): str(v) for k, v in evidence.items()}


@contextmanager
def forgetting(model: torch.nn.Module, store: UpdateStore, ids, *, request_id: str | None = None,
               commit: bool = True, not_found: str = "raise", keep_copy: bool = False):
    """amnesiac_forget in two halves, for a caller that changes the model further before the
    deletion is recorded (a repair, a fine-tune: pyunlearn.unlearn.forget does). On entering,
    the stored updates are subtracted (every refusal of amnesiac_forget comes first); the block
    may change the model and call deletion.note(...); on leaving, the deletion is recorded with
    the model's fingerprint as it is then, and deletion.report is set. If the block raises, the
    model is put back as it was before the forget (keep_copy=True keeps a whole copy for that,
    needed when the block changes more than the subtracted entries) and nothing is recorded."""
    start = time.perf_counter()
    if not isinstance(store, UpdateStore):
        raise TypeError(f"store must be an UpdateStore, got {type(store).__name__}")
    if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= 200):
        raise ValueError(f"request_id must be a non-empty string of at most 200 characters, got {request_id!r}")
    if not_found not in NOT_FOUND:
        raise ValueError(f"not_found must be 'raise' (refuse a request nothing of which was recorded) or 'record' "
                         f"(record it as not-found), got {not_found!r}")
    if isinstance(model, torch.nn.Module):  # (check_model says what is wrong with anything else)
        ops.supports(one_device(model.named_parameters(), "model", "forgetting"))
    with store.writing("forgetting"):  # the lock first: the timeline read below must be current
        params = store.check_model(model)
        wanted = np.unique(np.asarray(store.ids_for(ids, allow_empty=True), dtype=np.int64))
        requested = wanted.size > 0
        lookup = store.lookup(wanted) if requested else StepLookup(np.empty(0, np.int64), wanted)
        matched = int(wanted.size - lookup.missing.size)
        if requested and not matched and not_found == "raise":
            raise NotFoundError(
                f"none of the {wanted.size} {'keys' if store.metadata.keyed else 'IDs'} of this request was used by a "
                f"recorded step of {store.path}: nothing would be removed, and nothing was changed. Check their "
                "spelling (and that they are this store's); pass not_found='record' (pyunlearn forget "
                "--record-not-found) to record the request as not-found")
        keys_digest = store.keys.digest(wanted, store.metadata) if requested else None  # needs the secret: now
        store.check_can_record()  # the audit key too: every refusal comes before the model changes
        if requested and request_id is not None:
            _refuse_duplicate(store, request_id)
        plan = ledger.plan_forget(store.ledger, Fingerprints(params), lookup.steps)
        copy = [p.detach().clone() for p in params] if keep_copy else None
        work = [_work(p) for p in params]
        rollback = _Rollback(work, store, plan.subtract.size)
        deletion = Deletion(store, plan, wanted, lookup, request_id)

        def put_back() -> None:
            with torch.no_grad():
                if copy is not None:
                    for p, c in zip(params, copy):
                        p.copy_(c)
                    return
                rollback.restore()
                _copy_back(params, work)

        with torch.no_grad():
            try:
                _subtract(work, store, plan.subtract, rollback, up_to=plan.start.steps)
            except BaseException:
                rollback.restore()
                raise
            _copy_back(params, work)
            deletion.change_norm = rollback.change_norm()
        try:
            yield deletion
            result = fingerprint(params)  # the model as the block left it
            documents = list(plan.settle)
            if requested:
                deletion.request_id = request_id = request_id or ledger.new_request_id()
                documents.append({"kind": "deletion", "request": request_id, "keys": int(wanted.size),
                                  "keys_digest": keys_digest, "missing": int(lookup.missing.size),
                                  "steps": [int(s) for s in plan.new_steps], "subtracted": int(plan.subtract.size),
                                  "from": plan.start.record, "fingerprint_before": plan.start.fingerprint,
                                  "fingerprint_after": result, "up_to": plan.start.steps, "method": deletion.method,
                                  "params": dict(deletion.params), "version": __version__, "pending": not commit,
                                  "guard": deletion.guard, "evidence": deletion.evidence})
            elif plan.subtract.size or result != plan.start.fingerprint:
                documents.append({"kind": "catch-up", "subtracted": int(plan.subtract.size), "from": plan.start.record,
                                  "fingerprint_before": plan.start.fingerprint, "fingerprint_after": result,
                                  "up_to": plan.start.steps, "version": __version__})
            records = store.record(documents, forgotten_ids=wanted)
        except BaseException:
            put_back()
            raise
    warn_stale_buffers(model, "amnesiac_forget")
    made = next((r for r in reversed(records) if r.kind in ("deletion", "catch-up")), None)
    if requested:
        status = "pending" if not commit else ("not-found" if not matched else "applied")
    else:
        status = "caught-up" if made is not None else "up-to-date"
    deletion.report = ForgetReport(
        request_id=request_id if requested else None, status=status, steps_removed=int(plan.new_steps.size),
        steps_applied=int(plan.subtract.size), missing_ids=lookup.missing, seconds=time.perf_counter() - start,
        change_norm=deletion.change_norm, ledger_steps=int(store.ledger.state.removed),
        record=None if made is None else made.index, head=store.head, committed=bool(commit) or not requested,
        subtracted=plan.subtract, matched=matched)


def _refuse_duplicate(store: UpdateStore, request_id: str) -> None:
    earlier = store.request_record(request_id)
    if earlier is None:
        return
    status = store.ledger.status(earlier.index)
    advice = ("it is still pending: its output may not have been saved. Forget from the model you have (the saved "
              "output, or the input) with no keys (pyunlearn forget --catch-up) to settle it"
              if status == "pending" else "give this request another id")
    raise StoreError(f"request id {request_id!r} was already used by record {earlier.index} of {store.path} "
                     f"({status}, {earlier.time}); nothing was changed: {advice}")


def _work(param: torch.Tensor) -> torch.Tensor:
    """The tensor a forget changes for `param`: itself when it is float32 or float64 and
    contiguous (in place; float64 is subtracted in float64), a contiguous float32 copy otherwise
    (half precision: rounded back once at the end)."""
    p = param.detach()
    if p.dtype == torch.float64 and p.is_contiguous():
        return p
    return ops.as_float32_work(p)


def _copy_back(params, work) -> None:
    for p, w in zip(params, work):
        if w is not p and w.data_ptr() != p.data_ptr():
            p.copy_(w.view_as(p))


def _subtract(work: list[torch.Tensor], store: UpdateStore, steps: np.ndarray, rollback: "_Rollback", *,
              up_to: int) -> None:
    """work −= the stored rows of `steps` (times their coefficients on a gradient store, over the
    steps [0, up_to) the model forgotten from took), read in batches of ~256 MB so that a long
    run's matched steps need not fit in memory. float64 layers are subtracted in float64, the
    others by the kernels in float32."""
    row_bytes = store.row_length * (4 + np.dtype(store.value_dtype).itemsize) + 4 * len(store.layers)
    per_batch = max(1, READ_BATCH_BYTES // row_bytes)
    # The batch moved the weights by −c_t·g_t; undoing it subtracts −c_t·g_t.
    factors = -coefficients(store, steps, up_to=up_to).astype(np.float32) if store.attribution == "gradient" else None
    names = [layer.name for layer in store.layers]
    wide = [i for i, w in enumerate(work) if w.dtype == torch.float64]
    # The kernels take float32 layers only: a float64 layer's place in the call is a scratch
    # buffer (the kernel still checks its rows), and its own update is applied below in float64.
    kernel_work = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) if i in wide else w
                   for i, w in enumerate(work)]
    for first in range(0, steps.size, per_batch):
        batch = steps[first : first + per_batch]
        rows = store.read(batch)
        if factors is not None:
            rows = rows._replace(scales=rows.scales * torch.from_numpy(factors[first : first + per_batch])[:, None])
        _refuse_non_finite(rows, batch, store)
        rollback.save(rows)
        ops.subtract_sparse(kernel_work, rows, store.k, names=names, steps=batch)
        if wide:
            _subtract_float64(work, wide, rows, store.k)


def _subtract_float64(work: list[torch.Tensor], layers: list[int], rows, k: list[int]) -> None:
    """work[i] −= each row's Δ for the float64 layers i: Δ = values · scale rounded to float32 as
    the kernels compute it, subtracted in float64, rows in the kernels' canonical order."""
    from ..kernels.torch_ops import canonical_order

    index, values, scales = rows
    for s in canonical_order(index, values, scales):
        decoded = ops.decode_row(ops.Row(index[s], values[s], scales[s]), k)
        for i in layers:
            positions, delta = decoded[i]
            flat = work[i].view(-1)
            flat[positions.to(flat.device)] -= delta.to(device=flat.device, dtype=torch.float64)


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
                diff[pos] = (w.view(-1)[pos] - val).to(diff.dtype)
            total += float(torch.linalg.vector_norm(diff)) ** 2
            for pos in positions:
                diff[pos] = 0.0
        return math.sqrt(total)
