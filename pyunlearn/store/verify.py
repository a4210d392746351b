"""An auditor's check of a whole store (`pyunlearn audit verify STORE`): everything a forget
checks of what it reads, for all of it, and what only the whole can show.

    log       every record parses, its hash is its body's, it links to the one before, and —
              with the audit key — its MAC verifies; no record after a MAC'ed one lacks one
    head      given a head kept outside the store ("<records>:<hash>"), the log still holds
              that record with that hash: the log was not rolled back or rewritten since
    states    replaying the timeline's rules (pyunlearn.ledger.next_state) over the records gives
              each record's state: pending, final model, truncation reach, removed steps
    forgotten each request in effect wrote exactly the IDs its record's digest names, and the
              array matches the head's digest (nothing rewritten, nothing copied in)
    data      every step's row and sample IDs match their place-bound digests, every run of the
              ID index its own: no shard swapped, moved or copied from another store

Each check gives a Finding; the store is sound when none failed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from .. import ledger
from ..errors import PyunlearnError
from ..ledger import Timeline
from .audit_log import RecordLog, sha256
from .deletion_data import forgotten_of, removed_digest


@dataclass(frozen=True)
class Finding:
    check: str  # "log", "head", "states", "forgotten", "data"
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAILED':<7} {self.check:<10} {self.detail}"


def verify(store, *, head: str | None = None, chain_only: bool = False) -> list[Finding]:
    """Every check of the module docstring on `store` (an UpdateStore, opened with its secret or
    audit key for the MACs to be checked). An authenticated log whose MACs cannot be checked (no
    key at hand) fails the log check: a hash chain alone is what anyone who can write the store
    can rebuild. chain_only=True accepts it, saying so (an auditor without the key, knowingly)."""
    findings = []
    log = store.ledger.records
    findings.append(_log(store, log, chain_only))
    if head is not None:
        findings.append(_head(store, log, head))
    if findings[0].ok:
        findings.append(_states(store, log))
        findings.append(_forgotten(store))
    findings.append(_data(store))
    return findings


def _log(store, log, chain_only: bool = False) -> Finding:
    if not isinstance(log, RecordLog):
        return Finding("log", True, f"{len(log)} records converted in memory from a store of format "
                                    f"{store.metadata.format_version} (its own checks passed); no MACs")
    previous, macs, first_mac = "", 0, None
    try:
        for index in range(len(log)):
            raw = log.raw(index)
            body, proof = raw.split(b"\n")[0], json.loads(raw.split(b"\n")[1])
            if proof["hash"] != sha256(body):
                return Finding("log", False, f"record {index} fails its hash: its body was edited")
            document = json.loads(body)
            if document.get("previous") != previous:
                return Finding("log", False, f"record {index} does not follow record {index - 1}: a record was "
                                             "replaced, removed or reordered")
            if proof["mac"] is not None:
                macs += 1
                first_mac = index if first_mac is None else first_mac
            elif first_mac is not None or store.metadata.audit_key_check is not None:
                return Finding("log", False, f"record {index} carries no MAC though the log is authenticated: it was "
                                             "written without the audit key")
            log[index]  # parsed and, where the key is at hand, MAC-checked by the log itself
            previous = proof["hash"]
    except (PyunlearnError, ValueError, KeyError, IndexError) as exc:
        return Finding("log", False, str(exc))
    authenticated = store.metadata.audit_key_check is not None
    checked = log.checks_macs and authenticated
    if macs and not checked and not chain_only:
        return Finding("log", False, f"{len(log)} records, chained, but their MACs were not checked: without the "
                                     "secret (PYUNLEARN_SECRET[_FILE]) or the audit key, anyone who can write the store "
                                     "could have rebuilt this chain. Give the key, or pass --chain-only to accept the "
                                     "chain alone")
    how = ("MACs checked with the audit key" if checked else
           "MACs present but NOT checked (--chain-only): the chain alone proves no authorship" if macs else
           "no MACs: this store's log is hash-chained only (create it with secret= or audit_key= to authenticate it)")
    return Finding("log", True, f"{len(log)} records, chained; {how}")


def _head(store, log, head: str) -> Finding:
    count, _, digest = head.partition(":")
    if not count.isdigit() or (int(count) and not digest.startswith("sha256:")):
        return Finding("head", False, f"{head!r} is not a head (\"<records>:sha256:<hex>\", as a forget returned it)")
    n = int(count)
    if n > len(log):
        return Finding("head", False, f"the log holds {len(log)} records, fewer than the {n} of the head kept: it was "
                                      f"rolled back (records {len(log)}..{n - 1} are gone)")
    if n and log.hash_of(n - 1) != digest:
        return Finding("head", False, f"record {n - 1} is not the one the head kept names: the log was rewritten")
    return Finding("head", True, f"record {n - 1} is the head kept; {len(log) - n} records since")


def _states(store, log) -> Finding:
    replay: list = []
    bitmap = np.zeros(0, dtype=bool)
    undone: set[int] = set()
    for record in log:
        f = record.fields
        if record.kind == "deletion":
            steps = np.asarray(f["steps"], dtype=np.int64)
            if steps.size:
                bitmap = np.concatenate([bitmap, np.zeros(max(0, int(steps[-1]) + 1 - bitmap.size), dtype=bool)])
                bitmap[steps] = True
        elif record.kind == "undo":
            undone.add(f["of"])
            bitmap[np.asarray(log[f["of"]].fields["steps"], dtype=np.int64)] = False
        count, digest = removed_digest(bitmap)
        expected = ledger.next_state(Timeline(replay), record.kind, f, forgotten=record.state.forgotten,
                                     removed=count, removed_digest=digest)
        if expected != record.state:
            return Finding("states", False, f"record {record.index}'s state is not what the records before it imply "
                                            f"({_differences(expected, record.state)})")
        replay.append(record)
    return Finding("states", True, f"{len(log)} states follow from the records ({int(bitmap.sum())} steps removed)")


def _differences(a, b) -> str:
    return ", ".join(f"{k}: {getattr(b, k)!r} where {getattr(a, k)!r} follows"
                     for k in ("removed", "removed_digest", "pending", "segment", "reach") if getattr(a, k) != getattr(b, k))


def _forgotten(store) -> Finding:
    timeline = store.ledger
    state = timeline.state
    try:
        ids = store.forgotten_written()
    except PyunlearnError as exc:
        return Finding("forgotten", False, str(exc))
    undone = {r.fields["of"] for r in timeline.records if r.kind == "undo"}
    for record in timeline.deletions:
        if record.index in undone or not record.fields["ids_digest"]:
            continue
        f = record.fields
        written = ids[f["ids_from"]:f["ids_from"] + f["keys"]]
        if "sha256:" + hashlib.sha256(written.astype("<i8").tobytes()).hexdigest() != f["ids_digest"]:
            return Finding("forgotten", False, f"the IDs of request {f['request']!r} (record {record.index}) in the "
                                               "forgotten IDs are not the ones its record names: the array was "
                                               "rewritten or copied from another store")
    if forgotten_of(ids) != state.forgotten:
        return Finding("forgotten", False, "the forgotten IDs do not match the head's digest")
    return Finding("forgotten", True, f"{state.forgotten.end} IDs of {len(timeline.deletions) - len(undone)} requests "
                                      "in effect, each as its record names")


def _data(store) -> Finding:
    meta = store.metadata
    if meta.digests_from is None:
        return Finding("data", True, "no place-bound digests (a store of an older format): checksums only")
    steps = np.arange(meta.digests_from, store.steps)
    try:
        for first in range(0, steps.size, 1024):
            batch = steps[first:first + 1024]
            store.read(batch)  # rows: checked against their digests as they are read
            store.step_ids(batch)  # sample IDs likewise
        store.lookup(np.array([0], dtype=np.int64))  # every run of the ID index: opened and checked
        for run in meta.lookup_runs:
            store.check_run(run)
    except PyunlearnError as exc:
        return Finding("data", False, str(exc))
    first = "no steps yet" if meta.digests_from >= store.steps else f"steps {meta.digests_from}..{store.steps - 1}"
    before = f" (steps before {meta.digests_from} were written by an older version: checksums only)" \
        if meta.digests_from else ""
    return Finding("data", True, f"{first} and {len(meta.lookup_runs)} index runs match their place-bound digests "
                                 f"(store {meta.store_id}){before}")


__all__ = ["Finding", "verify"]
