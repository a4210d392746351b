"""The deletion ledger of an update store: one timeline of models and deletion requests, and
the one rule that decides which steps a model still needs subtracted.

A store's history is training segments and deletions in any order: record → forget → record
more (from the model the deletion produced) → forget again, for samples of any segment. The
ledger holds two append-only lists:

- **models**: every model a deletion may start from: the end of each training segment
  (recorder close or store.mark_final) and the result of each deletion. A model knows
  `steps` (it took the training steps [0, steps), as recorded) and `requests` (how many ledger
  records came before it: it has every deletion among them applied, as far as it reaches
  below its `steps`);
- **records**, hash-chained (each checksum covers the record and the previous checksum): a
  "deletion" per request (its caller-given or generated id, UTC time, how many keys, a keyed
  digest of them, the steps it removed that no earlier request had, the model it was applied
  to and the one it produced, method, parameters, package version); an "undo" for a deletion
  whose model was not kept (it stays listed, marked undone); a "confirm" for a pending one
  whose model was saved.

The rule: forgetting from model X (found on the list by fingerprint) subtracts every step
below X.steps that a deletion X has not seen (record index >= X.requests, not undone) removed,
plus the steps below X.steps that held the requested samples and that no deletion removed yet.
So a step is never subtracted twice from any model, a model restored from an old checkpoint
on the list catches up with every request since in one call, and a model not on the list is
refused. Forgetting a sample of segment 1 after segment 2 trained on top subtracts segment 1's
recorded updates of the steps that saw it and keeps segment 2's (which were computed from a
model that had seen it: the usual first-order approximation of amnesiac unlearning).

A deletion whose model is saved by the caller goes in two writes, so that the ledger always
describes a model that exists on disk, whenever the process stops: first a *pending* deletion,
then — once the model is saved — a confirm (or an undo if the save failed). While one is
pending, forgetting from the model it produced confirms it; forgetting from any other model on
the list undoes it (its model was presumably not saved).

Callers must hold the store's writer lock while they read the ledger, subtract and write the
ledger back (`with store.writing():`), so that two deletions cannot both start from one ledger.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from typing import NamedTuple

import numpy as np

from .errors import CorruptStoreError, ModelMismatchError, StoreError

KINDS = ("deletion", "undo", "confirm")
MADE_BY = ("training", "deletion")


class Model(NamedTuple):
    """A model a deletion may start from."""

    fingerprint: str
    steps: int  # it took the recorded training steps [0, steps)
    requests: int  # the ledger records before it (deletions among them, not undone, are applied)
    made_by: str  # "training" (a segment's end) or "deletion"
    record: int | None = None  # made_by "deletion": the index of its deletion record

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "steps": self.steps, "requests": self.requests,
                "made_by": self.made_by, "record": self.record}


class Record(NamedTuple):
    """One entry of the audit trail; see the module docstring for the kinds."""

    kind: str
    time: str | None  # UTC, ISO 8601; None for deletions made before format 4
    fields: dict  # the kind's fields (JSON values), see _check_record
    checksum: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "time": self.time, **self.fields, "checksum": self.checksum}

    @property
    def removed(self) -> np.ndarray:
        return np.asarray(self.fields.get("steps", ()), dtype=np.int64)


class Pending(NamedTuple):
    steps: np.ndarray  # int64, sorted: the steps the pending deletion removes
    fingerprint: str  # of the model it produces


class DeletionPlan(NamedTuple):
    subtract: np.ndarray  # steps to subtract from the model passed in, sorted
    new_steps: np.ndarray  # steps no earlier deletion removed, sorted
    base: "Ledger"  # the ledger as it stands for this model (a pending deletion settled)
    start: int  # the index of the model forgotten from in base.models


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:16]


class Ledger:
    """The ledger as one immutable value: `records` and `models` (tuples), plus what they imply."""

    __hash__ = None  # holds arrays

    def __init__(self, records=(), models=()):
        self.records: tuple[Record, ...] = tuple(records)
        self.models: tuple[Model, ...] = tuple(models)
        self.undone = {r.fields["of"] for r in self.records if r.kind == "undo"}
        confirmed = {r.fields["of"] for r in self.records if r.kind == "confirm"}
        self._deletions = [i for i, r in enumerate(self.records) if r.kind == "deletion" and i not in self.undone]
        open_ = [i for i in self._deletions if self.records[i].fields["pending"] and i not in confirmed]
        self._pending = open_[-1] if open_ else None
        settled = [i for i in self._deletions if i != self._pending]
        self.removed_steps = _union(self.records[i].removed for i in settled)
        self._removed_all = _union(self.records[i].removed for i in self._deletions)

    @classmethod
    def empty(cls) -> "Ledger":
        return cls()

    def __eq__(self, other) -> bool:
        return isinstance(other, Ledger) and self.to_attrs() == other.to_attrs()

    def __ne__(self, other) -> bool:
        return not self == other

    def __repr__(self) -> str:
        return f"Ledger({len(self.records)} records, {len(self.models)} models, {self.removed_steps.size} steps removed)"

    # ----------------------------------------------------------------- what it says
    @property
    def has_deletions(self) -> bool:
        """Whether any step was removed (by a deletion not undone and not pending)."""
        return bool(self.removed_steps.size)

    @property
    def deletions(self) -> list[Record]:
        """Every deletion record (undone ones included), in order."""
        return [r for r in self.records if r.kind == "deletion"]

    @property
    def pending(self) -> Pending | None:
        if self._pending is None:
            return None
        record = self.records[self._pending]
        return Pending(record.removed, record.fields["fingerprint_after"])

    @property
    def fingerprint(self) -> str | None:
        """The model the latest deletion (settled, not undone) produced, if any."""
        for i in reversed(self._deletions):
            if i != self._pending:
                return self.records[i].fields["fingerprint_after"]
        return None

    @property
    def forgotten_end(self) -> int:
        """Where the next request's IDs go in the store's forgotten_ids array."""
        return max((r.fields["ids_from"] + r.fields["keys"] for r in self.records if r.kind == "deletion"), default=0)

    def forgotten_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) in forgotten_ids of the IDs of every deletion in effect (pending included)."""
        return [(self.records[i].fields["ids_from"], self.records[i].fields["ids_from"] + self.records[i].fields["keys"])
                for i in self._deletions]

    def valid_models(self) -> list[int]:
        """Indices of the models a deletion may start from (those of undone deletions excluded)."""
        return [i for i, m in enumerate(self.models) if m.record is None or m.record not in self.undone]

    def fingerprints_on_chain(self) -> list[str]:
        return list(dict.fromkeys(self.models[i].fingerprint for i in self.valid_models()))

    def status(self, index: int) -> str:
        """A deletion record's state: "applied", "pending" or "undone"."""
        if index in self.undone:
            return "undone"
        return "pending" if index == self._pending else "applied"

    def audit(self) -> list[dict]:
        """One row per deletion request, in order, with its state ("applied", "pending",
        "undone" and why): the audit trail as `pyunlearn inspect --ledger/--json` shows it."""
        reasons = {r.fields["of"]: r.fields["reason"] for r in self.records if r.kind == "undo"}
        rows = []
        for i, record in enumerate(self.records):
            if record.kind != "deletion":
                continue
            fields = dict(record.fields)
            steps = fields.pop("steps")
            fields.pop("pending")
            rows.append({"record": i, "time": record.time, "status": self.status(i), **fields,
                         "steps_removed": len(steps), "steps": steps, "undo_reason": reasons.get(i),
                         "checksum": record.checksum})
        return rows

    def extends(self, older: "Ledger") -> bool:
        """Whether this ledger is `older` with entries appended (nothing changed or dropped)."""
        return (self.records[: len(older.records)] == older.records
                and self.models[: len(older.models)] == older.models)

    # ----------------------------------------------------------------- the rule
    def settled_for(self, model, *, now: str | None = None) -> "Ledger":
        """This ledger with its pending deletion settled: confirmed if the model (a fingerprint,
        or pyunlearn._model.Fingerprints) is the one it produced or one built on it (training
        went on from it), undone otherwise."""
        if self._pending is None:
            return self
        if self._descends_from_pending(model):
            return self.confirmed(now=now)
        return self.undo(self._pending, "its model was not saved: the next deletion started from another model",
                         now=now)

    def settled_for_training(self, model, *, now: str | None = None) -> "Ledger":
        """The same for a recorder about to continue from `model`: settled only if the model is
        the pending deletion's result (or built on it) or the model it started from."""
        if self._pending is None:
            return self
        if self._descends_from_pending(model):
            return self.confirmed(now=now)
        if _matches(model, self.records[self._pending].fields["fingerprint_before"]):
            return self.undo(self._pending, "its model was not saved: training continued from the model before it",
                             now=now)
        return self

    def _descends_from_pending(self, model) -> bool:
        record = self.records[self._pending]
        if _matches(model, record.fields["fingerprint_after"]):
            return True
        return any(m.requests > self._pending and _matches(model, m.fingerprint)
                   for i, m in enumerate(self.models) if i > record.fields["model"])

    def unseen_steps(self, requests: int, steps: int) -> np.ndarray:
        """Steps below `steps` that deletions at record index >= `requests` (not undone) removed:
        what a model that has seen `requests` records and took `steps` steps still holds."""
        unseen = _union(self.records[i].removed for i in self._deletions if i >= requests)
        return unseen[unseen < steps]

    def built_on(self, index: int) -> bool:
        """Whether a model after deletion `index`'s own was made from its result (or a later one)."""
        own = self.records[index].fields["model"]
        return any(m.requests > index for m in self.models[own + 1:])

    def model_at(self, steps: int) -> Model | None:
        """The model on the timeline after `steps` steps that has seen the most records (where
        training may continue at that step), or None."""
        found = self.latest_match(None, steps)
        return None if found is None else self.models[found]

    def plan(self, requested_steps: np.ndarray, *, model_fingerprint, where: str, now: str | None = None,
             **_ignored) -> DeletionPlan:
        """What forgetting `requested_steps` from the model subtracts, by the rule in the module
        docstring; ModelMismatchError or StoreError if it may not."""
        model = model_fingerprint
        base = self.settled_for(model, now=now)
        start = base.model_for(model, where)
        reach = base.models[start]
        new_steps = np.setdiff1d(requested_steps, base._removed_all).astype(np.int64)
        subtract = np.union1d(base.unseen_steps(reach.requests, reach.steps), new_steps[new_steps < reach.steps])
        return DeletionPlan(subtract.astype(np.int64), new_steps, base, start)

    def latest_match(self, model, steps: int | None = None) -> int | None:
        """The index of the valid model on the list with this fingerprint (any, for None) and, if
        given, these steps that has seen the most records, or None."""
        matching = [i for i in self.valid_models() if (steps is None or self.models[i].steps == steps)
                    and (model is None or _matches(model, self.models[i].fingerprint))]
        return max(matching, key=lambda i: (self.models[i].requests, i)) if matching else None

    def model_for(self, model, where: str) -> int:
        """The index of the model on the list with this fingerprint (the one that has seen the
        most requests), or ModelMismatchError / StoreError."""
        found = self.latest_match(model)
        if found is not None:
            return found
        if not self.valid_models():
            raise StoreError(f"{where} knows no model to forget from: recording did not close cleanly. Load the "
                             "trained model and call store.mark_final(model) first")
        shown = model.get() if hasattr(model, "get") else model
        known = self.fingerprints_on_chain()
        listed = ", ".join(known[-4:]) + (f" and {len(known) - 4} older" if len(known) > 4 else "")
        raise ModelMismatchError(
            f"this model ({shown}) is not on the store's timeline: neither the end of a training segment nor a "
            f"deletion's result (the store knows {listed}). Forget from one of those")

    # ----------------------------------------------------------------- new entries
    def with_deletion(self, plan: DeletionPlan, *, fingerprint_after: str, request_id: str, keys: int,
                      keys_digest: str | None, missing_keys: int, method: str, params: dict, version: str,
                      pending: bool, now: str | None = None, ids_from: int | None = None) -> "Ledger":
        """plan.base with this deletion appended: its record and the model it produced. Its
        `keys` IDs are (to be) written at [ids_from, ids_from + keys) of the store's
        forgotten_ids array (default: after every earlier request's)."""
        base = plan.base
        start = base.models[plan.start]
        index = len(base.records)
        fields = {"request": request_id, "keys": int(keys), "keys_digest": keys_digest,
                  "missing_keys": int(missing_keys), "ids_from": self.forgotten_end if ids_from is None else ids_from,
                  "steps": [int(s) for s in plan.new_steps],
                  "subtracted": int(plan.subtract.size), "from_model": plan.start,
                  "fingerprint_before": start.fingerprint, "model": len(base.models),
                  "fingerprint_after": fingerprint_after, "method": method, "params": dict(params),
                  "version": version, "pending": bool(pending)}
        record = _record("deletion", now, fields, base._last_checksum)
        made = Model(fingerprint_after, start.steps, index + 1, "deletion", index)
        return Ledger(base.records + (record,), base.models + (made,))

    def confirmed(self, *, now: str | None = None) -> "Ledger":
        """This ledger with its pending deletion confirmed (its model was saved)."""
        if self._pending is None:
            raise StoreError("the ledger has no pending deletion to confirm")
        return self._append(_record("confirm", now, {"of": self._pending}, self._last_checksum))

    def undo(self, index: int, reason: str, *, now: str | None = None) -> "Ledger":
        """This ledger with deletion `index` marked undone (its model was not kept)."""
        if index not in self._deletions:
            raise StoreError(f"ledger record {index} is not a deletion in effect; nothing to undo")
        return self._append(_record("undo", now, {"of": int(index), "reason": reason}, self._last_checksum))

    def with_training_end(self, fingerprint: str, steps: int, requests: int) -> "Ledger":
        """This ledger with a training segment's end model appended (unless it is the last one)."""
        model = Model(fingerprint, int(steps), int(requests), "training")
        if self.models and self.models[-1] == model:
            return self
        return Ledger(self.records, self.models + (model,))

    def undone_back_to(self, earlier: "Ledger", where: str, *, now: str | None = None) -> "Ledger":
        """This ledger with every deletion since `earlier` (a state it extends) undone: going back
        to an earlier state keeps the trail append-only."""
        if not self.extends(earlier):
            raise StoreError(f"{where}: the new ledger neither extends the stored one nor is an earlier state of it "
                             "(the ledger is append-only); nothing was written")
        ledger = self
        for index in range(len(earlier.records), len(self.records)):
            if index in ledger._deletions:
                if self.built_on(index):
                    raise StoreError(f"{where}: deletion request {self.records[index].fields['request']!r} can no "
                                     "longer be undone: a model was made from its result since; nothing was written")
                ledger = ledger.undo(index, "its model could not be saved", now=now)
        return ledger

    def truncated(self, step: int, where: str) -> "Ledger":
        """The ledger once steps >= `step` are dropped (training resumes from an earlier
        checkpoint): the models past it go, unless a deletion record names one or removed a step
        past it (StoreError: the ledger would no longer describe them)."""
        named = max((max(r.fields["from_model"], r.fields["model"]) for r in self.records if r.kind == "deletion"),
                    default=-1)
        if any(m.steps > step for m in self.models[: named + 1]) or (self._removed_all.size
                                                                      and self._removed_all[-1] >= step):
            raise StoreError(f"{where} has deletions recorded for models or steps past step {step}; truncating "
                             "would detach them from the models they describe")
        return Ledger(self.records, [m for i, m in enumerate(self.models) if i <= named or m.steps <= step])

    def _append(self, record: Record) -> "Ledger":
        return Ledger(self.records + (record,), self.models)

    @property
    def _last_checksum(self) -> str:
        return self.records[-1].checksum if self.records else ""

    # ----------------------------------------------------------------- on disk
    def to_attrs(self) -> dict:
        return {"records": [r.to_json() for r in self.records], "models": [m.to_json() for m in self.models]}

    @classmethod
    def from_attrs(cls, attrs, where: str) -> "Ledger":
        try:
            previous, records = "", []
            for i, document in enumerate(attrs["records"]):
                record = _record_from_json(document, i, previous)
                records.append(record)
                previous = record.checksum
            models = [_model_from_json(d, len(records)) for d in attrs["models"]]
            ledger = cls(records, models)
            for i, record in enumerate(records):
                if record.kind != "deletion":
                    if not 0 <= record.fields["of"] < i or records[record.fields["of"]].kind != "deletion":
                        raise ValueError(f"record {i} refers to record {record.fields['of']}, not an earlier deletion")
                elif not (0 <= record.fields["model"] < len(models) and models[record.fields["model"]].record == i):
                    raise ValueError(f"record {i}'s model is not on the list")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptStoreError(f"{where}: the deletion ledger in the group attributes is malformed ({exc}); "
                                    "restore the store's zarr.json from a copy") from None
        return ledger

    @classmethod
    def from_format_3(cls, attrs, *, final_fingerprint: str | None, final_steps: int | None, steps: int,
                      where: str) -> "Ledger":
        """The ledger of a store written before format 4 (the removed steps, the model they
        produced, perhaps a pending deletion), as a timeline: the final model, then one deletion
        record per entry, dated None."""
        try:
            removed = _steps(attrs["removed_steps"])
            fingerprint = attrs["fingerprint"]
            if fingerprint is not None and not isinstance(fingerprint, str):
                raise TypeError("fingerprint must be a string or null")
            pending = attrs.get("pending")
            if pending is not None and not isinstance(pending.get("fingerprint"), str):
                raise TypeError("pending.fingerprint must be a string")
            pending_steps = None if pending is None else _steps(pending["steps"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptStoreError(f"{where}: the deletion ledger in the group attributes is malformed ({exc}); "
                                    "restore the store's zarr.json from a copy") from None
        ledger = cls()
        if final_fingerprint is None:
            return ledger
        ledger = ledger.with_training_end(final_fingerprint, steps if final_steps is None else final_steps, 0)
        for new, after, is_pending in ((removed, fingerprint, False), (pending_steps, pending and pending["fingerprint"], True)):
            if new is None or after is None or (not is_pending and not new.size):
                continue
            plan = DeletionPlan(new, new, ledger, len(ledger.models) - 1)
            ledger = ledger.with_deletion(plan, fingerprint_after=after, request_id="before-format-4", keys=0,
                                          keys_digest=None, missing_keys=0, method="amnesiac", params={},
                                          version="", pending=is_pending, now="")
        return ledger


# ---------------------------------------------------------------------- records on disk
def _record(kind: str, now: str | None, fields: dict, previous: str) -> Record:
    time = utc_now() if now is None else (now or None)
    return Record(kind, time, fields, _checksum(kind, time, fields, previous))


def _checksum(kind: str, time, fields: dict, previous: str) -> str:
    text = json.dumps({"kind": kind, "time": time, **fields, "previous": previous}, sort_keys=True,
                      separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


_FIELDS = {
    "deletion": {"request": str, "keys": int, "keys_digest": (str, type(None)), "missing_keys": int,
                 "ids_from": int, "steps": list,
                 "subtracted": int, "from_model": int, "fingerprint_before": str, "model": int,
                 "fingerprint_after": str, "method": str, "params": dict, "version": str, "pending": bool},
    "undo": {"of": int, "reason": str},
    "confirm": {"of": int},
}


def _record_from_json(document: dict, index: int, previous: str) -> Record:
    kind = document["kind"]
    if kind not in KINDS:
        raise ValueError(f"record {index} has kind {kind!r}")
    time = document["time"]
    if time is not None and not isinstance(time, str):
        raise TypeError(f"record {index}'s time must be a string or null")
    fields = {}
    for name, types in _FIELDS[kind].items():
        value = document[name]
        if not isinstance(value, types) or (types is int and isinstance(value, bool)):
            raise TypeError(f"record {index}'s {name} has the wrong type")
        fields[name] = value
    if kind == "deletion":
        _steps(fields["steps"])
    if set(document) != set(fields) | {"kind", "time", "checksum"}:
        raise ValueError(f"record {index} has unknown fields {sorted(set(document) - set(fields))}")
    checksum = _checksum(kind, time, fields, previous)
    if document["checksum"] != checksum:
        raise ValueError(f"record {index} fails its checksum (the audit trail was edited or damaged)")
    return Record(kind, time, fields, checksum)


def _model_from_json(document: dict, records: int) -> Model:
    model = Model(document["fingerprint"], document["steps"], document["requests"], document["made_by"],
                  document["record"])
    if not isinstance(model.fingerprint, str) or model.made_by not in MADE_BY:
        raise TypeError("a model on the list is malformed")
    for value in (model.steps, model.requests):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TypeError("a model's steps and requests must be non-negative ints")
    if model.requests > records or (model.made_by == "deletion") != isinstance(model.record, int):
        raise ValueError("a model on the list refers to records that are not there")
    return model


def _matches(model, stored: str | None) -> bool:
    if not stored:
        return False
    return model.matches(stored) if hasattr(model, "matches") else model == stored


def _union(arrays) -> np.ndarray:
    arrays = [np.asarray(a, dtype=np.int64) for a in arrays]
    return np.unique(np.concatenate(arrays)) if arrays else np.empty(0, np.int64)


def _steps(value) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise TypeError("steps must be a list of ints")
    steps = np.asarray(value, dtype=np.int64)
    if steps.size and (np.any(np.diff(steps) <= 0) or steps[0] < 0):
        raise ValueError("steps must be sorted, unique and non-negative")
    return steps
