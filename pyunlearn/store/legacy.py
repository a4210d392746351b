"""Stores written before format 5 kept their ledger in zarr.json (format 4: a hash-chained list
of records and a list of models; formats 1–3: the removed steps and the model they produced).
This module reads that ledger, checked as those versions checked it, and converts it into
records of the audit log (pyunlearn.ledger), which a store is given the first time it is
written to (pyunlearn.store.update_store migrates it) and which read-only handles hold in memory.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from typing import NamedTuple

import numpy as np

from ..errors import CorruptStoreError
from ..ledger import ResumePoint, checked_steps, union_steps


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:16]


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


class DeletionPlan(NamedTuple):
    subtract: np.ndarray  # steps to subtract from the model passed in, sorted
    new_steps: np.ndarray  # steps no earlier deletion removed, sorted
    base: "LegacyLedger"  # the ledger as it stands for this model (a pending deletion settled)
    start: int  # the index of the model forgotten from in base.models


class LegacyLedger:
    """A format-4 ledger as it was stored: `records` and `models`, checked."""

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
        self.removed_steps = union_steps(self.records[i].removed for i in settled)
        self._removed_all = union_steps(self.records[i].removed for i in self._deletions)

    @classmethod
    def empty(cls) -> "LegacyLedger":
        return cls()

    @property
    def forgotten_end(self) -> int:
        """Where the next request's IDs go in the store's forgotten_ids array."""
        return max((r.fields["ids_from"] + r.fields["keys"] for r in self.records if r.kind == "deletion"), default=0)

    # ----------------------------------------------------------------- new entries
    def with_deletion(self, plan: DeletionPlan, *, fingerprint_after: str, request_id: str, keys: int,
                      keys_digest: str | None, missing_keys: int, method: str, params: dict, version: str,
                      pending: bool, now: str | None = None, ids_from: int | None = None) -> "LegacyLedger":
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
        return LegacyLedger(base.records + (record,), base.models + (made,))

    def with_training_end(self, fingerprint: str, steps: int, requests: int) -> "LegacyLedger":
        """This ledger with a training segment's end model appended (unless it is the last one)."""
        model = Model(fingerprint, int(steps), int(requests), "training")
        if self.models and self.models[-1] == model:
            return self
        return LegacyLedger(self.records, self.models + (model,))

    @property
    def _last_checksum(self) -> str:
        return self.records[-1].checksum if self.records else ""

    # ----------------------------------------------------------------- on disk
    @classmethod
    def from_attrs(cls, attrs, where: str) -> "LegacyLedger":
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
                      where: str) -> "LegacyLedger":
        """The ledger of a store written before format 4 (the removed steps, the model they
        produced, perhaps a pending deletion), as a timeline: the final model, then one deletion
        record per entry, dated None."""
        try:
            removed = checked_steps(attrs["removed_steps"])
            fingerprint = attrs["fingerprint"]
            if fingerprint is not None and not isinstance(fingerprint, str):
                raise TypeError("fingerprint must be a string or null")
            pending = attrs.get("pending")
            if pending is not None and not isinstance(pending.get("fingerprint"), str):
                raise TypeError("pending.fingerprint must be a string")
            pending_steps = None if pending is None else checked_steps(pending["steps"])
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
        checked_steps(fields["steps"])
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




# ---------------------------------------------------------------------------------- conversion
class Converted(NamedTuple):
    """A legacy ledger as audit-log records: (kind, time, fields) in order, with each
    deletion's range in the old forgotten_ids array (None for other kinds); and the resume point."""

    events: list[tuple[str, str | None, dict, tuple[int, int] | None]]
    point: ResumePoint | None


def read(attrs: dict, version: int, steps: int, where: str) -> Converted:
    """The ledger and resume point of the group attributes of a store of format `version` < 5
    (checked as that version was: a format-4 record whose checksum fails is CorruptStoreError)."""
    final_fingerprint, final_steps = attrs.get("fingerprint_final"), attrs.get("final_steps")
    if version >= 4:
        ledger = LegacyLedger.from_attrs(attrs["ledger"], where)
    else:
        ledger = LegacyLedger.from_format_3(attrs["ledger"], final_fingerprint=final_fingerprint,
                                            final_steps=final_steps, steps=steps, where=where)
    events, new_of_record, new_of_model = [], {}, {}
    emitted = 0  # legacy records converted so far

    def flush(upto: int) -> None:  # legacy records [emitted, upto)
        nonlocal emitted
        for i in range(emitted, upto):
            record = ledger.records[i]
            f = record.fields
            new_of_record[i] = len(events)
            if record.kind == "deletion":
                new_of_model[f["model"]] = len(events)
                fields = {"request": f["request"], "keys": f["keys"], "keys_digest": f["keys_digest"],
                          "missing": f["missing_keys"], "ids_from": f["ids_from"], "ids_digest": "",
                          "steps": list(f["steps"]), "subtracted": f["subtracted"], "from": new_of_model[f["from_model"]],
                          "fingerprint_before": f["fingerprint_before"], "fingerprint_after": f["fingerprint_after"],
                          "up_to": ledger.models[f["model"]].steps, "method": f["method"],
                          "params": {k: str(v) for k, v in f["params"].items()}, "version": f["version"],
                          "pending": f["pending"], "guard": None, "evidence": None}
                events.append(("deletion", record.time, fields, (f["ids_from"], f["ids_from"] + f["keys"])))
            else:
                reason = f["reason"] if record.kind == "undo" else "its model was saved"
                events.append((record.kind, record.time, {"of": new_of_record[f["of"]], "reason": reason}, None))
        emitted = max(emitted, upto)

    def seen(requests: int) -> int:
        flush(requests)
        return new_of_record[requests - 1] + 1 if requests else 0

    for j, model in enumerate(ledger.models):
        if model.made_by == "deletion":
            flush(model.record + 1)
        else:
            fields = {"fingerprint": model.fingerprint, "steps": model.steps, "seen": seen(model.requests)}
            new_of_model[j] = len(events)
            events.append(("segment", None, fields, None))
    flush(len(ledger.records))
    point = _point(attrs, version, ledger)
    if point is not None:
        point = ResumePoint(point.steps, point.fingerprint, seen(point.seen))
    return Converted(events, point)


def _point(attrs: dict, version: int, ledger: LegacyLedger) -> ResumePoint | None:
    """The legacy resume point, its `seen` in legacy record numbers; before format 4 a deletion
    did not move it off the final model, so it is moved here as format 4 would have."""
    d = attrs.get("resume_point")
    point = None if d is None else ResumePoint(int(d["steps"]), d["fingerprint"] or "", int(d.get("requests", 0)))
    if version >= 4 or point is None:
        return point
    for record in ledger.records:
        if record.kind == "deletion":
            start = ledger.models[record.fields["from_model"]]
            if point.fingerprint == start.fingerprint and point.steps == start.steps:
                point = ResumePoint(point.steps, record.fields["fingerprint_after"],
                                    ledger.models[record.fields["model"]].requests)
    # Before format 4 the point held no count of the requests applied to its model: take it
    # from the model of the ledger it names (a point already on a deletion's model has seen it).
    named = [m for m in ledger.models if m.fingerprint == point.fingerprint and m.steps == point.steps]
    return ResumePoint(point.steps, point.fingerprint, named[-1].requests) if named else point
