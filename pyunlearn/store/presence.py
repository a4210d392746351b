"""Missing chunks are errors: zarr reads an absent chunk as its fill value (zeros), which would
let a deleted or never-synced chunk pass for data — a forget that subtracts nothing, or sample
IDs that look never seen. Every chunk a read touches inside the committed range must exist."""
from __future__ import annotations

import numpy as np

from ..errors import CorruptStoreError
from . import zarr_io


class ChunkPresence:
    """Checks that chunks exist before they are read; remembers those seen (a handle's view of
    the store is refreshed as a whole, which starts a new ChunkPresence)."""

    def __init__(self, zstore, where: str):
        self._zstore, self._where = zstore, where
        self._seen: set[str] = set()

    def require(self, arr, rows: np.ndarray) -> None:
        """Every chunk holding any of `rows` (positions along the first axis) of `arr`, across
        all its columns, exists; else CorruptStoreError naming the array and the chunk."""
        if rows.size == 0:
            return
        grid = arr.shards or arr.chunks  # the stored objects: shards where the array is sharded
        first_axis = np.unique(rows // grid[0])
        columns = range(-(-arr.shape[1] // grid[1])) if arr.ndim == 2 else (None,)
        keys = [f"{arr.path}/" + arr.metadata.encode_chunk_key((int(i),) if j is None else (int(i), j))
                for i in first_axis for j in columns]
        unseen = [key for key in keys if key not in self._seen]
        if not unseen:
            return

        for key, present in zip(unseen, zarr_io.exist_many(self._zstore, unseen)):
            if not present:
                raise CorruptStoreError(
                    f"{self._where}: chunk {key} of array {arr.path!r} is missing, though it lies inside the "
                    "committed range (it was deleted, or never synced). Its data cannot be recovered from "
                    "zeros: restore the store from a copy")
            self._seen.add(key)
