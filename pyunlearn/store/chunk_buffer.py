"""The chunk of steps being filled: rows are buffered and written a whole chunk at a time, so a
chunk file is only ever replaced whole (atomically, on local disks), never patched.

A buffer starts at the chunk holding the next step, with that chunk's already committed rows
read back; `write` stores its rows and the sample IDs of its new steps, and returns the counts
to commit. Committing them (after the data) is the store's job.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..attribution import HYPER_WIDTH
from .digests import ids_digest, row_digest, store_id_bytes
from . import zarr_io
from .metadata import DIGEST_BYTES, VALUE_DTYPES, StoreMetadata
from .shards import write_rows


class ChunkBuffer:
    def __init__(self, meta: StoreMetadata, read_rows):
        """`read_rows(name, slice)` reads committed rows of an array (to refill the chunk)."""
        C, K, L = meta.steps_per_chunk, meta.row_length, len(meta.layers)
        self._names = meta.row_arrays
        self._capacity = C
        self.start = (meta.committed_steps // C) * C
        self.rows = meta.committed_steps - self.start
        self._committed_steps, self._committed_samples = meta.committed_steps, meta.committed_samples
        self._data = {
            "values": np.zeros((C, K), dtype=VALUE_DTYPES[meta.value_dtype]),
            "index": np.zeros((C, K), dtype=np.uint32),
            "scales": np.zeros((C, L), dtype=np.float32),
        }
        if "step_hyper" in self._names:
            self._data["step_hyper"] = np.zeros((C, HYPER_WIDTH), dtype=np.float64)
        self._store_id = None
        if "step_digests" in self._names:  # each step's place-bound digests (store/digests.py)
            self._data["step_digests"] = np.zeros((C, DIGEST_BYTES), dtype=np.uint8)
            self._store_id = store_id_bytes(meta.store_id)
        if self.rows:
            for name in self._names:
                self._data[name][: self.rows] = read_rows(name, slice(self.start, meta.committed_steps))
        self._pending_ids: list[np.ndarray] = []

    @property
    def full(self) -> bool:
        return self.rows == self._capacity

    @property
    def has_new_rows(self) -> bool:
        return self.start + self.rows > self._committed_steps

    def add(self, fields: dict[str, np.ndarray], ids: np.ndarray) -> None:
        r = self.rows
        for name, value in fields.items():
            self._data[name][r] = value
        if self._store_id is not None:
            step = self.start + r
            digest = row_digest(self._store_id, step, fields["index"], fields["values"], fields["scales"],
                                fields.get("step_hyper"))
            self._data["step_digests"][r] = np.frombuffer(digest + ids_digest(self._store_id, step, ids), np.uint8)
        self._pending_ids.append(ids)
        self.rows = r + 1

    def drop_last(self) -> None:
        """Forgets the row just added (its chunk failed to write: a retry must not store it twice)."""
        self.rows -= 1
        self._pending_ids.pop()

    def write(self, arrays: dict, zstore, where: str) -> "Written":
        """Writes the chunk's rows and the new steps' sample IDs (into `arrays`, of the zarr store
        `zstore`; `where` names the store in errors); returns the counts for the store to commit
        once this returned, and to pass to `committed` once it did."""
        start, end = self.start, self.start + self.rows
        ids = np.concatenate(self._pending_ids) if self._pending_ids else np.empty(0, np.int64)
        counts = np.array([len(x) for x in self._pending_ids], dtype=np.int64)
        first_sample, last_sample = self._committed_samples, self._committed_samples + len(ids)
        writes = []
        for name in self._names:
            arr = arrays[name]
            if arr.shape[0] < start + self._capacity:  # grown geometrically: a resize rewrites metadata
                arr.resize((max(start + self._capacity, 2 * arr.shape[0]), arr.shape[1]))
            writes.append((arr, slice(start, end), self._data[name][: self.rows]))
        _grow(arrays["sample_ids"], last_sample)
        if len(ids):
            writes.append((arrays["sample_ids"], slice(first_sample, last_sample), ids))
        _grow(arrays["offsets"], end + 1)
        writes.append((arrays["offsets"], slice(self._committed_steps + 1, end + 1), first_sample + np.cumsum(counts)))
        zarr_io.write_together([w for w in writes if not write_rows(zstore, w[0], w[1].start, w[2], where)])
        return Written(end, last_sample)

    def committed(self, written: "Written") -> None:
        """The counts `write` returned are committed: its rows now count as stored. Not before
        (a commit that fails leaves them to be written again by the next write)."""
        self._committed_steps, self._committed_samples = written
        self._pending_ids = []


class Written(NamedTuple):
    committed_steps: int
    committed_samples: int


def _grow(arr, length: int) -> None:
    if arr.shape[0] < length:  # geometrically, in whole written chunks
        chunk = (arr.shards or arr.chunks)[0]
        arr.resize((-(-max(length, 2 * arr.shape[0]) // chunk) * chunk,))
