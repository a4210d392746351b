"""A persistent index from sample IDs to the steps that used them, appended per commit.

Each commit writes a *run*: the (ID, step) pairs of its new steps, sorted by ID (then step), as
two arrays `lookup/<name>.ids` and `lookup/<name>.steps`, compressed in inner chunks of 8192
pairs; the ids array's attribute `fences` holds the first ID of every inner chunk. Runs are
merged when the newest is at least half the size of the one before it (as a binary counter),
so a store of n pairs holds O(log n) runs and each pair is rewritten O(log n) times.

A lookup binary-searches the fences of every run and decodes only the inner chunks that can
hold the IDs: opening a store and finding a few IDs costs O(runs · log n), never a rebuild of
everything. Steps recorded before the store had runs (stores written before format 3) are found
by scanning the CSR arrays (sample_ids, offsets) of steps [0, lookup_from), as before.
The run table is part of the store's checksummed metadata and committed with the counts.
"""
from __future__ import annotations

import numpy as np

from ._format import IDS_PER_INNER_CHUNK, Run, StoreMetadata, codecs
from ._sample_index import SampleIndex, StepLookup

GROUP = "lookup"


def sorted_pairs(ids: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs sorted by ID, then step (the input lists steps in increasing order)."""
    order = np.argsort(ids, kind="stable")
    return ids[order], steps[order]


def write_run(group, ids: np.ndarray, steps: np.ndarray, step_from: int, step_to: int, compression: str) -> Run:
    """Writes a run of already sorted pairs (data only: the caller commits the run table)."""
    name = f"r{step_from}-{step_to}"
    runs = group.require_group(GROUP)
    fences = ids[::IDS_PER_INNER_CHUNK].tolist()
    for suffix, data, attrs in ((".ids", ids, {"fences": fences}), (".steps", steps, {})):
        arr = runs.create_array(name + suffix, shape=data.shape, dtype=np.int64, chunks=(IDS_PER_INNER_CHUNK,),
                                shards=(max(IDS_PER_INNER_CHUNK, -(-len(data) // IDS_PER_INNER_CHUNK) * IDS_PER_INNER_CHUNK),),
                                compressors=codecs(8, compression), fill_value=0, dimension_names=("pair",),
                                attributes=attrs, overwrite=True, config={"write_empty_chunks": True})
        if len(data):
            arr[:] = data
    return Run(name, step_from, step_to, len(ids))


def delete_runs(group, runs: list[Run]) -> None:
    """Removes runs' arrays (after the run table that drops them was committed; a crash before
    leaves unreferenced arrays, which are overwritten when a run of that name is written)."""
    if not runs:
        return
    table = group.require_group(GROUP)
    for run in runs:
        for suffix in (".ids", ".steps"):
            try:
                del table[run.name + suffix]
            except KeyError:
                pass


class LookupRuns:
    """Reads the runs of one committed state (a new one after every commit)."""

    def __init__(self, group, runs: tuple[Run, ...], read):
        """`read(arr, selection)` reads an array with the store's checks (missing chunks)."""
        self._group, self._runs, self._read = group, runs, read
        self._open: dict[str, tuple] = {}

    def _arrays(self, run: Run):
        if run.name not in self._open:
            runs = self._group[GROUP]
            ids = runs[run.name + ".ids"]
            self._open[run.name] = (ids, runs[run.name + ".steps"], np.asarray(ids.attrs["fences"], dtype=np.int64))
        return self._open[run.name]

    def read_run(self, run: Run) -> tuple[np.ndarray, np.ndarray]:
        ids, steps, _ = self._arrays(run)
        return self._read(ids, slice(0, run.pairs)), self._read(steps, slice(0, run.pairs))

    def steps_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(steps that used any of `ids` (sorted unique), a mask of the IDs found), for sorted
        unique `ids`."""
        found = np.zeros(len(ids), dtype=bool)
        steps: list[np.ndarray] = []
        for run in self._runs:
            if run.pairs == 0:
                continue
            id_arr, step_arr, fences = self._arrays(run)
            # Inner chunks that can hold an ID: from the one before its first fence match (an
            # ID's pairs may start in the chunk before) to the last chunk whose fence is <= it.
            first = np.maximum(np.searchsorted(fences, ids, side="left") - 1, 0)
            last = np.searchsorted(fences, ids, side="right") - 1
            keep = last >= first
            marks = np.zeros(len(fences) + 1, dtype=np.int64)
            np.add.at(marks, first[keep], 1)
            np.add.at(marks, last[keep] + 1, -1)
            wanted = np.flatnonzero(np.cumsum(marks)[:-1] > 0)
            if wanted.size == 0:
                continue
            if wanted.size * 2 > len(fences):  # most of the run: one read
                spans = [(0, run.pairs)]
            else:  # consecutive chunks in one read each
                groups = np.split(wanted, np.flatnonzero(np.diff(wanted) != 1) + 1)
                spans = [(int(g[0]) * IDS_PER_INNER_CHUNK, min(run.pairs, (int(g[-1]) + 1) * IDS_PER_INNER_CHUNK))
                         for g in groups]
            for start, stop in spans:
                run_ids = self._read(id_arr, slice(start, stop))
                left = np.searchsorted(run_ids, ids, side="left")
                right = np.searchsorted(run_ids, ids, side="right")
                hit = right > left
                if hit.any():
                    found |= hit
                    run_steps = self._read(step_arr, slice(start, stop))
                    counts = (right - left)[hit]
                    positions = np.repeat(left[hit] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
                    steps.append(run_steps[positions])
        return (np.unique(np.concatenate(steps)) if steps else np.empty(0, np.int64)), found


def runs_after_commit(group, runs: tuple[Run, ...], ids: np.ndarray, steps: np.ndarray, step_from: int,
                      step_to: int, compression: str, reader: LookupRuns) -> tuple[tuple[Run, ...], list[Run]]:
    """The run table once the pairs of steps [step_from, step_to) are added, and the runs it no
    longer holds (delete them after the table is committed). Merges while the newest run is at
    least half the size of the one before it."""
    new = write_run(group, *sorted_pairs(ids, steps), step_from, step_to, compression)
    runs, obsolete = list(runs) + [new], []
    while len(runs) >= 2 and runs[-2].pairs <= 2 * runs[-1].pairs:
        older, newer = runs[-2], runs[-1]
        (a_ids, a_steps), (b_ids, b_steps) = reader.read_run(older), reader.read_run(newer)
        merged = write_run(group, *sorted_pairs(np.concatenate([a_ids, b_ids]), np.concatenate([a_steps, b_steps])),
                           older.step_from, newer.step_to, compression)
        runs[-2:] = [merged]
        obsolete += [r for r in (older, newer) if r.name != merged.name]
    return tuple(runs), obsolete


def runs_after_truncate(group, meta: StoreMetadata, step: int,
                        reader: LookupRuns) -> tuple[int, tuple[Run, ...], list[Run]]:
    """(lookup_from, the run table, the runs it no longer holds) once steps >= `step` are
    dropped: runs past it go, a run across it is rewritten with only its pairs before it."""
    if step <= meta.lookup_from:
        return step, (), list(meta.lookup_runs)
    kept, obsolete = [], []
    for run in meta.lookup_runs:
        if run.step_to <= step:
            kept.append(run)
            continue
        obsolete.append(run)
        if run.step_from < step:
            ids, steps = reader.read_run(run)
            before = steps < step
            kept.append(write_run(group, ids[before], steps[before], run.step_from, step, meta.compression))
    return meta.lookup_from, tuple(kept), [r for r in obsolete if r.name not in {k.name for k in kept}]


class IdLookup:
    """steps_for() of one committed state: the runs, plus a CSR scan of the steps before them
    (only in stores written before format 3), built on first use."""

    def __init__(self, group, meta: StoreMetadata, data):
        """`data`: the store's StoreArrays (checked reads)."""
        self._group, self._meta, self._data = group, meta, data
        self.runs = LookupRuns(group, meta.lookup_runs, lambda arr, sel: data.read_array(arr, sel))
        self._prefix: SampleIndex | None = None

    def steps_for(self, ids: np.ndarray) -> StepLookup:
        ids = np.unique(ids)
        steps, found = self.runs.steps_of(ids)
        if self._meta.lookup_from:
            if self._prefix is None:
                n = self._meta.lookup_from
                offsets = self._data.read("offsets", slice(0, n + 1))
                self._prefix = SampleIndex(self._data.read("sample_ids", slice(0, int(offsets[-1]))), offsets)
            prefix = self._prefix.lookup(ids)
            steps = np.union1d(steps, prefix.steps)
            found |= ~np.isin(ids, prefix.missing)
        return StepLookup(steps.astype(np.int64), ids[~found])
