"""The timeline of an update store and every rule about it. Pure: no I/O.

A store's history is training segments and deletion requests in any order: record → forget →
record more (from the model the deletion produced) → forget again, for samples of any segment.
It is kept as an append-only log of records (pyunlearn/store/audit_log.py writes and reads it;
docs/format.md specifies it). A record may make a *model*, one a deletion may start from and
training may go on from, known by its fingerprint:

    segment    a training segment ended (the recorder closed, or store.mark_final): its model
               took the recorded steps [0, steps) and has the deletions its start model had
    deletion   a request: its keys' digest, the steps it removed that no earlier request had,
               the model it started from and the one it produced (made here)
    catch-up   a model brought up to date with the deletions it had not had (made here)
    confirm    a pending deletion settled: its model was saved, or a later request applied it
    undo       a deletion whose model was not kept: its steps count as not removed, its IDs as
               not forgotten, and its model is refused
    truncate   steps >= `step` were dropped (training resumed from an earlier checkpoint):
               the models past that step are refused

A model has *seen* the records before `seen`: every deletion among them (not undone) is applied
to it as far as it reaches below its `steps`. The rule of forgetting: a forget from model X
subtracts the steps below X.steps that deletions at or after X.seen removed, and the requested
samples' steps below X.steps that no deletion removed yet. So a step is never subtracted twice
from any model, a model restored from an old checkpoint catches up with every request since in
one call, and a model not on the timeline is refused.

Every question about the timeline is answered here, as one verdict its caller acts on:

    plan_forget(timeline, model, steps)        what a forget from this model subtracts, what it settles
    continue_training(timeline, point, ...)    whether training may go on from this model
    segment_end(timeline, point, ...)          whether a model may be marked as a segment's end
    resume_after(point, records)               where training goes on once records are appended
    truncation(timeline, point, step)          whether steps >= step may be dropped
    undo_back_to(timeline, point, records)     the undo records that go back to an earlier head

The timeline itself (`Timeline`) is a read-only view: the records (a sequence the store reads
lazily), the head state after the last one, and a lookup of the removed steps the store keeps
beside the log. Records are checked values (`Record.parse`); their bytes and authentication are
the log's business.
"""
from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import ModelMismatchError, ResumeRefused, StoreError

KINDS = ("segment", "deletion", "catch-up", "confirm", "undo", "truncate")
EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # of no bytes
MAKES_A_MODEL = {"segment": "training", "deletion": "deletion", "catch-up": "catch-up"}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:16]


# ---------------------------------------------------------------------------------- values
@dataclass(frozen=True)
class Model:
    """A model on the timeline, known by the record that made it."""

    record: int  # the index of the record that made it
    fingerprint: str
    steps: int  # it took the recorded training steps [0, steps)
    seen: int  # the records before this index are applied to it (their deletions, below its steps)
    made_by: str  # "training" (a segment's end), "deletion" or "catch-up"

    @property
    def requests(self) -> int:  # the name of earlier versions
        return self.seen

    def to_json(self) -> dict:
        return {"record": self.record, "fingerprint": self.fingerprint, "steps": self.steps, "seen": self.seen,
                "made_by": self.made_by}


@dataclass(frozen=True)
class Forgotten:
    """forgotten_ids[0:end] are the IDs of every deletion in effect; `chain` hashes its whole
    blocks and `digest` all of it (docs/format.md: the forgotten-ID digest)."""

    end: int = 0
    chain: str = ""
    digest: str = EMPTY_DIGEST


@dataclass(frozen=True)
class State:
    """The timeline after a record: what every later question needs without reading the log
    again (its size does not grow with the number of records)."""

    records: int = 0  # how many records there are
    forgotten: Forgotten = field(default_factory=Forgotten)
    removed: int = 0  # how many steps deletions in effect removed (pending included)
    removed_digest: str = EMPTY_DIGEST  # of the removed-step bitmap (docs/format.md)
    pending: int | None = None  # the record of the pending deletion, if one is
    segment: int | None = None  # the record of the latest segment's end (the store's final model)
    reach: int = 0  # no truncation below this step: a deletion in effect names a model or a step there

    def to_json(self) -> dict:
        return {"records": self.records, "forgotten": {"end": self.forgotten.end, "chain": self.forgotten.chain,
                                                       "digest": self.forgotten.digest},
                "removed": self.removed, "removed_digest": self.removed_digest, "pending": self.pending,
                "segment": self.segment, "reach": self.reach}

    @classmethod
    def from_json(cls, d) -> "State":
        f = d["forgotten"]
        state = cls(records=_count(d["records"]), forgotten=Forgotten(_count(f["end"]), _text(f["chain"]),
                                                                      _text(f["digest"])),
                    removed=_count(d["removed"]), removed_digest=_text(d["removed_digest"]),
                    pending=_optional_count(d["pending"]), segment=_optional_count(d["segment"]),
                    reach=_count(d["reach"]))
        if set(d) != set(state.to_json()):
            raise ValueError(f"state has unknown fields {sorted(set(d) - set(state.to_json()))}")
        return state


# The fields of each kind: name → type (int, str, list of ints, dict of str, bool, or optional).
_FIELDS = {
    "segment": {"fingerprint": str, "steps": int, "seen": int},
    "deletion": {"request": str, "keys": int, "keys_digest": (str, type(None)), "missing": int, "ids_from": int,
                 "ids_digest": str, "steps": list, "subtracted": int, "from": int, "fingerprint_before": str,
                 "fingerprint_after": str, "up_to": int, "method": str, "params": dict, "version": str,
                 "pending": bool, "guard": (dict, type(None)), "evidence": (dict, type(None))},
    "catch-up": {"subtracted": int, "from": int, "fingerprint_before": str, "fingerprint_after": str, "up_to": int,
                 "version": str},
    "confirm": {"of": int, "reason": str},
    "undo": {"of": int, "reason": str},
    "truncate": {"step": int},
}


@dataclass(frozen=True)
class Record:
    """One record of the log, checked (see the module docstring for the kinds)."""

    index: int
    kind: str
    time: str | None  # UTC, ISO 8601; None for records carried over from format 4 without one
    fields: dict
    state: State  # the timeline after this record

    @property
    def model(self) -> Model | None:
        """The model this record made, if it made one."""
        f = self.fields
        if self.kind == "segment":
            return Model(self.index, f["fingerprint"], f["steps"], f["seen"], "training")
        if self.kind in ("deletion", "catch-up"):
            return Model(self.index, f["fingerprint_after"], f["up_to"], self.index + 1, MAKES_A_MODEL[self.kind])
        return None

    @property
    def removed(self) -> np.ndarray:
        """The steps a deletion removed (that no earlier one had), sorted; empty otherwise."""
        return np.asarray(self.fields.get("steps", ()) if self.kind == "deletion" else (), dtype=np.int64)

    def to_json(self) -> dict:
        return {"index": self.index, "kind": self.kind, "time": self.time, **self.fields, "state": self.state.to_json()}

    @classmethod
    def parse(cls, document: dict, index: int) -> "Record":
        """A record from its JSON document, checked: ValueError or TypeError naming what is wrong."""
        kind = document.get("kind")
        if kind not in KINDS:
            raise ValueError(f"record {index} has kind {kind!r}")
        if document.get("index") != index:
            raise ValueError(f"record {index} says it is record {document.get('index')!r}")
        time = document.get("time")
        if time is not None and not isinstance(time, str):
            raise TypeError(f"record {index}'s time must be a string or null")
        fields = {}
        for name, types in _FIELDS[kind].items():
            if name not in document:
                raise ValueError(f"record {index} lacks {name!r}")
            value = document[name]
            if not isinstance(value, types) or (types is int and (isinstance(value, bool) or value < 0)):
                raise TypeError(f"record {index}'s {name} has the wrong type or sign: {value!r}")
            fields[name] = value
        known = set(fields) | {"index", "kind", "time", "state"}
        if set(document) != known:
            raise ValueError(f"record {index} has unknown fields {sorted(set(document) - known)}")
        if kind == "deletion":
            checked_steps(fields["steps"])
            for name in ("params", "guard", "evidence"):
                if fields[name] is not None and not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in fields[name].items()):
                    raise TypeError(f"record {index}'s {name} must map names to strings")
        if "of" in fields and fields["of"] >= index:
            raise ValueError(f"record {index} refers to record {fields['of']}, not an earlier one")
        if "from" in fields and fields["from"] >= index:
            raise ValueError(f"record {index} starts from record {fields['from']}, not an earlier one")
        state = State.from_json(document["state"])
        if state.records != index + 1:
            raise ValueError(f"record {index}'s state counts {state.records} records")
        return cls(index, kind, time, fields, state)


@dataclass(frozen=True)
class ResumePoint:
    """The model training may go on from: the one after `steps` committed steps, with
    fingerprint "" when chosen by hand (after a truncate: the recorder accepts the model it is
    given); `seen` as for a Model. Kept in the store's metadata with the log length it reflects."""

    steps: int
    fingerprint: str
    seen: int = 0

    @property
    def requests(self) -> int:  # the name of earlier versions
        return self.seen


# ---------------------------------------------------------------------------------- the view
class Timeline:
    """The log as the rules read it: `records` (a sequence: len, index, slice; the store reads
    them lazily), and `removed(steps)` → a bool mask of the steps deletions in effect removed
    (pending included), which the store keeps beside the log so that a forget need not read it."""

    def __init__(self, records: Sequence[Record], removed: Callable[[np.ndarray], np.ndarray] | None = None,
                 where: str = "the store"):
        self.records, self.where = records, where
        self._removed = removed

    @property
    def state(self) -> State:
        return self.records[-1].state if len(self.records) else State()

    def __len__(self) -> int:
        return len(self.records)

    def removed_mask(self, steps: np.ndarray) -> np.ndarray:
        if self._removed is not None:
            return self._removed(steps)
        return np.isin(steps, self.steps_removed(pending=True))

    # ------------------------------------------------------------------ reading backwards
    def newest_first(self, stop: int = 0) -> Iterable[Record]:
        """The records from the newest back to index `stop`, read in batches that grow (4, 16,
        64, 256): the model a forget starts from is nearly always among the newest, so a search
        reads a few records however long the log is."""
        end, batch = len(self.records), 4
        while end > stop:
            start = max(stop, end - batch)
            yield from reversed(self.records[start:end])
            end, batch = start, min(batch * 4, 256)

    def find_model(self, model, steps: int | None = None) -> Model | None:
        """The newest model on the timeline (not undone, not past a truncate) whose fingerprint
        matches `model` (a fingerprint, or pyunlearn.kernels.Fingerprints; None: any) and, if
        given, whose steps are `steps`."""
        undone, cut = set(), None
        for record in self.newest_first():
            if record.kind == "undo":
                undone.add(record.fields["of"])
            elif record.kind == "truncate":
                cut = record.fields["step"] if cut is None else min(cut, record.fields["step"])
            made = record.model
            if made is None or record.index in undone or (cut is not None and made.steps > cut):
                continue
            if (steps is None or made.steps == steps) and (model is None or _matches(model, made.fingerprint)):
                return made
        return None

    def deletions_since(self, seen: int) -> list[Record]:
        """The deletions in effect (not undone) at or after record `seen`, pending included."""
        later = list(self.records[seen:]) if seen < len(self.records) else []
        undone = {r.fields["of"] for r in later if r.kind == "undo"}
        if any(of < seen for of in undone):  # an undo of an older deletion: find it among all
            undone |= {r.fields["of"] for r in self.records[:seen] if r.kind == "undo"}
        return [r for r in later if r.kind == "deletion" and r.index not in undone]

    def unseen_steps(self, seen: int, steps: int) -> np.ndarray:
        """The steps below `steps` that deletions at or after record `seen` (in effect) removed:
        what a model that has seen `seen` records and took `steps` steps still holds."""
        unseen = union_steps(r.removed for r in self.deletions_since(seen))
        return unseen[unseen < steps]

    # ------------------------------------------------------------------ the whole log (audits)
    def _undone(self) -> set[int]:
        return {r.fields["of"] for r in self.records if r.kind == "undo"}

    @property
    def removed_steps(self) -> np.ndarray:
        """Every step deletions in effect removed (sorted), a pending one's not."""
        return self.steps_removed(pending=False)

    def steps_removed(self, *, pending: bool) -> np.ndarray:
        """Every step deletions in effect removed (sorted), the pending one's if asked."""
        undone, p = self._undone(), self.state.pending
        return union_steps(r.removed for r in self.records if r.kind == "deletion" and r.index not in undone
                      and (pending or r.index != p))

    @property
    def models(self) -> list[Model]:
        return [r.model for r in self.records if r.model is not None]

    @property
    def deletions(self) -> list[Record]:
        """Every deletion record (undone ones included), in order."""
        return [r for r in self.records if r.kind == "deletion"]

    @property
    def has_deletions(self) -> bool:
        return bool(self.state.removed)

    @property
    def pending(self) -> Record | None:
        p = self.state.pending
        return None if p is None else self.records[p]

    @property
    def fingerprint(self) -> str | None:
        """The model the latest deletion in effect (not pending) produced, if any."""
        undone, p = None, self.state.pending
        for record in self.newest_first():
            if record.kind == "deletion" and record.index != p:
                undone = undone if undone is not None else self._undone()
                if record.index not in undone:
                    return record.fields["fingerprint_after"]
        return None

    def status(self, index: int) -> str:
        """A deletion's state: "applied", "not-found" (none of its keys was used by a recorded
        step), "pending" or "undone"."""
        record = self.records[index]
        if record.kind != "deletion":
            raise ValueError(f"record {index} is a {record.kind}, not a deletion")
        if index in self._undone():
            return "undone"
        if index == self.state.pending:
            return "pending"
        return "not-found" if record.fields["keys"] and record.fields["missing"] == record.fields["keys"] else "applied"

    def audit(self) -> list[dict]:
        """One row per deletion request, in order, with its status and why it was settled: the
        audit trail as `pyunlearn inspect --ledger/--json` shows it."""
        settled = {r.fields["of"]: (r.kind, r.fields["reason"]) for r in self.records if r.kind in ("undo", "confirm")}
        rows = []
        for record in self.deletions:
            fields = dict(record.fields)
            steps = fields.pop("steps")
            fields.pop("pending")
            how = settled.get(record.index)
            rows.append({"record": record.index, "time": record.time, "status": self.status(record.index), **fields,
                         "steps_removed": len(steps), "steps": steps,
                         "undo_reason": how[1] if how and how[0] == "undo" else None,
                         "confirmed": how[1] if how and how[0] == "confirm" else None})
        return rows


# ---------------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class ForgetPlan:
    """What a forget from `start` does: subtract `subtract` (sorted), whose `new_steps` no
    deletion removed yet; first append `settle` (a confirm of the pending deletion, if any)."""

    start: Model
    subtract: np.ndarray
    new_steps: np.ndarray
    settle: tuple[dict, ...] = ()  # {"kind": ..., fields...} records to append before the deletion


def plan_forget(timeline: Timeline, model, requested_steps: np.ndarray) -> ForgetPlan:
    """What forgetting `requested_steps` from `model` subtracts (the rule in the module
    docstring). A pending deletion is never undone here: forgetting from its model confirms it,
    and forgetting from a model before it applies its steps too (and confirms it so). Refused
    (ModelMismatchError, StoreError) when the model is not on the timeline."""
    start = timeline.find_model(model)
    if start is None:
        raise _not_on_timeline(timeline, model)
    settle = ()
    pending = timeline.state.pending
    if pending is not None:
        reason = "its model was forgotten from" if start.record == pending else \
            "applied by the next forget, which started from an earlier model"
        settle = ({"kind": "confirm", "of": pending, "reason": reason},)
    requested = np.unique(np.asarray(requested_steps, dtype=np.int64))
    new_steps = requested[~timeline.removed_mask(requested)] if requested.size else requested
    subtract = np.union1d(timeline.unseen_steps(start.seen, start.steps), new_steps[new_steps < start.steps])
    return ForgetPlan(start, subtract.astype(np.int64), new_steps.astype(np.int64), settle)


@dataclass(frozen=True)
class Verdict:
    """An answer to "may this happen?": `allowed`, else `refusal` (the error to raise); and
    what to write when it may: `settle` (records to append first) and `point` (the resume point
    to record, or None for no change)."""

    allowed: bool
    refusal: Exception | None = None
    settle: tuple[dict, ...] = ()
    point: ResumePoint | None = None


def continue_training(timeline: Timeline, point: ResumePoint | None, *, committed_steps: int,
                      initial_fingerprint: str, model) -> Verdict:
    """Whether training may go on from `model` (a fingerprint or Fingerprints), the store
    holding `committed_steps` steps whose resume point is `point`. Allowed: from the model the
    steps end with (the resume point, or the final model of a store without one), or from a
    model of the timeline at that step (an older checkpoint brought up to date). Refused: any
    other model, and a model that still holds steps a deletion removed (training on would keep
    the deleted samples' updates). A pending deletion whose model this is, is confirmed."""
    n, settle = committed_steps, ()
    pending = timeline.state.pending
    if pending is not None and _descends_from_pending(timeline, model, pending):
        settle = ({"kind": "confirm", "of": pending, "reason": "training went on from its model"},)
    if n == 0:
        if _matches(model, initial_fingerprint):
            return Verdict(True, settle=settle)
        return Verdict(False, _refused(timeline.where, n, point, None, ": the store is empty, and this is not the "
                                       "model it was created for"))
    final = timeline.records[timeline.state.segment].model if timeline.state.segment is not None else None
    accepted = None
    if point is not None and point.steps == n and (point.fingerprint == "" or _matches(model, point.fingerprint)):
        accepted = point
    elif point is None and final is not None and final.steps == n and _matches(model, final.fingerprint):
        accepted = ResumePoint(n, final.fingerprint, final.seen)
    else:
        found = timeline.find_model(model, steps=n)
        if found is not None:  # a model of the timeline at this step, e.g. an older checkpoint caught up
            fingerprint = model.get(like=found.fingerprint) if hasattr(model, "get") else model
            accepted = ResumePoint(n, fingerprint, found.seen)
    if accepted is None:
        return Verdict(False, _refused(timeline.where, n, point, final, None))
    behind = timeline.unseen_steps(accepted.seen, n)
    if pending is not None and not settle and pending >= accepted.seen:
        behind = np.union1d(behind, timeline.records[pending].removed[timeline.records[pending].removed < n])
    if behind.size:
        return Verdict(False, ResumeRefused(
            f"{timeline.where}: deletion requests came in after this model was made, and it still holds "
            f"{behind.size} of the steps they removed; training must not go on from it. Bring it up to date "
            "first: pyunlearn.amnesiac_forget(model, store, []) (then resume from the model it returns)"))
    return Verdict(True, settle=settle, point=accepted if accepted != point else None)


def segment_end(timeline: Timeline, point: ResumePoint | None, *, committed_steps: int, fingerprint: str) -> Verdict:
    """Whether the model with `fingerprint` may be marked as the end of the training segment
    that committed `committed_steps` steps (a segment record, and the resume point). Refused
    when the store knows the model after those steps and this is another one: a later forget
    would subtract steps that model never took, or miss ones it did."""
    n = committed_steps
    if point is not None and point.steps == n and point.fingerprint and point.fingerprint != fingerprint:
        return Verdict(False, ModelMismatchError(
            f"{timeline.where}: its {n} steps end with model {point.fingerprint} (the resume point a recorder flush "
            f"or close recorded), not with this model ({fingerprint}): it cannot be marked as their end. Mark the "
            "model training ended with (after truncate(step) if training went on from an earlier checkpoint)"))
    found = timeline.find_model(fingerprint, steps=n)
    seen = found.seen if found is not None else (point.seen if point is not None else 0)
    new_point = ResumePoint(n, fingerprint, seen)
    last = timeline.records[timeline.state.segment].model if timeline.state.segment is not None else None
    if last is not None and (last.fingerprint, last.steps, last.seen) == (fingerprint, n, seen) and \
            last.record == len(timeline) - 1:
        return Verdict(True, point=new_point)  # already the last record
    return Verdict(True, settle=({"kind": "segment", "fingerprint": fingerprint, "steps": n, "seen": seen},),
                   point=new_point)


def resume_after(point: ResumePoint | None, records: Iterable[Record], timeline: Timeline | None = None
                 ) -> ResumePoint | None:
    """Where training goes on once `records` are appended: a deletion or catch-up made from
    the model training would go on from moves the point to the model it produced (the old one
    holds the deleted samples' updates); a segment's end is the point; undoing a deletion
    whose model is the point moves it back to the model the deletion started from."""
    for record in records:
        if point is None and record.kind != "segment":
            continue
        made = record.model
        if record.kind == "segment":
            point = ResumePoint(made.steps, made.fingerprint, made.seen)
        elif made is not None:
            start_fingerprint = record.fields["fingerprint_before"]
            if point.fingerprint == start_fingerprint and point.steps == made.steps:
                point = ResumePoint(point.steps, made.fingerprint, made.seen)
        elif record.kind == "undo" and timeline is not None:
            undone = timeline.records[record.fields["of"]]
            if point.fingerprint == undone.fields["fingerprint_after"]:
                start = timeline.records[undone.fields["from"]].model
                point = ResumePoint(point.steps, undone.fields["fingerprint_before"],
                                    start.seen if start is not None else 0)
        elif record.kind == "truncate" and point.steps > record.fields["step"]:
            point = ResumePoint(record.fields["step"], "", point.seen)
    return point


def truncation(timeline: Timeline, point: ResumePoint | None, step: int) -> Verdict:
    """Whether steps >= `step` may be dropped, and the resume point after: refused where a
    deletion in effect removed a step at or past it or names a model past it (the log would no
    longer describe them). The point becomes the timeline's model at `step` with the most
    deletions applied, else the old point if it is at `step`, else "chosen by hand"."""
    if timeline.state.reach > step:
        return Verdict(False, StoreError(
            f"{timeline.where} has deletions recorded for models or steps past step {step}; truncating would "
            "detach them from the models they describe"))
    found = timeline.find_model(None, steps=step)
    if found is not None:
        new_point = ResumePoint(step, found.fingerprint, found.seen)
    elif point is not None and point.steps == step:
        new_point = point
    else:
        new_point = ResumePoint(step, "", point.seen if point is not None else 0)
    return Verdict(True, settle=({"kind": "truncate", "step": int(step)},), point=new_point)


def undo_back_to(timeline: Timeline, point: ResumePoint | None, records: int, reason: str) -> Verdict:
    """The undo records that take the timeline back to its first `records` records (a
    deletion whose model could not be saved): every deletion in effect since is undone (they
    stay listed). Refused where a model that has one of them applied was made since (a later
    forget or catch-up, a training segment), or training went on from its model."""
    later = timeline.deletions_since(records)
    settle = []
    for record in later:
        index, request = record.index, record.fields["request"]
        if any(r.model is not None and r.model.seen > index for r in timeline.records[index + 1:]):
            return Verdict(False, StoreError(
                f"{timeline.where}: deletion request {request!r} can no longer be undone: a model that has it "
                "applied was made since (a later forget, catch-up or training segment); nothing was written"))
        if point is not None and point.seen > index and point.steps > record.fields["up_to"]:
            return Verdict(False, StoreError(
                f"{timeline.where}: deletion request {request!r} can no longer be undone: training went on from its "
                "model since; nothing was written"))
        settle.append({"kind": "undo", "of": index, "reason": reason})
    return Verdict(True, settle=tuple(settle))


# ---------------------------------------------------------------------------------- state
def next_state(timeline: Timeline, kind: str, fields: dict, *, forgotten: Forgotten, removed: int,
               removed_digest: str) -> State:
    """The state after appending a record of `kind` with `fields` to `timeline`; the store
    gives what it computed from its arrays: the forgotten IDs' digest and the removed steps'
    count and digest after the record."""
    state, n = timeline.state, len(timeline)
    pending, segment, reach = state.pending, state.segment, state.reach
    if kind == "deletion":
        pending = n if fields["pending"] else pending
        reach = max(reach, fields["up_to"], (fields["steps"][-1] + 1) if fields["steps"] else 0)
    elif kind == "catch-up":
        reach = max(reach, fields["up_to"])
    elif kind == "segment":
        segment = n
    elif kind in ("confirm", "undo") and fields["of"] == pending:
        pending = None
    elif kind == "truncate" and segment is not None and timeline.records[segment].fields["steps"] > fields["step"]:
        segment = None
    if kind == "undo":  # the deletions still in effect say how far truncation is refused
        undone = {fields["of"]}
        reach = 0
        for record in timeline.records:
            if record.kind == "undo":
                undone.add(record.fields["of"])
        for record in timeline.records:
            if record.kind in ("deletion", "catch-up") and record.index not in undone:
                steps = record.fields.get("steps") or []
                reach = max(reach, record.fields["up_to"], steps[-1] + 1 if steps else 0)
    return State(records=n + 1, forgotten=forgotten, removed=removed, removed_digest=removed_digest,
                 pending=pending, segment=segment, reach=reach)


# ---------------------------------------------------------------------------------- helpers
def _descends_from_pending(timeline: Timeline, model, pending: int) -> bool:
    record = timeline.records[pending]
    if _matches(model, record.fields["fingerprint_after"]):
        return True
    return any(r.model is not None and r.model.seen > pending and _matches(model, r.model.fingerprint)
               for r in timeline.records[pending + 1:])


def _not_on_timeline(timeline: Timeline, model) -> Exception:
    known = []
    for record in timeline.newest_first():
        if record.model is not None and record.model.fingerprint not in known:
            known.append(record.model.fingerprint)
            if len(known) == 4:
                break
    if not known:
        return StoreError(f"{timeline.where} knows no model to forget from: recording did not close cleanly. Load "
                          "the trained model and call store.mark_final(model) first")
    shown = model.get() if hasattr(model, "get") else model
    return ModelMismatchError(
        f"this model ({shown}) is not on the store's timeline: neither the end of a training segment nor a "
        f"deletion's result (the newest it knows: {', '.join(known)}). Forget from one of those")


def _refused(where: str, n: int, point: ResumePoint | None, final: Model | None, known: str | None) -> ResumeRefused:
    if known is None:
        if point is not None and point.steps == n or final is not None and final.steps == n:
            known = ""
        elif point is not None:
            known = (f" (the last model it knows is the one after step {point.steps}; the steps after it were "
                     "written by a run that neither flushed nor closed its recorder)")
        else:
            known = " (it knows no model to continue from: the run that wrote it neither flushed nor closed its recorder)"
    return ResumeRefused(
        f"{where} already holds {n} steps, and this model is not the one they end with{known}. Is training "
        "resuming from an earlier checkpoint? This step did not run. Load the recorder state saved with that "
        "checkpoint: rec.load_state_dict(ckpt[\"recorder\"]) (or UpdateRecorder(..., state=ckpt[\"recorder\"])), "
        "which drops the store's steps after the checkpoint's. Without a saved state: store.truncate(step) with "
        "the checkpoint's step (the later steps belong to the abandoned run), then step again")


def _matches(model, stored: str | None) -> bool:
    if not stored:
        return False
    return model.matches(stored) if hasattr(model, "matches") else model == stored


def union_steps(arrays) -> np.ndarray:
    """The sorted union of arrays of step numbers."""
    arrays = [np.asarray(a, dtype=np.int64) for a in arrays]
    return np.unique(np.concatenate(arrays)) if arrays else np.empty(0, np.int64)


def checked_steps(value) -> np.ndarray:
    """A JSON list of step numbers as int64, checked: ints, sorted, unique, non-negative."""
    if not isinstance(value, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise TypeError("steps must be a list of ints")
    steps = np.asarray(value, dtype=np.int64)
    if steps.size and (np.any(np.diff(steps) <= 0) or steps[0] < 0):
        raise ValueError("steps must be sorted, unique and non-negative")
    return steps


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative int, got {value!r}")
    return value


def _optional_count(value) -> int | None:
    return None if value is None else _count(value)


def _text(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


__all__ = ["Model", "Record", "State", "Forgotten", "ResumePoint", "Timeline", "ForgetPlan", "Verdict", "plan_forget",
           "continue_training", "segment_end", "resume_after", "truncation", "undo_back_to", "next_state", "KINDS",
           "utc_now", "new_request_id"]
