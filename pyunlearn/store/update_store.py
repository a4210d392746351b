"""UpdateStore: the pruned update of every optimizer step of one model, by sample ID, in a Zarr v3
group (docs/format.md). The facade users see; the format is in _format.py, the arrays in _arrays.py,
the chunk being filled in _buffer.py, the ID index in _lookup.py, the ledger in ledger.py, keys in
keys.py, the writer lock in _lock.py. Data is written before the counts that make it visible."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import torch
import zarr

from .._validate import int_in_range
from ..errors import StoreError, StoreNotFoundError
from ..kernels import Row, fingerprint
from ..keys import StoreKeys, as_ids
from ..ledger import Ledger
from .arrays import StoreArrays, create_group, save_attributes
from .chunk_buffer import ChunkBuffer
from .id_index import IdLookup, StepLookup, delete_runs, runs_after_commit, runs_after_truncate
from .layers import match_layers, trainable_parameters
from .location import zarr_store
from .lock import WriterLock
from .metadata import DEFAULT_COMPRESSION, FORMAT_VERSION, Layer, StoreMetadata, check_row
from .stats import StoreStats

__all__ = ["UpdateStore"]


class UpdateStore:
    """Pruned per-step updates of one model, indexed by sample ID. Make one with
    `UpdateStore.create(path, model, keep=0.01)`; reopen it with `UpdateStore.open(path)`."""

    def __init__(self, zstore, where: str, *, read_only: bool, secret=None):
        self._zstore, self._where, self._read_only, self._keys = zstore, where, read_only, StoreKeys(secret)
        self._lock = WriterLock(zstore, where)
        self._buffer: ChunkBuffer | None = None  # the chunk being filled, from the first append on
        self._mutex = threading.RLock()  # the recorder's writer thread appends while training flushes
        self.recorder = None  # the UpdateRecorder recording through this handle, if one is
        self.refresh()

    # ----------------------------------------------------------------- making and opening
    @classmethod
    def create(cls, path, model, keep: float = 0.01, value_dtype: str = "float16", *,
               attribution: str = "update", steps_per_chunk: int | None = None, overwrite: bool = False,
               compression: str = DEFAULT_COMPRESSION, storage_options=None, secret=None) -> "UpdateStore":
        """A new, empty store for `model`'s trainable parameters, opened for writing; k_i = ceil(keep ·
        numel_i), at least 1. attribution: "update" (each step's Δθ) or "gradient" (its batch gradient
        and hyper-parameters: pyunlearn.attribution). compression: blosc '<compressor>:<level>'.
        secret: maps str/bytes/UUID keys to IDs (pyunlearn.keys; default PYUNLEARN_SECRET[_FILE])."""
        meta = StoreMetadata.new(trainable_parameters(model), keep=keep, value_dtype=value_dtype,
                                 attribution=attribution, steps_per_chunk=steps_per_chunk, compression=compression)
        zstore, where = zarr_store(path, storage_options, read_only=False)
        create_group(zstore, where, meta, overwrite=overwrite)
        store = cls(zstore, where, read_only=False, secret=secret)
        store._lock.acquire()
        return store

    @classmethod
    def open(cls, path, *, mode: str = "a", storage_options=None, secret=None) -> "UpdateStore":
        """Opens an existing store. mode 'a' (default) may write (the writer lock is taken at the
        first change, so readers never block the recorder); 'r' only reads. secret: as in create."""
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' (read) or 'a' (read and write), got {mode!r}")
        zstore, where = zarr_store(path, storage_options, read_only=mode == "r")
        return cls(zstore, where, read_only=mode == "r", secret=secret)

    @staticmethod
    def break_lock(path, *, storage_options=None, force: bool = False) -> bool:
        """Removes a dead writer's lock; returns whether there was one. A live holder on this host is
        refused unless force=True; one on another host cannot be checked: be sure it stopped."""
        zstore, where = zarr_store(path, storage_options, read_only=False)
        return WriterLock.break_lock(zstore, where, force=force)

    def refresh(self) -> None:
        """Re-reads the metadata: a reader sees what a writer committed since."""
        try:
            group = zarr.open_group(self._zstore, mode="r" if self._read_only else "r+", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreNotFoundError(f"no update store at {self._where}: create one with UpdateStore.create") from exc
        meta = StoreMetadata.from_attrs(dict(group.attrs), self._where)
        if meta != getattr(self, "_meta", None):  # else nothing was committed since: the open arrays serve
            self._data = StoreArrays(self._zstore, group, meta, self._where)
            self._ids = IdLookup(group, meta, self._data)
        self._group, self._meta = group, meta

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
    final_fingerprint = property(lambda self: self._meta.fingerprint_final, doc="Of the last segment's end model.")
    final_steps = property(lambda self: self._meta.final_steps, doc="How many steps the final model took.")
    ledger = property(lambda self: self._meta.ledger, doc="The deletion ledger (pyunlearn.ledger.Ledger).")
    keys = property(lambda self: self._keys, doc="How keys map to IDs here (pyunlearn.keys.StoreKeys).")

    def check_model(self, model) -> list[torch.nn.Parameter]:  # in the store's layer order, or ModelMismatchError
        return match_layers(model, self.layers, self._where)

    # ----------------------------------------------------------------- writing
    @contextmanager
    def writing(self):
        """A write session: takes the writer lock (StoreLockedError if another writer holds it) and
        re-reads the store, so changes extend the latest commit; then flushes, releases what it took."""
        took = self._take_lock()
        try:
            yield self
        except BaseException:
            if took:  # the session's own error is the one to report, not a failing flush
                try:
                    self.flush()
                except Exception:  # noqa: BLE001
                    pass
                finally:
                    self._lock.release()
            raise
        if took:
            self.release()

    def _take_lock(self) -> bool:
        if self._read_only:
            raise StoreError(f"{self._where} was opened read-only (mode='r'); open it with mode='a' to change it")
        if self._lock.held:
            return False
        self._lock.acquire()
        self.refresh()  # another writer may have committed since this handle read the metadata
        self._buffer = None
        return True

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
        runs, obsolete = runs_after_commit(self._group, self._meta, new.committed_steps, new.committed_samples,
                                           self._ids)
        self._commit(**self._meta.new_steps(new.committed_steps, new.committed_samples, runs))
        self._buffer.committed(new)
        delete_runs(self._group, obsolete)

    def _commit(self, **changes) -> None:
        # The whole metadata in one write (zarr's attrs.update() writes once per key: a crash
        # between two of those writes left committed_steps and committed_samples disagreeing).
        meta = self._meta.replace(format_version=FORMAT_VERSION, **changes)
        self._group = save_attributes(self._zstore, self._group, meta.to_checked_attrs())
        self._meta = meta
        self._ids = IdLookup(self._group, meta, self._data)

    def flush(self) -> None:
        """Makes every appended step durable and visible to readers. Safe from another thread while
        a recorder writes, but only for rows it appended (`recorder.flush()` writes the rest)."""
        with self._mutex:
            if self._buffer is not None and self._buffer.has_new_rows:
                self._take_lock()
                self._write_buffer()

    def truncate(self, step: int) -> None:
        """Drops steps >= step (to resume training from a checkpoint taken at `step`); where training
        may go on from then: StoreMetadata.resume_after_truncate."""
        with self._mutex:
            self._take_lock()
            self.flush()
            step = int_in_range("step", step, 0, self.steps)
            changes = self._meta.truncated(step, int(self._data.read("offsets", slice(step, step + 1))[0]), self._where)
            start, runs, obsolete = runs_after_truncate(self._group, self._meta, step, self._ids)
            self._commit(**changes, lookup_from=start, lookup_runs=runs)
            delete_runs(self._group, obsolete)
            self._buffer = None

    def mark_final(self, model) -> None:
        """Records `model` as the model these steps produced (the recorder does on close; call it after
        recovering an interrupted run): the resume point, and a model on the deletion timeline."""
        if self.recorder is not None:
            raise StoreError(f"a recorder is recording into {self._where}: rec.close() marks the final model")
        with self._mutex:
            self._take_lock()
            self.flush()
            self._commit(**self._meta.final_model(fingerprint(self.check_model(model))))

    def mark_resume_point(self, model, *, steps: int | None = None) -> None:
        """Flushes and records `model` as the model after the committed steps, the one a recorder may
        continue from (recorder.flush() does this); `steps`, if given, must be the count after it."""
        with self._mutex:
            self._take_lock()
            self.flush()
            if steps is not None and steps != self.steps:
                raise StoreError(f"{self._where} holds {self.steps} committed steps, not {steps}: the model "
                                 "cannot be marked as the one after them")
            self._commit(resume_point=self._meta.resume_at(self.steps, fingerprint(self.check_model(model))))

    def set_optimizer_family(self, name: str) -> None:
        """Gradient stores: the optimizer family (pyunlearn.attribution) of the vectors; set once."""
        if self._meta.optimizer not in (None, name):
            raise StoreError(f"{self._where} was recorded with a {self._meta.optimizer} optimizer, not {name}")
        if self._meta.optimizer is None:
            self._take_lock()
            self._commit(optimizer=name)

    def record_deletion(self, ledger: Ledger, *, replacing: Ledger, forgotten_ids=None) -> None:
        """Replaces the stored ledger `replacing` by `ledger` (compare-and-swap), first writing
        `forgotten_ids` where its new record points. Append-only: `ledger` extends `replacing`, or
        is an earlier state of it, whose later deletions are then marked undone (they stay listed):
        record_deletion(report.ledger_before, replacing=report.ledger_after) undoes a forget."""
        with self.writing():
            changes = self._meta.deletion_changes(ledger, replacing, self._where)
            if forgotten_ids is not None:
                self._data.write_forgotten(ledger.records[-1].fields["ids_from"], np.asarray(forgotten_ids, np.int64))
            self._commit(**changes)

    def ids_for(self, values, arg: str = "ids", *, allow_empty: bool = False, recording: bool = False) -> np.ndarray:
        """`values` (int64 IDs, or str/bytes/UUID keys mapped with the store's secret) as sample IDs."""
        ids, check = self._keys.ids(values, self._meta.key_check, self.steps, self._where, arg, allow_empty=allow_empty)
        if check is not None and recording:  # the first keys recorded: keep the secret's check value
            with self._mutex:
                self._take_lock()
                self._commit(key_check=check)
        return ids

    def forgotten_ids(self) -> np.ndarray:
        """The IDs of every deletion request in effect (sorted): training must not use them again."""
        return self._data.forgotten(self.ledger.forgotten_ranges())

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
        return self._ids.steps_for(self.ids_for(ids))

    def read(self, steps) -> Row:
        """The stored rows of `steps` (in the order given), reading only the chunks they lie in."""
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
