"""A store's timeline on disk: the audit log, the forgotten IDs and the removed-steps bitmap its
states digest, and the mark in the metadata (the log length the resume point reflects). The one
place that writes them, in an order that keeps them consistent wherever the process stops:

    1. a deletion's IDs are written to forgotten_ids (past the end in effect: invisible until 2)
    2. the record is created in the log (the commit: once it exists the change happened)
    3. the removed-steps bitmap is rewritten (derived: checked against the head's digest and
       rebuilt from the log when it does not match)
    4. the store commits its metadata with the new log length and resume point (derived: a
       reader moves the resume point through the records appended since, ledger.resume_after)

What each record says is pyunlearn.ledger's to decide; this module only keeps it. Stores written
before format 5 kept their ledger in zarr.json: `History.legacy` holds it converted in memory
for readers, and `migrate` writes it into the log before the first write.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from .. import ledger
from ..errors import CorruptStoreError
from ..ledger import Record, ResumePoint, Timeline
from . import legacy, zarr_io
from .audit_log import AuditKey, MemoryLog, RecordLog
from .deletion_data import BLOCK_IDS, RemovedSteps, forgotten_after_append, forgotten_after_cut, forgotten_of, \
    removed_digest


class History:
    """The timeline of one open store handle (rebuilt by the store whenever it re-reads its
    metadata). `key`: the AuditKey if at hand; the log is MAC-checked with it."""

    def __init__(self, zstore, where: str, meta, data, *, read_only: bool, key: AuditKey | None):
        self._zstore, self._where, self._data, self._read_only, self._key = zstore, where, data, read_only, key
        self._removed = RemovedSteps(zstore, read_only)
        self.meta = meta
        if meta.legacy is not None:
            self.log = self._legacy_log(meta)
            self.point = self._legacy_point
            self.timeline = Timeline(self.log, None, where)  # the removed steps from the records, in memory
        else:
            self.log = RecordLog(zstore, where, length_hint=meta.log_length, key=key,
                                 authenticated=meta.audit_key_check is not None)
            self.timeline = Timeline(self.log, self._removed_mask, where)
            self.point = meta.resume_point if len(self.log) == meta.log_length else \
                ledger.resume_after(meta.resume_point, self.log[meta.log_length:], self.timeline)

    def _removed_mask(self, steps: np.ndarray) -> np.ndarray:
        return self._removed.mask(self.timeline, steps)

    @property
    def head(self) -> str:
        return self.log.head

    # ------------------------------------------------------------------ writing
    def append(self, documents, *, forgotten_ids: np.ndarray | None = None, now: str | None = None) -> list[Record]:
        """Appends records ({"kind": ..., fields...}, in order; the caller holds the writer lock).
        A deletion's `ids_from` and `ids_digest` are filled in here, from `forgotten_ids` (its
        request's IDs, sorted and unique) written where they go."""
        written = []
        if documents and self.meta.legacy is None:
            self.log.check_writable()
        for document in documents:
            fields = dict(document)
            kind = fields.pop("kind")
            timeline = self.timeline
            state = timeline.state
            bitmap = None
            forgotten = state.forgotten
            if kind == "deletion":
                ids = np.asarray(forgotten_ids if forgotten_ids is not None else [], dtype=np.int64)
                fields["ids_from"] = forgotten.end
                fields["ids_digest"] = "sha256:" + hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()
                tail = self._data.forgotten_slice(forgotten.end // BLOCK_IDS * BLOCK_IDS, forgotten.end)
                self._data.write_forgotten(forgotten.end, ids)
                forgotten = forgotten_after_append(forgotten, tail, ids)
                bitmap = self._removed.changed(timeline, add=fields["steps"])
            elif kind == "undo":
                undone = timeline.records[fields["of"]]
                f = undone.fields
                if f["ids_from"] + f["keys"] != forgotten.end:
                    raise CorruptStoreError(f"{self._where}: deletion record {undone.index} is not the last request's "
                                            "IDs in forgotten_ids; only the latest requests can be undone")
                forgotten = forgotten_after_cut(forgotten, f["ids_from"], self._data.forgotten_slice)
                bitmap = self._removed.changed(timeline, remove=f["steps"])
            count, digest = (state.removed, state.removed_digest) if bitmap is None else removed_digest(bitmap)
            new_state = ledger.next_state(timeline, kind, fields, forgotten=forgotten, removed=count,
                                          removed_digest=digest)
            if kind == "deletion":
                self.claim_request(fields["request"], len(self.log))
            record = self.log.append(kind, fields, ledger.utc_now() if now is None else now, new_state)
            if bitmap is not None:
                self._removed.commit(bitmap, len(self.log))
            self.point = ledger.resume_after(self.point, [record], timeline)
            written.append(record)
        return written

    def check_writable(self) -> None:
        """Refuses (before anything changes) a handle that could not append to the log."""
        if self.meta.legacy is None:
            self.log.check_writable()

    # ------------------------------------------------------------------ request ids
    def request_record(self, request_id: str) -> Record | None:
        """The deletion record that used `request_id`, if one did: a marker object per request id
        (log/requests/<SHA-256 of the id>) names it, so the check costs one read however long the
        log. A marker whose record is not that request's (a crash between the two) is ignored."""
        if self.meta.legacy is not None:
            return next((r for r in self.log if r.kind == "deletion" and r.fields["request"] == request_id), None)
        data = zarr_io.get(self._zstore, _request_key(request_id))
        if data is None:
            return None
        try:
            index = int(json.loads(data)["record"])
        except (ValueError, KeyError, TypeError):
            return None
        if not 0 <= index < len(self.log):
            return None
        record = self.log[index]
        return record if record.kind == "deletion" and record.fields["request"] == request_id else None

    def claim_request(self, request_id: str, index: int) -> None:
        """Writes the marker of `request_id` for record `index` (before the record: a marker
        without its record is ignored)."""
        data = json.dumps({"request": request_id, "record": index}).encode()
        zarr_io.put(self._zstore, _request_key(request_id), data)

    def forgotten_written(self) -> np.ndarray:
        if self.meta.legacy is not None:
            return self._legacy_forgotten
        return self._data.forgotten_slice(0, self.timeline.state.forgotten.end)

    def forgotten_ids(self) -> np.ndarray:
        """The IDs of every deletion in effect, sorted and unique, checked against the head's digest."""
        state = self.timeline.state
        if self.meta.legacy is not None:
            ids = self._legacy_forgotten
        else:
            ids = self._data.forgotten_slice(0, state.forgotten.end)
            if forgotten_of(ids) != state.forgotten:
                raise CorruptStoreError(
                    f"{self._where}: forgotten_ids does not hold the IDs the audit log's requests wrote (its digest "
                    f"differs from record {len(self.log) - 1}'s): it was rewritten or copied from another store. "
                    "Restore the store from a copy; `pyunlearn audit verify` says which request's IDs differ")
        return np.unique(ids)

    # ------------------------------------------------------------------ stores of older formats
    def _legacy_log(self, meta) -> MemoryLog:
        """The converted ledger of a store before format 5, held in memory with the states its
        records would have (a reader of such a store never writes)."""
        converted = legacy.read(meta.legacy, meta.format_version, meta.committed_steps, self._where)
        self.events, self._legacy_point = converted.events, converted.point
        old_ids = self._data.legacy_forgotten(max((r[1] for *_, r in converted.events if r), default=0))
        log, ids, bitmap = MemoryLog(), [], np.zeros(0, dtype=bool)
        for kind, time, fields, ranged in converted.events:
            fields = dict(fields)
            timeline = Timeline(log, None, self._where)
            if kind == "deletion":
                request_ids = old_ids[ranged[0]:ranged[1]]
                fields["ids_from"] = sum(len(i) for i in ids)
                fields["ids_digest"] = "sha256:" + hashlib.sha256(request_ids.astype("<i8").tobytes()).hexdigest()
                ids.append(request_ids)
                steps = np.asarray(fields["steps"], dtype=np.int64)
                if steps.size:
                    bitmap = np.concatenate([bitmap, np.zeros(max(0, int(steps[-1]) + 1 - bitmap.size), dtype=bool)])
                    bitmap[steps] = True
            elif kind == "undo":
                undone = log[fields["of"]].fields
                ids.pop()  # the latest request's: undo never reaches further back
                bitmap[np.asarray(undone["steps"], dtype=np.int64)] = False
            all_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
            count, digest = removed_digest(bitmap)
            state = ledger.next_state(timeline, kind, fields, forgotten=forgotten_of(all_ids), removed=count,
                                      removed_digest=digest)
            log.append(Record(len(log), kind, time, fields, state))
        self._legacy_forgotten = np.concatenate(ids) if ids else np.empty(0, np.int64)
        return log

    def migrate(self) -> dict:
        """Writes a store of an older format's converted ledger into its log (the caller holds
        the writer lock): forgotten_ids rewritten with the requests in effect only, then each
        record. Returns the metadata changes that make the store format 5. Idempotent: records a
        crashed migration wrote are checked and kept."""
        memory = self.log
        log = RecordLog(self._zstore, self._where, key=self._key, authenticated=self._key is not None)
        migrated = Timeline(memory)
        self._data.write_forgotten(0, self._legacy_forgotten)
        bitmap = np.zeros(0, dtype=bool)
        for record in memory:
            if record.index < len(log):
                if (log[record.index].kind, log[record.index].fields) != (record.kind, record.fields):
                    raise CorruptStoreError(f"{self._where}: its audit log holds records that are not this store's "
                                            "ledger (a migration from format 4 met another store's log)")
                continue
            log.append(record.kind, record.fields, record.time, record.state)
        steps = migrated.steps_removed(pending=True)
        if steps.size:
            bitmap = np.zeros(int(steps[-1]) + 1, dtype=bool)
            bitmap[steps] = True
        self._removed.commit(bitmap, len(log))
        self.log = log
        self.timeline = Timeline(self.log, self._removed_mask, self._where)
        return {"log_length": len(log), "resume_point": self._legacy_point, "legacy": None}


def _request_key(request_id: str) -> str:
    return f"log/requests/{hashlib.sha256(request_id.encode()).hexdigest()}.json"


__all__ = ["History", "ResumePoint"]
