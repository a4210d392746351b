"""UpdateStore: the pruned update of every optimizer step of one model, by sample ID, in a Zarr v3
group (docs/format.md). The facade users see: the metadata is metadata.py's value, the arrays
arrays.py's, the chunk being filled chunk_buffer.py's, the ID index id_index.py's, the timeline
(audit log, forgotten IDs, resume point) history.py's and its rules pyunlearn.ledger's, keys
pyunlearn.keys', the writer lock lock.py's. Data is written before what makes it visible: rows
before the counts, a deletion's IDs before its log record."""
from __future__ import annotations

import threading
import uuid
from contextlib import contextmanager

import numpy as np
import torch
import zarr

from .. import ledger
from .._validate import int_in_range
from ..errors import CorruptStoreError, KeyMappingError, StoreAccessError, StoreError, StoreNotFoundError
from ..kernels import Fingerprints, Row, fingerprint
from ..keys import CANONICAL, KeyHasher, StoreKeys, as_ids, mapped, resolve_audit_key
from ..ledger import Record, ResumePoint
from .arrays import StoreArrays, create_digest_array, create_group, save_attributes
from .audit_log import AuditKey
from .chunk_buffer import ChunkBuffer
from .history import History
from .id_index import IdLookup, StepLookup
from .layers import match_layers, trainable_parameters
from .location import zarr_store
from .lock import WriterLock
from .metadata import DEFAULT_COMPRESSION, FORMAT_VERSION, StoreMetadata, check_row
from .stats import StoreStats

__all__ = ["UpdateStore"]


class UpdateStore:
    """Pruned per-step updates of one model, indexed by sample ID. Make one with
    `UpdateStore.create(path, model, keep=0.01)`; reopen it with `UpdateStore.open(path)`."""

    def __init__(self, zstore, where: str, *, read_only: bool, secret=None, audit_key=None):
        self._zstore, self._where, self._read_only = zstore, where, read_only
        self._keys = StoreKeys(secret, audit_key)
        self._lock = WriterLock(zstore, where)
        self._buffer: ChunkBuffer | None = None  # the chunk being filled, from the first append on
        self._mutex = threading.RLock()  # the recorder's writer thread appends while training flushes
        self._owner: str | None = None  # who holds this handle's write session ("recording", "forgetting")
        self.refresh()

    # ----------------------------------------------------------------- making and opening
    @classmethod
    def create(cls, path, model, keep: float = 0.01, value_dtype: str = "float16", *,
               attribution: str = "update", steps_per_chunk: int | None = None, overwrite: bool = False,
               compression: str = DEFAULT_COMPRESSION, storage_options=None, secret=None,
               audit_key=None) -> "UpdateStore":
        """A new, empty store for `model`'s trainable parameters, opened for writing; k_i = ceil(keep ·
        numel_i), at least 1. attribution: "update" (each step's Δθ) or "gradient" (its batch gradient
        and hyper-parameters: pyunlearn.attribution). compression: blosc '<compressor>:<level>'.
        secret: makes this a store of keys (str/bytes/UUID, mapped to IDs with it; pyunlearn.keys),
        whose audit log is authenticated with a key derived from it. audit_key: for a store of
        integer IDs, the key that authenticates its audit log (default PYUNLEARN_AUDIT_KEY[_FILE];
        without one the log is hash-chained only). Neither is kept in the store: only check values."""
        meta = StoreMetadata.new(trainable_parameters(model), keep=keep, value_dtype=value_dtype,
                                 attribution=attribution, steps_per_chunk=steps_per_chunk, compression=compression)
        if secret is not None:
            hasher = KeyHasher.resolve(secret)
            meta = meta.replace(key_check=hasher.check, key_mapping=CANONICAL, audit_key_check=hasher.audit_key().check)
        else:
            raw = resolve_audit_key(audit_key)
            if raw is not None:
                meta = meta.replace(audit_key_check=AuditKey(raw).check)
        zstore, where = zarr_store(path, storage_options, read_only=False)
        create_group(zstore, where, meta, overwrite=overwrite)
        store = cls(zstore, where, read_only=False, secret=secret, audit_key=audit_key)
        store._lock.acquire()
        return store

    @classmethod
    def open(cls, path, *, mode: str = "a", storage_options=None, secret=None, audit_key=None) -> "UpdateStore":
        """Opens an existing store. mode 'a' (default) may write (the writer lock is taken at the
        first change, so readers never block the recorder); 'r' only reads. secret, audit_key: as
        in create (needed to record a deletion on a store of keys, or on a store whose log is
        authenticated)."""
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' (read) or 'a' (read and write), got {mode!r}")
        zstore, where = zarr_store(path, storage_options, read_only=mode == "r")
        return cls(zstore, where, read_only=mode == "r", secret=secret, audit_key=audit_key)

    @staticmethod
    def break_lock(path, *, storage_options=None, force: bool = False) -> bool:
        """Removes a dead writer's lock; returns whether there was one. A live holder on this host is
        refused unless force=True; one on another host cannot be checked: be sure it stopped."""
        zstore, where = zarr_store(path, storage_options, read_only=False)
        return WriterLock.break_lock(zstore, where, force=force)

    def refresh(self, *, reopen: bool = False) -> None:
        """Re-reads the metadata: a reader sees what a writer committed since. reopen: open the
        arrays and the log anew even if the metadata is the one this handle holds (after a
        conversion added an array)."""
        try:
            group = zarr.open_group(self._zstore, mode="r" if self._read_only else "r+", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreNotFoundError(f"no update store at {self._where}: create one with UpdateStore.create") from exc
        except PermissionError as exc:
            raise StoreAccessError(f"{self._where}: permission denied reading the store ({exc.filename or exc}): "
                                   "give this user read access (and write access to change it)") from exc
        except ValueError as exc:  # zarr.json is not JSON: empty, cut short, overwritten
            raise CorruptStoreError(f"{self._where}: its zarr.json is not valid JSON ({exc}): it is empty or was cut "
                                    "short. Restore zarr.json from a copy") from exc
        meta = StoreMetadata.from_attrs(dict(group.attrs), self._where)
        if reopen or meta != getattr(self, "_meta", None):  # else nothing was committed since: the open arrays serve
            self._data = StoreArrays(self._zstore, group, meta, self._where)
            self._ids = IdLookup(group, meta, self._data)
            self._history = History(self._zstore, self._where, meta, self._data, read_only=self._read_only,
                                    key=self._audit_key(meta))
        self._group, self._meta = group, meta

    def _audit_key(self, meta: StoreMetadata) -> AuditKey | None:
        key = self._keys.audit_key(meta)
        if key is not None and meta.audit_key_check is not None and key.check != meta.audit_key_check:
            raise KeyMappingError(f"the audit key given is not the one {self._where}'s audit log is authenticated with: "
                                  "use the store's audit key (or secret)")
        return key if meta.audit_key_check is not None or meta.legacy is not None else None

    # ----------------------------------------------------------------- facts
    path = property(lambda self: self._where)
    metadata = property(lambda self: self._meta, doc="The store's metadata (a frozen StoreMetadata).")
    layers = property(lambda self: list(self._meta.layers))
    k = property(lambda self: [layer.k for layer in self._meta.layers])
    keep = property(lambda self: self._meta.keep)
    value_dtype = property(lambda self: self._meta.value_dtype)
    attribution = property(lambda self: self._meta.attribution)
    optimizer_family = property(lambda self: self._meta.optimizer, doc="Gradient stores: the family's name.")
    row_length = property(lambda self: self._meta.row_length)
    steps_per_chunk = property(lambda self: self._meta.steps_per_chunk)
    steps = property(lambda self: self._meta.committed_steps, doc="Committed steps (appended rows count once flushed).")
    samples = property(lambda self: self._meta.committed_samples)
    initial_fingerprint = property(lambda self: self._meta.fingerprint_initial)
    keys = property(lambda self: self._keys, doc="How keys map to IDs here (pyunlearn.keys.StoreKeys).")
    ledger = property(lambda self: self._history.timeline,
                      doc="The timeline and its audit trail (pyunlearn.ledger.Timeline: records, models, audit()).")
    resume_point = property(lambda self: self._history.point,
                            doc="The model training may go on from (pyunlearn.ledger.ResumePoint), or None.")
    head = property(lambda self: self._history.head,
                    doc="The audit log's head, \"<records>:<hash>\": keep it outside the store to detect a rollback.")

    @property
    def final_model(self):
        """The model the last training segment ended with (a pyunlearn.ledger.Model), if the store
        holds no steps past it."""
        segment = self.ledger.state.segment
        model = None if segment is None else self.ledger.records[segment].model
        return model if model is not None and model.steps == self.steps else None

    final_fingerprint = property(lambda self: None if self.final_model is None else self.final_model.fingerprint,
                                 doc="Of the last segment's end model (None while steps go past it).")
    final_steps = property(lambda self: None if self.final_model is None else self.final_model.steps,
                           doc="How many steps the final model took.")

    def check_model(self, model) -> list[torch.nn.Parameter]:  # in the store's layer order, or ModelMismatchError
        return match_layers(model, self.layers, self._where)

    # ----------------------------------------------------------------- write sessions
    @contextmanager
    def writing(self, owner: str | None = None):
        """A write session: takes the writer lock (StoreLockedError if another writer holds it) and
        re-reads the store, so changes extend the latest commit; then flushes, releases what it took.
        `owner` names what holds the session ("recording", "forgetting"): a session of one owner
        refuses another's inside it (forgetting through a handle a recorder writes, say)."""
        if owner is not None and self._owner not in (None, owner):
            raise StoreError(f"{self._where} is held for {self._owner} through this handle: close that first "
                             "(rec.close() for a recorder), then go on from the model it leaves")
        took = self._take_lock()
        outer, self._owner = self._owner, owner or self._owner
        try:
            yield self
        except BaseException:
            self._owner = outer
            if took:  # the session's own error is the one to report, not a failing flush
                try:
                    self.flush()
                except Exception:  # noqa: BLE001
                    pass
                finally:
                    self._lock.release()
            raise
        self._owner = outer
        if took:
            self.release()

    @contextmanager
    def held_for(self, owner: str):
        """Keeps this handle's write session for `owner` until the block ends (the recorder, for
        as long as it records); see writing()."""
        with self.writing(owner):
            yield self

    def _take_lock(self) -> bool:
        if self._read_only:
            raise StoreError(f"{self._where} was opened read-only (mode='r'); open it with mode='a' to change it")
        if self._lock.held:
            return False
        self._lock.acquire()
        try:
            self.refresh()  # another writer may have committed since this handle read the metadata
            if self._meta.legacy is not None:
                self._convert()
        except BaseException:
            self._lock.release()
            raise
        self._buffer = None
        return True

    def _convert(self) -> None:
        """A store of an older format, converted at its first write: its ledger into the audit log,
        then its metadata to format 5 (docs/format.md: converting a store)."""
        meta = self._meta
        key = self._audit_key(meta)
        changes = self._history.migrate()
        changes.update(format_version=FORMAT_VERSION, store_id=meta.store_id or uuid.uuid4().hex,
                       digests_from=meta.committed_steps,
                       key_mapping=1 if meta.keyed else None, audit_key_check=None if key is None else key.check)
        new = meta.replace(**changes)
        create_digest_array(self._group, new)
        self._commit_meta(new)
        self.refresh(reopen=True)  # the arrays (step_digests is new) and the log as written

    # ----------------------------------------------------------------- appending steps
    def append(self, row: Row, ids, hyper: tuple[float, ...] | None = None) -> None:
        """Adds one step: its pruned row (as prune_topk returns it) and the sample IDs of its
        batch (may be empty); for gradient attribution also `hyper`, the step's values of its
        optimizer family's columns. Durable after flush() or once its chunk fills."""
        with self._mutex:
            self._take_lock()
            fields = check_row(self._meta, row, hyper)
            if self._buffer is None:
                self._buffer = ChunkBuffer(self._meta, self._data.read)
            # Sorted within the step: lookups do not care about order, and sorted IDs compress better.
            self._buffer.add(fields, np.sort(as_ids(ids, allow_empty=True)))
            if self._buffer.full:
                try:
                    self._write_buffer()
                except BaseException:
                    self._buffer.drop_last()
                    raise
                self._buffer = None

    def _write_buffer(self) -> None:
        new = self._buffer.write(self._data.arrays, self._zstore, self._where)  # data, then its ID index run, then the counts
        runs, obsolete = self._ids.after_commit(new.committed_steps, new.committed_samples)
        self._commit(committed_steps=new.committed_steps, committed_samples=new.committed_samples, lookup_runs=runs)
        self._buffer.committed(new)
        self._ids.drop(obsolete)

    def _commit(self, **changes) -> None:
        # The whole metadata in one write (zarr's attrs.update() writes once per key: a crash
        # between two of those writes left committed_steps and committed_samples disagreeing).
        # The timeline's mark goes with every commit: the log length and the resume point as of it.
        history = self._history
        changes.setdefault("log_length", len(history.log))
        changes.setdefault("resume_point", history.point)
        self._commit_meta(self._meta.replace(**changes))

    def _commit_meta(self, meta: StoreMetadata) -> None:
        self._group = save_attributes(self._zstore, self._group, meta.to_checked_attrs())
        old, self._meta = self._meta, meta
        # The ID index changes only with the steps (or the store's identity): a commit of the
        # timeline alone keeps the index it had, and its scans (a forget rebuilt them every time).
        if (old.committed_steps, old.committed_samples, old.lookup_from, old.lookup_runs, old.digests_from) != \
                (meta.committed_steps, meta.committed_samples, meta.lookup_from, meta.lookup_runs, meta.digests_from):
            self._ids = IdLookup(self._group, meta, self._data)
        self._history.meta = meta
        self._history.point = meta.resume_point

    def flush(self) -> None:
        """Makes every appended step durable and visible to readers. Safe from another thread while
        a recorder writes, but only for rows it appended (`recorder.flush()` writes the rest)."""
        with self._mutex:
            if self._buffer is not None and self._buffer.has_new_rows:
                self._take_lock()
                self._write_buffer()

    # ----------------------------------------------------------------- the timeline
    def record(self, documents, *, forgotten_ids=None, now: str | None = None) -> list[Record]:
        """Appends timeline records ({"kind": ..., fields...}, as pyunlearn.ledger's verdicts
        give them) to the audit log and commits the metadata's mark. A deletion's IDs (sorted,
        unique) go to `forgotten_ids`. Runs in a write session."""
        with self._mutex, self.writing():
            records = self._history.append(documents, forgotten_ids=forgotten_ids, now=now)
            if records:
                self._commit()
            return records

    def check_can_record(self) -> None:
        """KeyMappingError, before anything changes, if this handle cannot append to the store's
        audit log (it is authenticated and the handle lacks the secret or audit key)."""
        self._history.check_writable()

    def request_record(self, request_id: str) -> Record | None:
        """The deletion record that used `request_id`, if one did."""
        return self._history.request_record(request_id)

    def _apply(self, verdict: ledger.Verdict) -> None:
        """Raises a refusal, or writes what an allowed verdict says (records, the resume point)."""
        if not verdict.allowed:
            raise verdict.refusal
        if verdict.settle:
            self._history.append(verdict.settle)
        if verdict.settle or verdict.point is not None:
            self._commit(**({} if verdict.point is None else {"resume_point": verdict.point}))

    def continue_training(self, model) -> None:
        """Whether training may go on from `model` (its parameters, or pyunlearn.kernels.Fingerprints
        of them) after the committed steps (pyunlearn.ledger.continue_training): ResumeRefused
        if not; else the resume point and a pending deletion it settles are recorded."""
        with self._mutex, self.writing():
            self.flush()
            fingerprints = model if isinstance(model, Fingerprints) else Fingerprints(model)
            self._apply(ledger.continue_training(self.ledger, self._history.point, committed_steps=self.steps,
                                                 initial_fingerprint=self.initial_fingerprint, model=fingerprints))

    def truncate(self, step: int) -> None:
        """Drops steps >= step (to resume training from a checkpoint taken at `step`); refused where
        a deletion reaches past it (pyunlearn.ledger.truncation)."""
        with self._mutex, self.writing():
            self.flush()
            step = int_in_range("step", step, 0, self.steps)
            verdict = ledger.truncation(self.ledger, self._history.point, step)
            if not verdict.allowed:
                raise verdict.refusal
            start, runs, obsolete = self._ids.after_truncate(step)
            samples = int(self._data.read("offsets", slice(step, step + 1))[0])
            self._history.append(verdict.settle)
            self._commit(committed_steps=step, committed_samples=samples, lookup_from=start, lookup_runs=runs,
                         resume_point=verdict.point)
            self._ids.drop(obsolete)
            self._buffer = None

    def mark_final(self, model, *, owner: str = "finishing") -> None:
        """Records `model` as the model these steps produced (the recorder does on close; call it after
        recovering an interrupted run): a segment's end on the timeline, and the resume point.
        Refused (ModelMismatchError) when the store knows another model after these steps, and
        (StoreError) while a recorder records through this handle. `owner`: the write session the
        call belongs to (the recorder passes "recording")."""
        with self._mutex, self.writing(owner):
            self.flush()
            self._apply(ledger.segment_end(self.ledger, self._history.point, committed_steps=self.steps,
                                           fingerprint=fingerprint(self.check_model(model))))

    def mark_resume_point(self, model, *, steps: int | None = None) -> None:
        """Flushes and records `model` as the model after the committed steps, the one a recorder may
        continue from (recorder.flush() does this); `steps`, if given, must be the count after it."""
        with self._mutex, self.writing():
            self.flush()
            if steps is not None and steps != self.steps:
                raise StoreError(f"{self._where} holds {self.steps} committed steps, not {steps}: the model "
                                 "cannot be marked as the one after them")
            value = fingerprint(self.check_model(model))
            found = self.ledger.find_model(value, steps=self.steps)
            point = self._history.point
            seen = found.seen if found is not None else (point.seen if point is not None else 0)
            if point != ResumePoint(self.steps, value, seen):
                self._commit(resume_point=ResumePoint(self.steps, value, seen))

    def confirm(self, record: int, reason: str = "its model was saved") -> None:
        """Settles pending deletion `record`: its model exists (pyunlearn forget saved it)."""
        with self._mutex, self.writing():
            if self.ledger.state.pending != record:
                raise StoreError(f"{self._where}: record {record} is not the pending deletion "
                                 f"(that is {self.ledger.state.pending}); nothing to confirm")
            self.record([{"kind": "confirm", "of": int(record), "reason": reason}])

    def undo(self, record: int, reason: str = "its model could not be saved") -> None:
        """Undoes deletion `record` and every deletion after it (their models were not kept): they
        stay listed, marked undone; refused where a model that has one applied was made since."""
        with self._mutex, self.writing():
            verdict = ledger.undo_back_to(self.ledger, self._history.point, int(record), reason)
            if not verdict.allowed:
                raise verdict.refusal
            self._history.append(tuple(reversed(verdict.settle)))  # the latest first: each is then the last
            self._commit()

    def set_optimizer_family(self, name: str) -> None:
        """Gradient stores: the optimizer family (pyunlearn.attribution) of the vectors; set once."""
        if self._meta.optimizer not in (None, name):
            raise StoreError(f"{self._where} was recorded with a {self._meta.optimizer} optimizer, not {name}")
        if self._meta.optimizer is None:
            self._take_lock()
            self._commit(optimizer=name)

    # ----------------------------------------------------------------- keys and IDs
    def ids_for(self, values, arg: str = "ids", *, allow_empty: bool = False):
        """`values` as this store's sample IDs: keys (str/bytes/UUID) mapped with its secret on a
        store of keys (returned as keys.MappedIds, which the store also accepts where it takes
        keys), int64 IDs on a store of integer IDs. Integers on a store of keys, and keys on a
        store of integers, are refused (pyunlearn.keys)."""
        ids = self._keys.ids(values, self._meta, self._where, arg, allow_empty=allow_empty)
        return mapped(ids, self._meta.key_check) if self._meta.keyed else ids

    def register_keys(self) -> None:
        """Makes an empty store of integer IDs a store of keys, mapped with the secret at hand
        (the recorder calls it when the first batch of keys comes): records the secret's check
        value and authenticates the audit log with it."""
        with self._mutex, self.writing():
            if self._meta.keyed:
                return
            if self.steps:
                raise TypeError(f"{self._where} recorded its samples by integer ID; keys cannot be recorded into it")
            hasher = self._keys.hasher(CANONICAL)
            if hasher is None:
                raise KeyMappingError(f"keys need {self._where}'s secret to be mapped to sample IDs: pass secret= to "
                                      "UpdateStore.create/open, or set PYUNLEARN_SECRET or PYUNLEARN_SECRET_FILE")
            self._commit(key_check=hasher.check, key_mapping=CANONICAL, audit_key_check=hasher.audit_key().check)
            self._history = History(self._zstore, self._where, self._meta, self._data, read_only=False,
                                    key=self._audit_key(self._meta))

    def forgotten_ids(self) -> np.ndarray:
        """The IDs of every deletion request in effect (sorted): training must not use them again.
        Checked against the audit log (a forgotten_ids rewritten or copied from elsewhere is refused)."""
        return self._history.forgotten_ids()

    def forgotten_written(self) -> np.ndarray:
        """The forgotten IDs as the requests in effect wrote them, in order (for audits: each
        request's are at its record's [ids_from, ids_from + keys))."""
        return self._history.forgotten_written()

    def check_run(self, run) -> None:
        """Reads a run of the ID index whole, checked against its digests (for audits)."""
        self._ids.read_run(run)

    # ----------------------------------------------------------------- ending
    def release(self) -> None:  # flushes and gives up the lock; the next change takes it again (and re-reads)
        try:
            self.flush()
        finally:
            self._lock.release()

    def close(self) -> None:
        """Flushes (if written) and releases the writer lock."""
        if self._read_only:
            return self._lock.release()
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------- reading
    def steps_for(self, ids) -> StepLookup:
        """The committed steps whose batches held any of `ids`, and the IDs never seen."""
        return self.lookup(self.ids_for(ids))

    def lookup(self, ids: np.ndarray) -> StepLookup:
        """steps_for for IDs already mapped (ids_for's result): a request maps its keys once."""
        return self._ids.steps_for(np.asarray(ids, dtype=np.int64))

    def read(self, steps) -> Row:
        """The stored rows of `steps` (in the order given), reading only the chunks they lie in;
        each checked against its place-bound digest (CorruptStoreError for a moved shard)."""
        return self._data.rows(self._committed_steps(steps))

    def step_ids(self, steps) -> list[np.ndarray]:
        """The sample IDs each of `steps` trained on (sorted within a step), in the order given:
        the batch composition `pyunlearn.unlearn.repair` replays."""
        return self._data.step_ids(self._committed_steps(steps))

    def _committed_steps(self, steps) -> np.ndarray:
        steps = as_ids(steps, "steps", allow_empty=True)
        if steps.size and (steps.min() < 0 or steps.max() >= self.steps):
            raise ValueError(f"steps must lie in [0, {self.steps}) (the committed steps)")
        return steps

    def read_step_hyper(self, steps: int) -> np.ndarray:
        """Steps [0, steps)' hyper-parameters: a gradient store's family columns, or an update store's lr."""
        if not self._meta.records_hyper:
            raise StoreError(f"{self._where} records no step hyper-parameters (an update store before format 4)")
        return self._data.read("step_hyper", slice(0, steps))

    def stats(self) -> StoreStats:
        return StoreStats.measure(self._meta, self._data.bytes_stored())

    def __repr__(self) -> str:
        return (f"UpdateStore({self._where!r}, steps={self.steps}, layers={len(self.layers)}, "
                f"keep={self.keep}, value_dtype={self.value_dtype!r})")

