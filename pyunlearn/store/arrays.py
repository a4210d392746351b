"""The store's arrays on disk: making the group of a new store, opening the arrays of an
existing one, and reading them with every failure turned into CorruptStoreError (a damaged
chunk, or a missing one: see presence.py). The layout is docs/format.md's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from ..attribution import HYPER_WIDTH
from ..errors import CorruptStoreError
from ..kernels import Row
from .presence import ChunkPresence
from .metadata import CHUNK_BYTES, DIGEST_BYTES, FORMAT_NAME, FORMAT_VERSION, IDS_PER_CHUNK, IDS_PER_INNER_CHUNK, \
    VALUE_DTYPES, \
    StoreMetadata, codecs
from .location import replace_file, what_is_there
from .lock import WriterLock
from .digests import check_steps, store_id_bytes
from .zarr_io import open_arrays
from .shards import read_rows


def create_group(zstore, where: str, meta: StoreMetadata, *, overwrite: bool):
    """The group of a new store with its empty arrays. Refuses a place that holds anything but
    an update store, and an update store unless `overwrite` (and no writer holds it)."""
    there = what_is_there(zstore)
    if there == "other":  # never delete what pyunlearn did not write
        raise FileExistsError(f"{where} holds files that are not a pyunlearn update store: choose an empty or "
                              "new folder (overwrite=True replaces only an update store)")
    if there == "pyunlearn" and not overwrite:
        raise FileExistsError(f"{where} already holds an update store; open it with UpdateStore.open, "
                              "or pass overwrite=True to replace it")
    if there == "pyunlearn":  # never wipe a store another writer is using
        guard = WriterLock(zstore, where)
        guard.acquire()
        guard.release()
    # The group first, marked unfinished, the arrays, then the real metadata: a crash midway
    # leaves a folder that open() calls unfinished and create(overwrite=True) may replace.
    group = zarr.open_group(zstore, mode="w", zarr_format=3, attributes={
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "creation_complete": False})
    create_arrays(group, meta)
    save_attributes(zstore, group, meta.to_checked_attrs())


def create_arrays(group, meta: StoreMetadata) -> None:
    """The empty arrays of a new store (see docs/format.md). Rows are written a shard
    (steps_per_chunk steps, ~4 MB) at a time and compressed in inner chunks of inner_steps
    steps (~64 KB), so a read decodes only the inner chunks it needs. Chunks equal to the fill
    value are written too, so that a missing chunk always means damage."""
    C, I, K, L = meta.steps_per_chunk, meta.inner_steps, meta.row_length, len(meta.layers)

    def add(name, shape, dtype, rows, inner_rows, dims):
        """One array, sharded when its inner chunks are smaller than what is written at once."""
        tail = shape[1:]
        if rows == 1 and tail and tail[0] * np.dtype(dtype).itemsize > CHUNK_BYTES:  # huge rows: split them
            tail = (max(1, CHUNK_BYTES // np.dtype(dtype).itemsize),)
        layout = dict(chunks=(inner_rows, *tail), shards=(rows, *tail)) if inner_rows < rows else \
            dict(chunks=(rows, *tail))
        return group.create_array(name, shape=shape, dtype=dtype, fill_value=0, dimension_names=dims,
                                  compressors=codecs(np.dtype(dtype).itemsize, meta.compression),
                                  config={"write_empty_chunks": True}, **layout)

    add("values", (0, K), VALUE_DTYPES[meta.value_dtype], C, I, ("step", "entry"))
    add("index", (0, K), np.uint32, C, I, ("step", "entry"))
    add("scales", (0, L), np.float32, C, I, ("step", "layer"))
    add("sample_ids", (0,), np.int64, IDS_PER_CHUNK, IDS_PER_INNER_CHUNK, ("sample",))
    offsets = add("offsets", (1,), np.int64, IDS_PER_CHUNK, IDS_PER_INNER_CHUNK, ("step_boundary",))
    offsets[0] = 0
    if meta.records_hyper:  # per step: the optimizer family's hyper-parameters, or the learning rate
        # A few bytes a step, always read whole: one chunk per write, not sharded (inner chunks of the
        # rows' size would cost a compression each: writes were 25% slower so).
        add("step_hyper", (0, HYPER_WIDTH), np.float64, C, C, ("step", "hyper"))
    create_digest_array(group, meta)


def create_digest_array(group, meta: StoreMetadata) -> None:
    """step_digests (steps, 32) uint8: per step its row's and its IDs' place-bound digests
    (store/digests.py), one plain chunk per write like step_hyper; a store converted from an
    older format gets it then, empty before digests_from."""
    if meta.digests_from is None:
        return
    C = meta.steps_per_chunk
    arr = group.create_array("step_digests", shape=(meta.committed_steps, DIGEST_BYTES), dtype=np.uint8,
                             fill_value=0, dimension_names=("step", "digest"), chunks=(C, DIGEST_BYTES),
                             compressors=codecs(1, meta.compression), config={"write_empty_chunks": True},
                             overwrite=True)
    if meta.committed_steps:  # every chunk inside the committed range exists (a missing one is damage)
        arr[:] = np.zeros((meta.committed_steps, DIGEST_BYTES), dtype=np.uint8)


FORGOTTEN = "forgotten"  # format 5: the IDs of the deletions in effect, [0, end) (store/deletion_data.py)
LEGACY_FORGOTTEN = "forgotten_ids"  # format 4: every request's IDs (left in place when a store is converted)


def save_attributes(zstore, group, attrs: dict):
    """The group's attributes replaced by `attrs` (the group, updated): in a local folder written
    here (the group's zarr.json replaced whole, as zarr does), without zarr's event loop, whose
    trip cost ~2 ms of every commit (each chunk written, each deletion recorded)."""
    metadata = group.metadata
    if not isinstance(zstore, LocalStore) or metadata.zarr_format != 3 or metadata.consolidated_metadata is not None:
        group.attrs.put(attrs)
        return group
    metadata.attributes.clear()  # replaced whole: a converted store's older fields must go
    metadata.attributes.update(attrs)
    # GroupMetadata.to_buffer_dict's document, without its deep copy of the attributes
    # (dataclasses.asdict: ~0.5 ms of a ResNet-18 store's commit), and on one line: zarr's indent
    # sends json through its pure-Python encoder, 0.30 ms a commit for a ResNet-18 store's layer
    # table against 0.065 ms in C. Any JSON reader, zarr included, reads the same document; the
    # test compares them.
    text = json.dumps({"attributes": metadata.attributes, "zarr_format": 3, "node_type": "group"}, allow_nan=True)
    replace_file(Path(zstore.root) / group.store_path.path / "zarr.json", [text.encode()])
    return group


class StoreArrays:
    """The arrays of an open store, read with checks."""

    def __init__(self, zstore, group, meta: StoreMetadata, where: str):
        self._where, self._check_presence = where, meta.chunks_always_written
        self.where = where
        # Place-bound digests (store/digests.py): checked for the steps from digests_from on.
        self._store_id = None if meta.digests_from is None else store_id_bytes(meta.store_id)
        self._digests_from, self._hyper = meta.digests_from, meta.records_hyper
        self._group, self._compression = group, meta.compression
        self._forgotten = None  # `forgotten`, opened at the first use
        try:
            # Chunks equal to the fill value are written too: a missing chunk then always means
            # damage (see _chunks.py), never "all zeros".
            self.arrays = {name: arr.with_config({"write_empty_chunks": True})
                           for name, arr in zip(meta.array_names, open_arrays(group, meta.array_names))}
        except KeyError as exc:
            raise CorruptStoreError(f"{where}: the store's array {exc} is missing") from None
        self._chunks = ChunkPresence(zstore, where)
        self._zstore = zstore

    def read(self, name: str, selection=None, *, rows: np.ndarray | None = None) -> np.ndarray:
        """arr[selection], or the given rows (orthogonal selection: only their chunks are read)."""
        return self.read_array(self.arrays[name], selection, rows=rows)

    def read_array(self, arr, selection=None, *, rows: np.ndarray | None = None) -> np.ndarray:
        """The same for any array of the store (e.g. the ID index's runs). A slice of a sharded
        array is read straight from its shards (see _shards.py)."""
        if rows is None and isinstance(selection, slice) and selection.step in (None, 1):
            start, stop, _ = selection.indices(arr.shape[0])
            if stop <= start:
                return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
            direct = read_rows(self._zstore, arr, np.arange(start, stop), self._where)
            if direct is not None:
                return direct
        name = arr.path
        if self._check_presence:
            self._chunks.require(arr, rows if rows is not None else np.arange(arr.shape[0])[selection])
        try:
            return arr.oindex[rows, :] if rows is not None else arr[selection]
        except Exception as exc:  # zarr/numcodecs raise many types for a damaged chunk
            what = f"rows of {name}" if rows is not None else f"{name}[{selection}]"
            raise CorruptStoreError(f"{self._where}: reading {what} failed: {exc}. A chunk is damaged "
                                    "or missing (its checksum does not match); restore the store from a copy") from exc

    def rows(self, steps: np.ndarray) -> Row:
        """The stored rows of `steps` (in the order given), reading only the chunks they lie in,
        each checked against its step's place-bound digest where the store keeps one."""
        unique, inverse = np.unique(steps, return_inverse=True)
        fields = {}
        for name in ("index", "values", "scales"):
            arr = self.arrays[name]
            if not unique.size:
                data = np.empty((0, arr.shape[1]), dtype=arr.dtype)
            else:  # straight from the shards where the layout allows, else through zarr
                data = read_rows(self._zstore, arr, unique, self._where)
                data = self.read(name, rows=unique) if data is None else data
            fields[name] = data
        checked = unique >= self._digests_from if self._store_id is not None else np.zeros(unique.size, dtype=bool)
        if checked.any():
            steps_checked = unique[checked]
            chosen = {name: data[checked] for name, data in fields.items()}
            if self._hyper:
                chosen["step_hyper"] = self.read("step_hyper", rows=steps_checked)
            bad = check_steps(self._store_id, steps_checked, self.read("step_digests", rows=steps_checked), chosen, None)
            if bad is not None:
                raise self._misplaced(bad, ("index", "values", "scales", "step_hyper"), "row")
        return Row(*(torch.from_numpy(np.ascontiguousarray(fields[name][inverse])) for name in ("index", "values", "scales")))

    def check_step_ids(self, steps: np.ndarray, ids: list[np.ndarray]) -> None:
        """CorruptStoreError if the sample IDs read for `steps` are not the ones written there."""
        if self._store_id is None:
            return
        steps = np.asarray(steps, dtype=np.int64)
        keep = np.flatnonzero(steps >= self._digests_from)
        if not keep.size:
            return
        chosen = steps[keep]
        stored = self.read("step_digests", slice(int(chosen[0]), int(chosen[-1]) + 1))[chosen - chosen[0]] \
            if np.all(np.diff(chosen) == 1) else self.read("step_digests", rows=chosen)
        bad = check_steps(self._store_id, chosen, stored, None, [ids[i] for i in keep])
        if bad is not None:
            raise self._misplaced(bad, ("sample_ids", "offsets"), "sample IDs")

    def _misplaced(self, step: int, names, what: str) -> CorruptStoreError:
        """The error for a step whose stored data is not the data written for it there."""
        shards = []
        for name in names:
            if name not in self.arrays:
                continue
            arr = self.arrays[name]
            position = step if name not in ("sample_ids",) else None
            if position is None:
                continue
            grid = (arr.shards or arr.chunks)[0]
            shards.append(f"{arr.path}/{arr.metadata.encode_chunk_key((position // grid,) + (0,) * (arr.ndim - 1))}")
        return CorruptStoreError(
            f"{self._where}: the stored {what} of step {step} is not the one written for that step in this store (its "
            f"place-bound digest differs): a shard was swapped with another, moved, or copied from another store "
            f"(the step lies in {', '.join(shards) or 'the sample_ids shard its offsets point to'}). Nothing was "
            "changed; restore the store from a copy")

    def step_ids(self, steps: np.ndarray) -> list[np.ndarray]:
        """The sample IDs of each of `steps` (committed steps, in the order given): the offsets and
        IDs of the span from the first to the last of them, cut per step, checked against the
        steps' digests."""
        if not steps.size:
            return []
        first, last = int(steps.min()), int(steps.max()) + 1
        offsets = self.read("offsets", slice(first, last + 1)).astype(np.int64)
        ids = self.read("sample_ids", slice(int(offsets[0]), int(offsets[-1])))
        offsets -= offsets[0]
        out = [ids[offsets[s - first] : offsets[s - first + 1]] for s in steps.tolist()]
        self.check_step_ids(steps, out)
        return out

    def write_forgotten(self, start: int, ids: np.ndarray) -> None:
        """Writes a request's IDs at [start, start + len(ids)) of `forgotten` (made at the first
        request), before the log record that points there is created. The array grows by
        doubling, so most requests write one chunk and no metadata; its extent is the log's."""
        arr = self._forgotten_array(create=True)
        if start + ids.size > arr.shape[0]:
            arr.resize((max(2 * arr.shape[0], start + ids.size),))
        if ids.size:
            arr[start:start + ids.size] = ids

    def forgotten_slice(self, start: int, stop: int) -> np.ndarray:
        """forgotten[start:stop] (int64), read with the store's checks."""
        if stop <= start:
            return np.empty(0, np.int64)
        arr = self._forgotten_array(create=False)
        if arr is None or arr.shape[0] < stop:
            raise CorruptStoreError(f"{self._where}: the audit log counts {stop} forgotten IDs but the array "
                                    f"{FORGOTTEN} holds {0 if arr is None else arr.shape[0]}; restore the store from a copy")
        return self.read_array(arr, slice(start, stop))

    def legacy_forgotten(self, stop: int) -> np.ndarray:
        """forgotten_ids[0:stop] of a store before format 5."""
        if stop == 0:
            return np.empty(0, np.int64)
        try:
            arr = self._group[LEGACY_FORGOTTEN]
        except KeyError:
            raise CorruptStoreError(f"{self._where}: the ledger lists deletion requests but the array "
                                    f"{LEGACY_FORGOTTEN} is missing; restore the store from a copy") from None
        return self.read_array(arr, slice(0, stop))

    def _forgotten_array(self, *, create: bool):
        if self._forgotten is None:
            if FORGOTTEN not in self._group:
                if not create:
                    return None
                self._group.create_array(FORGOTTEN, shape=(IDS_PER_INNER_CHUNK,), dtype=np.int64,
                                         chunks=(IDS_PER_INNER_CHUNK,), fill_value=0, dimension_names=("id",),
                                         compressors=codecs(8, self._compression))
            self._forgotten = self._group[FORGOTTEN].with_config({"write_empty_chunks": True})
        return self._forgotten

    def bytes_stored(self) -> dict[str, int]:
        return {name: int(arr.nbytes_stored()) for name, arr in self.arrays.items()}
