"""Reading a few rows of a sharded array straight from its shards, and writing a whole shard.

zarr-python reads a selection of inner chunks through its general codec pipeline, which costs
about a millisecond per inner chunk; a forget that touches 100 steps spread over a large store
paid that 100 times per array. For the store's own layout (docs/format.md: shards along the
first axis, inner chunks of whole rows, `bytes` → `blosc` → `crc32c` inside, the index
`bytes` → `crc32c` at the end of each shard) this module fetches, in one concurrent batch, the
indices of the shards involved and then the byte ranges of just the inner chunks needed, checks
every crc32c and decodes with blosc. In a local folder the byte ranges are read from the files
in the calling thread (each trip through zarr's event loop costs about a millisecond, more than
reading a small range), each shard's index and chunks through one open file. Any other layout
returns None and the caller uses zarr.
Every failure (a missing shard, a checksum, an inner chunk absent from its shard) is a
CorruptStoreError naming the array.

Writing: the recorder writes a shard at a time, from its first row. Through zarr, each inner
chunk took a trip through its codec pipeline (~0.4 ms on top of the compression: ResNet-18
rows wrote at 2.4× the codec's own time); in a local folder `write_rows` compresses the inner
chunks and writes the shard file itself, atomically (a temporary file renamed over the old
one), with the bytes zarr would write (tests compare them).
"""
from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import numpy as np
from numcodecs import blosc
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.storage import LocalStore

from ..errors import CorruptStoreError
from . import zarr_io
from .location import replace_file

_EMPTY = np.uint64(2**64 - 1)
BYTES_READ_LOCALLY = [0]  # bytes read from local files, past zarr's store (benchmarks count them)


def _little(codec) -> bool:
    endian = getattr(codec, "endian", None)
    return endian in (None, "little") or getattr(endian, "value", None) == "little"


def _plain_codecs(codecs) -> bool:
    """bytes (little-endian) → blosc → crc32c: what the store's arrays compress with."""
    return [type(c) for c in codecs] == [BytesCodec, BloscCodec, Crc32cCodec] and _little(codecs[0])


def _plain_rows_layout(arr) -> bool:
    """Whether `arr` has the sharded layout this module reads and writes (else zarr does)."""
    codecs = arr.metadata.codecs
    if arr.shards is None or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    sharding = codecs[0]
    return (_plain_codecs(sharding.codecs) and [type(c) for c in sharding.index_codecs] == [BytesCodec, Crc32cCodec]
            and _little(sharding.index_codecs[0]) and str(sharding.index_location.value) == "end"
            and arr.chunks[1:] == arr.shape[1:] == arr.shards[1:])


def _plain_chunks_layout(arr) -> bool:
    """Whether `arr` is unsharded, in chunks of whole rows, with the store's codecs."""
    return arr.shards is None and _plain_codecs(arr.metadata.codecs) and arr.chunks[1:] == arr.shape[1:]


def _chunk_key(arr, n: int) -> str:
    """The key of the n-th chunk along the first axis: a shard, where the array is sharded."""
    zero = (0,) * (len(arr.shape) - 1)
    return f"{arr.path}/" + arr.metadata.encode_chunk_key((int(n), *zero))


def _index_bytes(per_shard: int) -> int:
    """The size of a shard's index: offset and length (uint64) per inner chunk, and a crc32c."""
    return per_shard * 16 + 4


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
    inner_rows = arr.chunks[0]
    per_shard = arr.shards[0] // inner_rows
    dtype = np.dtype(arr.dtype)
    inner_shape = (inner_rows, *arr.shape[1:])
    chunk = rows // inner_rows  # global inner-chunk numbers
    wanted = np.unique(chunk)
    local = isinstance(zstore, LocalStore)
    decoded = np.empty((len(wanted), *inner_shape), dtype=dtype)
    for attempt in (1, 2):
        try:
            stored = (_local_inner_chunks if local else _remote_inner_chunks)(zstore, arr, wanted, per_shard, where)
            for i, (c, data) in enumerate(zip(wanted, stored)):
                decoded[i] = _decoded(data, f"inner chunk {int(c)} of array {arr.path!r}", where, dtype, inner_shape)
            break
        except CorruptStoreError:
            # Through a zarr store the index and the chunks are two requests: a writer replacing
            # the shard between them makes the chunks fail their checksums. Once more settles that
            # race; damage fails again. (A local file is read through one open file: no race.)
            if local or attempt == 2:
                raise
    return decoded[np.searchsorted(wanted, chunk), rows - chunk * inner_rows]


def _span(index: np.ndarray, c: int, per_shard: int, arr, where: str) -> tuple[int, int]:
    """(offset, length) of inner chunk c (a global number) in its shard's index."""
    offset, nbytes = index[c % per_shard]
    if offset == _EMPTY:
        raise CorruptStoreError(f"{where}: inner chunk {c} of array {arr.path!r} is absent from its shard, "
                                "though it lies inside the committed range; restore the store from a copy")
    return int(offset), int(nbytes)


def _missing(arr, shard: int, where: str) -> CorruptStoreError:
    return CorruptStoreError(f"{where}: shard {_chunk_key(arr, shard)} of array {arr.path!r} is missing, though it "
                             "lies inside the committed range; restore the store from a copy")


def _local_inner_chunks(zstore, arr, wanted: np.ndarray, per_shard: int, where: str) -> list[bytes]:
    """The stored bytes of each wanted inner chunk, from the shard files in this thread (each
    trip through zarr's event loop cost about a millisecond, more than reading a small range).
    Each shard file is opened once, so its index and its chunks come from the same version of
    it even if a writer replaces the file meanwhile (a rename leaves the open file as it was)."""
    out = []
    for shard in np.unique(wanted // per_shard):
        key = _chunk_key(arr, shard)
        try:
            f = open(Path(zstore.root) / key, "rb")
        except FileNotFoundError:
            raise _missing(arr, shard, where) from None
        with f:
            fd = f.fileno()
            size = os.fstat(fd).st_size
            index_bytes = min(size, _index_bytes(per_shard))
            index = _shard_index(os.pread(fd, index_bytes, size - index_bytes), key, where)
            for c in wanted[wanted // per_shard == shard]:
                offset, nbytes = _span(index, int(c), per_shard, arr, where)
                out.append(os.pread(fd, nbytes, offset))  # a short read (a truncated file) fails its checksum
                BYTES_READ_LOCALLY[0] += len(out[-1])
            BYTES_READ_LOCALLY[0] += index_bytes
    return out


def _remote_inner_chunks(zstore, arr, wanted: np.ndarray, per_shard: int, where: str) -> list[bytes]:
    """The same through the zarr store: the shards' indices in one concurrent batch, then the
    chunks' byte ranges in another."""
    shards = np.unique(wanted // per_shard)
    indices = {}
    for shard, data in zip(shards, _fetch(zstore, [(_chunk_key(arr, s), SuffixByteRequest(_index_bytes(per_shard)))
                                                   for s in shards])):
        if data is None:
            raise _missing(arr, shard, where)
        indices[int(shard)] = _shard_index(data, _chunk_key(arr, shard), where)
    requests = []
    for c in wanted:
        offset, nbytes = _span(indices[int(c) // per_shard], int(c), per_shard, arr, where)
        requests.append((_chunk_key(arr, int(c) // per_shard), RangeByteRequest(offset, offset + nbytes)))
    chunks = _fetch(zstore, requests)
    for c, data in zip(wanted, chunks):
        if data is None:
            raise CorruptStoreError(f"{where}: shard {_chunk_key(arr, int(c) // per_shard)} of array {arr.path!r} "
                                    "vanished while read")
    return chunks


_SHUFFLE = {BloscShuffle.noshuffle: 0, BloscShuffle.shuffle: 1, BloscShuffle.bitshuffle: 2}


def write_rows(zstore, arr, start: int, rows: np.ndarray, where: str) -> bool:
    """arr[start : start + len(rows)] = rows, appending: in a sharded array, the rows before
    `start` in its shard are kept (their inner chunks copied as they are, the one `start` cuts
    into decoded and encoded again), those after the new rows dropped, and every shard touched
    is written whole; in an unsharded one, only a write of one chunk from its start (the rest
    zeros). In a local folder and the store's own codecs; False where not (zarr writes it)."""
    if not isinstance(zstore, LocalStore) or not 0 <= start <= start + len(rows) <= arr.shape[0]:
        return False
    if _plain_chunks_layout(arr) and start % arr.chunks[0] == 0 and len(rows) <= arr.chunks[0]:
        chunk = np.zeros(arr.chunks, dtype=np.dtype(arr.dtype).newbyteorder("<"))
        chunk[: len(rows)] = rows
        replace_file(Path(zstore.root) / _chunk_key(arr, start // arr.chunks[0]), _encoded(chunk, arr.metadata.codecs[1]))
        return True
    if not _plain_rows_layout(arr):
        return False
    shard_rows, done = arr.shards[0], 0
    while done < len(rows):
        first = (start + done) // shard_rows * shard_rows
        n = min(len(rows) - done, first + shard_rows - (start + done))
        _write_shard(zstore, arr, first, start + done - first, rows[done : done + n], where)
        done += n
    return True


def _write_shard(zstore, arr, first: int, keep: int, rows: np.ndarray, where: str) -> None:
    """The shard starting at row `first`: its first `keep` rows as stored, then `rows`."""
    shard_rows, inner_rows = arr.shards[0], arr.chunks[0]
    per_shard = shard_rows // inner_rows
    key = _chunk_key(arr, first // shard_rows)
    path = Path(zstore.root) / key
    dtype = np.dtype(arr.dtype).newbyteorder("<")
    whole, cut = divmod(keep, inner_rows)  # inner chunks kept as they are; rows kept of the next one
    parts, index, offset = [], np.full((per_shard, 2), _EMPTY, dtype="<u8"), 0
    head = np.empty((0, *rows.shape[1:]), dtype=dtype)
    if keep:
        try:
            old = path.read_bytes()
        except FileNotFoundError:
            raise _missing(arr, first // shard_rows, where) from None
        old_index = _shard_index(old[-_index_bytes(per_shard):], key, where)
        for c in range(whole + (cut > 0)):
            o, n = _span(old_index, first // inner_rows + c, per_shard, arr, where)
            if c < whole:
                parts.append(old[o : o + n])
                index[c] = (offset, n)
                offset += n
            else:
                head = _decoded(old[o : o + n], f"inner chunk {c} of shard {key}", where, dtype,
                                (inner_rows, *rows.shape[1:]))[:cut]
    new = np.concatenate([head, rows.astype(dtype, copy=False)]) if len(head) else \
        np.ascontiguousarray(rows, dtype=dtype)
    used = -(-len(new) // inner_rows)
    padded = new
    if len(new) % inner_rows:  # zarr pads the last inner chunk with the fill value
        padded = np.zeros((used * inner_rows, *rows.shape[1:]), dtype=dtype)
        padded[: len(new)] = new
    codec = arr.metadata.codecs[0].codecs[1]
    for c in range(used):
        encoded = _encoded(padded[c * inner_rows : (c + 1) * inner_rows], codec)
        parts += encoded
        index[whole + c] = (offset, len(encoded[0]) + 4)
        offset += len(encoded[0]) + 4
    replace_file(path, parts + _with_crc32c(index.tobytes()))


def _decoded(stored: bytes, what: str, where: str, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """An inner chunk's stored bytes (blosc's, then their crc32c), checked and decoded."""
    return np.frombuffer(blosc.decompress(_checked(stored, what, where)), dtype=dtype.newbyteorder("<")).reshape(shape)


def _encoded(block: np.ndarray, codec: BloscCodec) -> list[bytes]:
    """What zarr stores for `block` (C-contiguous, little-endian): blosc's bytes and their crc32c."""
    body = blosc.compress(block, codec.cname.value.encode(), codec.clevel, _SHUFFLE[codec.shuffle],
                          codec.blocksize, codec.typesize)
    return _with_crc32c(body)


def _with_crc32c(body: bytes) -> list[bytes]:
    return [body, google_crc32c.value(body).to_bytes(4, "little")]


def _shard_index(data: bytes, key: str, where: str) -> np.ndarray:
    """A shard's index (its last bytes: per inner chunk, offset and length) as [inner chunks, 2]."""
    return np.frombuffer(_checked(data, f"the index of shard {key}", where), dtype="<u8").reshape(-1, 2)


def _fetch(zstore, requests: list[tuple[str, object]]) -> list[bytes | None]:
    """The bytes of each (key, byte range request) through the zarr store, in one concurrent
    batch; None where the key is absent."""
    return zarr_io.get_many(zstore, requests)
