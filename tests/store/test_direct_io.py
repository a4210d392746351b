"""pyunlearn's own reads and writes of Zarr files, held to zarr's: rows read straight from shards
equal zarr's, appends written straight to shards and chunks are the bytes zarr writes, the group
document saved straight is the one zarr writes, and a reader racing a writer sees one version
of a shard. Layouts these paths do not handle are left to zarr."""
from __future__ import annotations

import numpy as np
import pytest

import pyunlearn as pu
from tests.support.stores import sharded_store as _sharded


# ------------------------------------------------------------------ the shard reader

def test_rows_read_from_shards_equal_zarrs(tmp_path):
    import zarr

    _, store = _sharded(tmp_path)
    steps = np.array([11, 0, 5, 5, 15])
    rows = store.read(steps)
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    for name, got in zip(("index", "values", "scales"), rows):
        assert np.array_equal(got.numpy(), group[name].oindex[steps, :]), name


def test_the_shard_reader_leaves_big_endian_arrays_to_zarr(tmp_path):
    import zarr
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    from pyunlearn.store.location import zarr_store
    from pyunlearn.store.shards import read_rows

    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    arr = group.create_array("a", shape=(8, 3), dtype="float32", chunks=(2, 3), shards=(4, 3),
                             serializer=BytesCodec(endian="big"), compressors=[BloscCodec(), Crc32cCodec()])
    arr[:] = np.arange(24, dtype="float32").reshape(8, 3)
    zstore, _ = zarr_store(str(tmp_path / "g.zarr"), None, read_only=True)
    assert read_rows(zstore, arr, np.array([1, 5]), "g") is None  # not the store's layout: zarr reads it


def test_a_reader_sees_one_version_of_a_shard_a_writer_replaces_meanwhile(tmp_path, monkeypatch):
    """The reader opens a shard once: its index and its inner chunks come from the same file even
    when the writer appends to the shard between the two (rewriting the inner chunk the reader
    wants), where reading the chunk from the new file at the old offset fails its checksum."""
    import os

    from pyunlearn.store import shards as _shards

    (_, _), (zstore, arr) = _twin_arrays(tmp_path, "int64", (512,), (64,), (256,))
    first = np.arange(100, 170)
    assert _shards.write_rows(zstore, arr, 0, first, "s")  # rows 64-69 sit in a part-filled inner chunk
    later = np.random.default_rng(0).integers(0, 2**62, 58)  # fills it: its compressed length changes
    real_pread, calls = os.pread, []

    def pread_then_append(fd, n, offset):
        data = real_pread(fd, n, offset)
        calls.append(n)
        if len(calls) == 1:  # the index is read: now the writer appends to the same inner chunk
            assert _shards.write_rows(zstore, arr, 70, later, "s")
        return data

    monkeypatch.setattr(_shards.os, "pread", pread_then_append)
    assert _shards.read_rows(zstore, arr, np.array([64, 69]), "s").tolist() == [164, 169]
    assert len(calls) == 2
    monkeypatch.setattr(_shards.os, "pread", real_pread)
    assert _shards.read_rows(zstore, arr, np.array([69, 70]), "s").tolist() == [169, later[0]]


def test_a_reader_through_zarr_rereads_a_shard_a_writer_replaced_between_its_requests(tmp_path, monkeypatch):
    """Through a zarr store (S3, memory) the index and the chunks are two requests; a writer that
    replaces the shard between them makes the chunks fail their checksums, and the reader reads
    once more instead of calling the store damaged. Real damage still fails."""
    import zarr
    from zarr.storage import MemoryStore

    from pyunlearn.store import shards as _shards
    from pyunlearn.store.metadata import codecs

    zstore = MemoryStore()
    arr = zarr.open_group(zstore, mode="w").create_array(
        "a", shape=(512,), dtype="int64", fill_value=0, chunks=(64,), shards=(256,),
        compressors=codecs(8, "zstd:1"), config={"write_empty_chunks": True})
    arr[0:70] = np.arange(100, 170)
    later = np.random.default_rng(0).integers(0, 2**62, 58)
    real_fetch, calls = _shards._fetch, []

    def fetch_then_append(store, requests):
        out = real_fetch(store, requests)
        calls.append(len(requests))
        if len(calls) == 1:  # after the index: the writer fills the inner chunk the reader wants
            arr[0:128] = np.concatenate([np.arange(100, 170), later])
        return out

    monkeypatch.setattr(_shards, "_fetch", fetch_then_append)
    assert _shards.read_rows(zstore, arr, np.array([64, 69]), "s").tolist() == [164, 169]
    assert len(calls) == 4  # index, chunks (stale), index, chunks

    key = "a/c/0"
    data = bytearray(zarr.core.sync.sync(zstore.get(key, zarr.core.buffer.default_buffer_prototype())).to_bytes())
    data[10] ^= 0x01  # one bit inside inner chunk 0
    zarr.core.sync.sync(zstore.set(key, zarr.core.buffer.default_buffer_prototype().buffer.from_bytes(bytes(data))))
    with pytest.raises(pu.CorruptStoreError, match="inner chunk 0 of array 'a' fails its crc32c"):
        _shards.read_rows(zstore, arr, np.array([1]), "s")


# ------------------------------------------------------------------ the shard writer

def _twin_arrays(tmp_path, dtype, shape, chunks, shards):
    """The same array in two local folders: one written by zarr, one by write_rows."""
    import zarr
    from zarr.storage import LocalStore

    from pyunlearn.store.metadata import codecs

    made = []
    for name in ("by-zarr", "by-pyunlearn"):
        zstore = LocalStore(str(tmp_path / name))
        arr = zarr.open_group(zstore, mode="w").create_array(
            "a", shape=shape, dtype=dtype, fill_value=0, chunks=chunks, shards=shards,
            compressors=codecs(np.dtype(dtype).itemsize, "zstd:1"), config={"write_empty_chunks": True})
        made.append((zstore, arr))
    return made


def _shard_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted((folder / "a" / "c").rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("dtype, tail", [("float16", (37,)), ("uint32", (37,)), ("int64", ())])
def test_appends_written_straight_to_shards_are_the_bytes_zarr_writes(tmp_path, dtype, tail):
    from pyunlearn.store.shards import write_rows

    (zstore_z, by_zarr), (zstore_p, ours) = _twin_arrays(tmp_path, dtype, (40, *tail), (3, *tail), (12, *tail))
    rng = np.random.default_rng(0)
    # Appends as the store makes them: from a shard's start (the rows), and from anywhere (the
    # IDs and offsets): inside an inner chunk, on its boundary, across shards, one row, many.
    start = 0
    for count in (5, 1, 6, 2, 13, 4, 9):
        rows = (rng.standard_normal((count, *tail)) * 1000).astype(dtype)
        by_zarr[start : start + count] = rows
        assert write_rows(zstore_p, ours, start, rows, "test")
        start += count
        assert _shard_files(tmp_path / "by-pyunlearn") == _shard_files(tmp_path / "by-zarr"), (start, count)
    assert np.array_equal(ours[:start], by_zarr[:start])
    assert not list((tmp_path / "by-pyunlearn").rglob("*.partial"))  # no temporary file left behind


def test_chunk_writes_of_an_unsharded_array_are_the_bytes_zarr_writes(tmp_path):
    from pyunlearn.store.shards import write_rows

    (_, by_zarr), (zstore, ours) = _twin_arrays(tmp_path, "float64", (24, 4), (8, 4), None)
    rng = np.random.default_rng(1)
    for start, count in ((0, 3), (0, 8), (8, 5), (8, 8), (16, 1)):  # a chunk flushed part-filled, then whole
        rows = rng.standard_normal((count, 4))
        by_zarr[start : start + count] = rows
        assert write_rows(zstore, ours, start, rows, "test")
        assert _shard_files(tmp_path / "by-pyunlearn") == _shard_files(tmp_path / "by-zarr"), (start, count)
    assert not write_rows(zstore, ours, 3, rows, "test")  # not from a chunk's start: zarr merges it


def test_the_shard_writer_leaves_other_stores_and_layouts_to_zarr(tmp_path):
    import zarr
    from zarr.storage import MemoryStore

    from pyunlearn.store.shards import write_rows

    (_, _), (zstore, arr) = _twin_arrays(tmp_path, "float32", (8, 3), (2, 3), (4, 3))
    rows = np.ones((2, 3), dtype="float32")
    memory = MemoryStore()
    in_memory = zarr.open_group(memory, mode="w").create_array("a", shape=(8, 3), dtype="float32", chunks=(2, 3),
                                                                shards=(4, 3))
    assert not write_rows(memory, in_memory, 0, rows, "m")  # not a local folder
    assert not write_rows(zstore, arr, 7, rows, "t")  # past the array's end: zarr says what is wrong
    other_codecs = zarr.open_group(zstore, mode="a").create_array("b", shape=(8, 3), dtype="float32", chunks=(2, 3))
    assert not write_rows(zstore, other_codecs, 0, rows, "t")  # zarr's default codecs (zstd, no checksum)


def test_an_append_to_a_shard_that_vanished_is_corruption(tmp_path):
    from pyunlearn.store.shards import write_rows

    (_, _), (zstore, arr) = _twin_arrays(tmp_path, "int64", (24,), (4,), (12,))
    assert write_rows(zstore, arr, 0, np.arange(5), "s.zarr")
    (tmp_path / "by-pyunlearn" / "a" / "c" / "0").unlink()
    with pytest.raises(pu.CorruptStoreError, match="shard a/c/0 .* is missing"):
        write_rows(zstore, arr, 5, np.arange(3), "s.zarr")


def test_attributes_saved_straight_to_a_local_folder_are_the_document_zarr_writes(tmp_path):
    import json

    import zarr
    from zarr.storage import LocalStore

    from pyunlearn.store.arrays import save_attributes

    groups = {}
    for name in ("by-zarr", "by-pyunlearn"):
        zstore = LocalStore(str(tmp_path / name))
        groups[name] = (zstore, zarr.open_group(zstore, mode="w", zarr_format=3, attributes={"a": 1, "keep": "x"}))
    for attrs in ({"a": 2, "b": [1.5, None, "ü"]}, {"ledger": {"records": list(range(50))}, "a": 3}):
        groups["by-zarr"][1].attrs.put(attrs)  # replaced whole, as save_attributes does
        by_zarr = zarr.open_group(tmp_path / "by-zarr", mode="r").attrs.asdict()
        assert by_zarr == attrs
        zstore, group = groups["by-pyunlearn"]
        assert save_attributes(zstore, group, attrs).attrs.asdict() == by_zarr
        documents = [json.loads((tmp_path / name / "zarr.json").read_bytes()) for name in ("by-pyunlearn", "by-zarr")]
        assert documents[0] == documents[1]
    reread = zarr.open_group(tmp_path / "by-pyunlearn", mode="r").attrs.asdict()
    assert reread == {"ledger": {"records": list(range(50))}, "a": 3}
