"""Reading a few rows of a sharded array straight from its shards.

zarr-python reads a selection of inner chunks through its general codec pipeline, which costs
about a millisecond per inner chunk; a forget that touches 100 steps spread over a large store
paid that 100 times per array. For the store's own layout (docs/format.md: shards along the
first axis, inner chunks of whole rows, `bytes` → `blosc` → `crc32c` inside, the index
`bytes` → `crc32c` at the end of each shard) this module fetches, in one concurrent batch, the
indices of the shards involved and then the byte ranges of just the inner chunks needed, checks
every crc32c and decodes with blosc. In a local folder the byte ranges are read from the files
in the calling thread: each trip through zarr's event loop costs about a millisecond, more than
reading a small range. Any other layout returns None and the caller uses zarr.
Every failure (a missing shard, a checksum, an inner chunk absent from its shard) is a
CorruptStoreError naming the array.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import google_crc32c
import numpy as np
from numcodecs import blosc
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .errors import CorruptStoreError

_EMPTY = np.uint64(2**64 - 1)
BYTES_READ_LOCALLY = [0]  # bytes read from local files, past zarr's store (benchmarks count them)


def _plain_rows_layout(arr) -> bool:
    """Whether `arr` has the layout this module reads (else zarr reads it)."""
    codecs = arr.metadata.codecs
    if arr.shards is None or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    sharding = codecs[0]
    inner = [type(c) for c in sharding.codecs]
    index = [type(c) for c in sharding.index_codecs]
    little = all(getattr(c, "endian", None) in (None, "little") or getattr(getattr(c, "endian", None), "value", None)
                 == "little" for c in (sharding.codecs[0], sharding.index_codecs[0]))  # the bytes on disk
    return (inner == [BytesCodec, BloscCodec, Crc32cCodec] and index == [BytesCodec, Crc32cCodec] and little
            and str(sharding.index_location.value) == "end" and arr.chunks[1:] == arr.shape[1:] == arr.shards[1:])


def _checked(payload: bytes, what: str, where: str) -> bytes:
    body, crc = payload[:-4], int.from_bytes(payload[-4:], "little")
    if len(payload) < 4 or google_crc32c.value(body) != crc:
        raise CorruptStoreError(f"{where}: {what} fails its crc32c checksum: the store is damaged; restore it from a copy")
    return body


def read_rows(zstore, arr, rows: np.ndarray, where: str) -> np.ndarray | None:
    """arr[rows] for sorted `rows` (within the array), or None where the layout is not the
    store's own."""
    if not _plain_rows_layout(arr):
        return None
    shard_rows, inner_rows = arr.shards[0], arr.chunks[0]
    per_shard = shard_rows // inner_rows
    dtype = np.dtype(arr.dtype)
    row_shape = tuple(arr.shape[1:])
    inner_shape = (inner_rows, *row_shape)
    chunk = rows // inner_rows  # global inner-chunk numbers
    wanted = np.unique(chunk)
    shards = np.unique(wanted // per_shard)
    zero = (0,) * len(row_shape)

    def key(shard: int) -> str:
        return f"{arr.path}/" + arr.metadata.encode_chunk_key((int(shard), *zero))

    index_bytes = per_shard * 16 + 4
    indices = {}
    for shard, data in zip(shards, _fetch(zstore, [(key(s), -index_bytes, None) for s in shards])):
        if data is None:
            raise CorruptStoreError(f"{where}: shard {key(shard)} of array {arr.path!r} is missing, though it lies "
                                    "inside the committed range; restore the store from a copy")
        body = _checked(data, f"the index of shard {key(shard)}", where)
        indices[int(shard)] = np.frombuffer(body, dtype="<u8").reshape(per_shard, 2)

    spans = []
    for c in wanted:
        offset, nbytes = indices[int(c // per_shard)][int(c % per_shard)]
        if offset == _EMPTY:
            raise CorruptStoreError(f"{where}: inner chunk {int(c)} of array {arr.path!r} is absent from its shard, "
                                    "though it lies inside the committed range; restore the store from a copy")
        spans.append((int(c), int(offset), int(nbytes)))

    decoded = np.empty((len(spans), *inner_shape), dtype=dtype)
    chunks = _fetch(zstore, [(key(c // per_shard), o, o + n) for c, o, n in spans])
    for i, ((c, _, _), data) in enumerate(zip(spans, chunks)):
        if data is None:
            raise CorruptStoreError(f"{where}: shard {key(c // per_shard)} of array {arr.path!r} vanished while read")
        raw = blosc.decompress(_checked(data, f"inner chunk {c} of array {arr.path!r}", where))
        decoded[i] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(inner_shape)
    return decoded[np.searchsorted(wanted, chunk), rows - chunk * inner_rows]


def _fetch(zstore, requests: list[tuple[str, int, int | None]]) -> list[bytes | None]:
    """The bytes [start, stop) of each (key, start, stop) — start < 0 with stop None: the last
    -start bytes — or None where the key is absent: from the files of a local folder in this
    thread, else in one concurrent batch through the zarr store."""
    if isinstance(zstore, LocalStore):
        return [_read_file(Path(zstore.root) / key, start, stop) for key, start, stop in requests]
    prototype = default_buffer_prototype()

    async def fetch_all():
        return await asyncio.gather(*(
            zstore.get(key, prototype, SuffixByteRequest(-start) if stop is None else RangeByteRequest(start, stop))
            for key, start, stop in requests))

    return [None if buf is None else buf.to_bytes() for buf in sync(fetch_all())]


def _read_file(path: Path, start: int, stop: int | None) -> bytes | None:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(0, size + start) if stop is None else start
            data = os.pread(f.fileno(), (size if stop is None else stop) - start, start)
    except FileNotFoundError:
        return None
    BYTES_READ_LOCALLY[0] += len(data)
    return data  # a short read (a truncated file) fails its checksum
