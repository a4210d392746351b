"""A persistent index from sample IDs to the steps that used them.

The committed steps fall in three ranges, each searched its own way:

    [0, lookup_from)        stores written before format 3: a scan of the CSR arrays
                            (sample_ids, offsets), as those stores were always searched
    [lookup_from, indexed)  runs: (ID, step) pairs sorted by ID, one array `lookup/<name>` of
                            shape (pairs, 2) compressed in inner chunks of 8192 pairs, whose
                            attribute `fences` holds the first ID of every inner chunk
    [indexed, committed)    the tail, at most TAIL_IDS sample IDs: a scan of the CSR arrays

A commit that grows the tail past TAIL_IDS turns it into a run; runs merge while the newest is
at least half the size of the one before it (a binary counter), so a store of n pairs holds
O(log n) runs and each pair is rewritten O(log n) times. A lookup binary-searches each run's
fences and decodes only the inner chunks that can hold the IDs, plus the tail: opening a store
and finding a few IDs costs O(runs · log n), never a rebuild of everything. The run table is part
of the store's checksummed metadata and is committed with the counts.
"""
from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import numpy as np

from ..errors import CorruptStoreError
from .zarr_io import open_arrays
from .digests import run_chunk_digest, store_id_bytes
from .metadata import IDS_PER_INNER_CHUNK, Run, StoreMetadata, codecs

class StepLookup(NamedTuple):
    steps: np.ndarray  # int64, sorted, unique: the steps whose batches held any of the IDs
    missing: np.ndarray  # int64, sorted, unique: IDs no committed step used


class SampleIndex:
    """Every (ID, step) pair of a range of steps sorted by ID, built from the store's CSR arrays
    (sample_ids, offsets): how steps outside the persistent index's runs are searched."""

    def __init__(self, sample_ids: np.ndarray, offsets: np.ndarray, *, first_step: int = 0):
        """offsets[s] − offsets[0] .. is where step first_step + s starts in sample_ids."""
        step_of = np.repeat(np.arange(first_step, first_step + len(offsets) - 1, dtype=np.int64), np.diff(offsets))
        order = np.argsort(sample_ids, kind="stable")
        self._ids, self._step_of = sample_ids[order], step_of[order]

    def lookup(self, ids: np.ndarray) -> StepLookup:
        left = np.searchsorted(self._ids, ids, side="left")
        right = np.searchsorted(self._ids, ids, side="right")
        counts = right - left
        # Every position in the [left, right) ranges, without a Python loop.
        positions = np.repeat(left - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        return StepLookup(np.unique(self._step_of[positions]), np.unique(ids[counts == 0]))


GROUP = "lookup"
TAIL_IDS = 1 << 16  # ~512 KB of IDs: scanning the tail costs a few ms; a run per commit would cost more


def _pairs(ids: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """(pairs, 2) int64 sorted by ID, then step (the input lists steps in increasing order)."""
    order = np.argsort(ids, kind="stable")
    return np.stack([ids[order], steps[order]], axis=1)


def write_run(group, pairs: np.ndarray, step_from: int, step_to: int, meta: StoreMetadata) -> Run:
    """Writes a run of sorted pairs (data only: the caller commits the run table), with the
    place-bound digest of each inner chunk (store/digests.py) where the store keeps digests."""
    name, compression = f"r{step_from}-{step_to}", meta.compression
    attributes = {"fences": pairs[::IDS_PER_INNER_CHUNK, 0].tolist()}
    if meta.store_id is not None and meta.digests_from is not None:
        sid = store_id_bytes(meta.store_id)
        attributes["digests"] = [run_chunk_digest(sid, name, c, pairs[c * IDS_PER_INNER_CHUNK:(c + 1) * IDS_PER_INNER_CHUNK])
                                 for c in range(-(-len(pairs) // IDS_PER_INNER_CHUNK))]
    shard = max(IDS_PER_INNER_CHUNK, -(-len(pairs) // IDS_PER_INNER_CHUNK) * IDS_PER_INNER_CHUNK)
    layout = dict(chunks=(IDS_PER_INNER_CHUNK, 2), shards=(shard, 2)) if shard > IDS_PER_INNER_CHUNK else \
        dict(chunks=(IDS_PER_INNER_CHUNK, 2))
    arr = group.require_group(GROUP).create_array(
        name, shape=pairs.shape, dtype=np.int64, compressors=codecs(8, compression), fill_value=0,
        dimension_names=("pair", "id_step"), attributes=attributes,
        overwrite=True, config={"write_empty_chunks": True}, **layout)
    if len(pairs):
        arr[:] = pairs
    return Run(name, step_from, step_to, len(pairs), attributes_digest(attributes) if "digests" in attributes else None)


def attributes_digest(attributes: dict) -> str:
    text = json.dumps(attributes, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


def indexed_until(meta: StoreMetadata) -> int:
    return meta.lookup_runs[-1].step_to if meta.lookup_runs else meta.lookup_from


class IdLookup:
    """Reads the ID index of one committed state (a new one after every commit)."""

    def __init__(self, group, meta: StoreMetadata, data):
        """`data`: the store's StoreArrays (reads with the store's checks)."""
        self._group, self._meta, self._data = group, meta, data
        self._fences: dict[str, tuple] = {}
        self._scans: dict[tuple[int, int], SampleIndex] = {}

    def _run(self, run: Run):
        """(array, fences, chunk digests or None) of a run, its attributes checked against the
        run table where the store keeps digests."""
        if run.name not in self._fences:  # it and every run of the table not yet open: one trip through zarr
            table = {r.name: r for r in self._meta.lookup_runs}
            runs = [run.name] + [r.name for r in self._meta.lookup_runs if r.name not in self._fences and r.name != run.name]
            for name, arr in zip(runs, open_arrays(self._group, [f"{GROUP}/{name}" for name in runs])):
                attrs = dict(arr.attrs)
                entry = table.get(name, run)
                needs = self._meta.digests_from is not None and entry.step_to > self._meta.digests_from
                if (entry.attributes is not None or needs) and entry.attributes != attributes_digest(attrs):
                    raise CorruptStoreError(
                        f"{self._data.where}: the ID index's run {GROUP}/{name} is not the one the store's metadata "
                        "lists (its attributes differ from their recorded digest): the run was replaced, moved or "
                        "edited. Restore the store from a copy")
                self._fences[name] = (arr, np.asarray(attrs["fences"], dtype=np.int64), attrs.get("digests"))
        return self._fences[run.name]

    def _pairs_of(self, run: Run, start: int, stop: int) -> np.ndarray:
        """The run's pairs [start, stop) (start on an inner chunk's boundary), each whole inner
        chunk checked against its place-bound digest."""
        arr, _, digests = self._run(run)
        pairs = self._data.read_array(arr, slice(start, stop))
        if digests is not None:
            sid = store_id_bytes(self._meta.store_id)
            for c in range(start // IDS_PER_INNER_CHUNK, -(-stop // IDS_PER_INNER_CHUNK)):
                lo, hi = c * IDS_PER_INNER_CHUNK, min(run.pairs, (c + 1) * IDS_PER_INNER_CHUNK)
                if c >= len(digests) or run_chunk_digest(sid, run.name, c, pairs[lo - start:hi - start]) != digests[c]:
                    raise CorruptStoreError(
                        f"{self._data.where}: inner chunk {c} of the ID index's run {GROUP}/{run.name} does not match "
                        "its digest: a shard of the index was swapped, moved or copied from another store. Restore "
                        "the store from a copy")
        return pairs

    def read_run(self, run: Run) -> np.ndarray:
        return self._pairs_of(run, 0, run.pairs)

    def samples_before(self, step: int) -> int:
        """How many sample IDs steps [0, step) hold."""
        return int(self._data.read("offsets", slice(step, step + 1))[0])

    def _csr(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, sample IDs) of steps [first, last) from the CSR arrays, each step's IDs
        checked against its place-bound digest where the store keeps one."""
        offsets = self._data.read("offsets", slice(first, last + 1))
        ids = self._data.read("sample_ids", slice(int(offsets[0]), int(offsets[-1]))) if last > first else \
            np.empty(0, np.int64)
        self._data.check_step_ids(np.arange(first, last), [ids[a:b] for a, b in zip(offsets[:-1] - offsets[0],
                                                                                  offsets[1:] - offsets[0])])
        return offsets, ids

    def csr_pairs(self, first: int, last: int) -> np.ndarray:
        """The sorted pairs of steps [first, last), from the CSR arrays."""
        offsets, ids = self._csr(first, last)
        return _pairs(ids, np.repeat(np.arange(first, last, dtype=np.int64), np.diff(offsets)))

    def _scan(self, first: int, last: int, ids: np.ndarray) -> StepLookup:
        if (first, last) not in self._scans:
            offsets, sample_ids = self._csr(first, last)
            self._scans[(first, last)] = SampleIndex(sample_ids, offsets - offsets[0], first_step=first)
        return self._scans[(first, last)].lookup(ids)

    def steps_for(self, ids: np.ndarray) -> StepLookup:
        ids = np.unique(ids)
        found = np.zeros(len(ids), dtype=bool)
        steps = [self._in_run(run, ids, found) for run in self._meta.lookup_runs if run.pairs]
        for first, last in ((0, self._meta.lookup_from), (indexed_until(self._meta), self._meta.committed_steps)):
            if last > first:
                scan = self._scan(first, last, ids)
                steps.append(scan.steps)
                found |= ~np.isin(ids, scan.missing)
        steps = np.unique(np.concatenate(steps)) if steps else np.empty(0, np.int64)
        return StepLookup(steps.astype(np.int64), ids[~found])

    def _in_run(self, run: Run, ids: np.ndarray, found: np.ndarray) -> np.ndarray:
        """Steps of `run` that used any of the sorted `ids`; marks the IDs found."""
        _, fences, _ = self._run(run)
        # Inner chunks that can hold an ID: from the one before its first fence match (an ID's
        # pairs may start in the chunk before) to the last chunk whose fence is <= it.
        first = np.maximum(np.searchsorted(fences, ids, side="left") - 1, 0)
        last = np.searchsorted(fences, ids, side="right") - 1
        keep = last >= first
        marks = np.zeros(len(fences) + 1, dtype=np.int64)
        np.add.at(marks, first[keep], 1)
        np.add.at(marks, last[keep] + 1, -1)
        wanted = np.flatnonzero(np.cumsum(marks)[:-1] > 0)
        if wanted.size * 2 > len(fences):  # most of the run: one read
            spans = [(0, run.pairs)]
        else:  # consecutive chunks in one read each
            spans = [(int(g[0]) * IDS_PER_INNER_CHUNK, min(run.pairs, (int(g[-1]) + 1) * IDS_PER_INNER_CHUNK))
                     for g in np.split(wanted, np.flatnonzero(np.diff(wanted) != 1) + 1) if g.size]
        steps = []
        for start, stop in spans:
            pairs = self._pairs_of(run, start, stop)
            left = np.searchsorted(pairs[:, 0], ids, side="left")
            right = np.searchsorted(pairs[:, 0], ids, side="right")
            hit = right > left
            if hit.any():
                found |= hit
                counts = (right - left)[hit]
                positions = np.repeat(left[hit] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
                steps.append(pairs[positions, 1])
        return np.concatenate(steps) if steps else np.empty(0, np.int64)

    # ------------------------------------------------------------------ its own commit
    def after_commit(self, committed_steps: int, committed_samples: int) -> tuple[tuple[Run, ...], list[Run]]:
        """The run table once the data of a commit is written (the new steps stay the tail
        until it holds TAIL_IDS IDs; then they become a run, and runs merge as a binary
        counter), and the runs it no longer holds: the store commits the table, then calls
        drop(obsolete). This lookup reads the store as of the commit's data."""
        meta, group = self._meta, self._group
        start = indexed_until(meta)
        runs = list(meta.lookup_runs)
        tail_ids = committed_samples - self.samples_before(start)
        if tail_ids < TAIL_IDS:
            return tuple(runs), []
        runs.append(write_run(group, self.csr_pairs(start, committed_steps), start, committed_steps, meta))
        obsolete = []
        while len(runs) >= 2 and runs[-2].pairs <= 2 * runs[-1].pairs:
            older, newer = runs[-2], runs[-1]
            both = np.concatenate([self.read_run(older), self.read_run(newer)])
            merged = write_run(group, _pairs(both[:, 0], both[:, 1]), older.step_from, newer.step_to, meta)
            runs[-2:] = [merged]
            obsolete += [r for r in (older, newer) if r.name != merged.name]
        return tuple(runs), obsolete

    def after_truncate(self, step: int) -> tuple[int, tuple[Run, ...], list[Run]]:
        """(lookup_from, the run table, the runs it no longer holds) once steps >= `step` are
        dropped: runs past it go, a run across it is rewritten with only its pairs before it."""
        meta = self._meta
        if step <= meta.lookup_from:
            return step, (), list(meta.lookup_runs)
        kept, obsolete = [], []
        for run in meta.lookup_runs:
            if run.step_to <= step:
                kept.append(run)
                continue
            obsolete.append(run)
            if run.step_from < step:
                pairs = self.read_run(run)
                kept.append(write_run(self._group, pairs[pairs[:, 1] < step], run.step_from, step, meta))
        return meta.lookup_from, tuple(kept), [r for r in obsolete if r.name not in {k.name for k in kept}]

    def drop(self, runs: list[Run]) -> None:
        """Removes runs' arrays (after the run table that drops them was committed; a crash before
        leaves unreferenced arrays, overwritten when a run of that name is written again)."""
        if runs:
            table = self._group.require_group(GROUP)
            for run in runs:
                try:
                    del table[run.name]
                except KeyError:
                    pass
