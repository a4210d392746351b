"""UpdateStore: layout, chunking, lookups, crash safety, locking, corruption, bad input."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore, WrapperStore

import pyunlearn as pu
from tests.support import TinyNet, recorded_store, tiny_data, tiny_training

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(params=["local", "fsspec-memory", "s3"])
def back_end(request, tmp_path):
    """(path, storage_options) of the same store on each back-end: a local folder, an fsspec
    in-memory filesystem, and S3 (moto's server on loopback)."""
    if request.param == "local":
        return str(tmp_path / "s.zarr"), None
    if request.param == "fsspec-memory":
        return f"memory://pyunlearn-tests/{tmp_path.name}/s.zarr", None
    return f"s3://pyunlearn-tests/{tmp_path.name}/s.zarr", request.getfixturevalue("s3_server")


def _where(target):
    """(path, storage_options) from a back_end pair or a plain local path."""
    return target if isinstance(target, tuple) else (str(target), None)


def _open(target, **kwargs):
    path, options = _where(target)
    return pu.UpdateStore.open(path, storage_options=options, **kwargs)


def _create(target, model, **kwargs):
    path, options = _where(target)
    return pu.UpdateStore.create(path, model, storage_options=options, **kwargs)


def _record(target, **options):
    """(model, open store) of recorded_store (keep 0.25, 16 steps by default) on `target`."""
    path, storage_options = _where(target)
    run = recorded_store(path, storage_options=storage_options, **options)
    return run.model, run.store


def test_create_describes_the_model(tmp_path):
    model = TinyNet()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.1)
    assert [layer.name for layer in store.layers] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert store.k == [math.ceil(0.1 * n) for n in (128, 16, 48, 3)] == [13, 2, 5, 1]
    assert [layer.offset for layer in store.layers] == [0, 13, 15, 20]
    attrs = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["format"] == "pyunlearn.update-store" and attrs["format_version"] == 4
    assert attrs["value_dtype"] == "float16" and attrs["row_length"] == 21
    # Every array uses spec codecs only: bytes, blosc, crc32c — inside the spec's sharding codec
    # where the array is sharded (its shard index: bytes, crc32c) — and names its dimensions.
    for name in ("values", "index", "scales", "sample_ids", "offsets"):
        meta = json.loads((tmp_path / "s.zarr" / name / "zarr.json").read_text())
        codecs = meta["codecs"]
        if codecs[0]["name"] == "sharding_indexed":
            assert [c["name"] for c in codecs[0]["configuration"]["index_codecs"]] == ["bytes", "crc32c"], name
            codecs = codecs[0]["configuration"]["codecs"]
        assert [c["name"] for c in codecs] == ["bytes", "blosc", "crc32c"], name
        assert meta["dimension_names"][0] in ("step", "sample", "step_boundary"), name


def test_chunks_follow_a_byte_target(tmp_path):
    small = pu.UpdateStore.create(tmp_path / "a.zarr", TinyNet(), keep=0.1)
    assert small.steps_per_chunk == 16384  # 84 bytes a row: capped
    big_model = torch.nn.Linear(4096, 1024)
    big = pu.UpdateStore.create(tmp_path / "b.zarr", big_model, keep=0.1)
    row_bytes = big.row_length * 4
    assert 1 <= big.steps_per_chunk and big.steps_per_chunk * row_bytes <= 8 << 20
    assert big.steps_per_chunk * row_bytes >= (4 << 20) - row_bytes


def test_append_flush_read_round_trip(back_end):
    model = TinyNet()
    store = _create(back_end, model, keep=0.5, value_dtype="float32", steps_per_chunk=3)
    gen = torch.Generator().manual_seed(0)
    snapshot = [p.detach().clone() for p in store.check_model(model)]
    rows = []
    for step in range(7):
        after = [s + torch.randn(s.shape, generator=gen) for s in snapshot]
        rows.append(pu.kernels.prune_topk(snapshot, after, store.k, "float32"))
        store.append(rows[-1], [step, 100 + step])
    assert store.steps == 6  # two whole chunks written; the seventh row waits in the buffer
    store.flush()
    assert store.steps == 7 and store.samples == 14
    got = store.read([6, 0, 3])
    for field, got_field in zip(rows[0], got):
        assert got_field.dtype == field.dtype
    for j, step in enumerate([6, 0, 3]):
        for a, b in zip(rows[step], (f[j] for f in got)):
            assert torch.equal(a, b)
    again = _open(back_end, mode="r")
    assert again.steps == 7 and torch.equal(again.read([5]).index[0], rows[5].index)


class _ReadLog(WrapperStore):
    def __init__(self, store):
        super().__init__(store)
        self.keys = []

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)


def test_read_touches_only_the_needed_chunks(tmp_path):
    _record(tmp_path / "s.zarr", steps_per_chunk=2, epochs=2)  # 16 steps: 8 chunks
    log = _ReadLog(LocalStore(tmp_path / "s.zarr", read_only=True))
    store = pu.UpdateStore.open(log, mode="r")
    log.keys.clear()
    store.read([5, 4, 11])
    values_chunks = sorted(k for k in log.keys if k.startswith("values/c/"))
    assert values_chunks == ["values/c/2/0", "values/c/5/0"]


def test_steps_for_matches_brute_force(back_end):
    _, store = _record(back_end, epochs=3)
    ids = store._data.read("sample_ids", slice(0, store.samples))
    offsets = store._data.read("offsets", slice(0, store.steps + 1))
    rng = np.random.default_rng(0)
    query = np.concatenate([rng.choice(ids, 7), [5, -3, 10**12]])
    expected = sorted({s for s in range(store.steps) for i in ids[offsets[s]:offsets[s + 1]] if i in set(query)})
    lookup = store.steps_for(query)
    assert lookup.steps.tolist() == expected
    assert lookup.missing.tolist() == [-3, 5, 10**12]


def test_truncate_and_resume(back_end):
    model, store = _record(back_end, steps_per_chunk=3)
    kept = store.read(np.arange(5))
    store.truncate(5)
    assert store.steps == 5 and store.final_fingerprint is None
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        tiny_training(model, optimizer, tiny_data(32, first_id=5000), epochs=1, recorder=rec)
    assert store.steps == 7
    assert all(torch.equal(a, b) for a, b in zip(kept, store.read(np.arange(5))))
    assert store.steps_for([5000]).steps.tolist() in ([5], [6])
    with pytest.raises(ValueError, match=r"step must be an int in \[0, 7\]"):
        store.truncate(8)


def test_truncate_refuses_a_store_with_a_ledger(back_end):
    model, store = _record(back_end)
    pu.amnesiac_forget(model, store, [1000])
    with pytest.raises(pu.StoreError, match="deletions recorded for models or steps past step 1"):
        store.truncate(1)


def test_one_writer_at_a_time_and_readers_see_the_committed_prefix(back_end):
    model = TinyNet()
    writer = _create(back_end, model, keep=0.5, steps_per_chunk=2)
    second = _open(back_end)  # opening is fine; writing is not
    row = pu.kernels.prune_topk([p.detach().clone() for p in writer.check_model(model)],
                            [p.detach() + 1 for p in writer.check_model(model)], writer.k)
    with pytest.raises(pu.StoreLockedError, match=rf"being written by process {os.getpid()}"):
        second.append(row, [1])
    reader = _open(back_end, mode="r")
    writer.append(row, [1])
    reader.refresh()
    assert reader.steps == 0  # buffered, not committed
    writer.append(row, [2])
    reader.refresh()
    assert reader.steps == 2 and reader.steps_for([2]).steps.tolist() == [1]
    writer.close()
    second.append(row, [3])  # the lock is free now
    second.close()
    with pytest.raises(pu.StoreError, match="read-only"):
        reader.append(row, [4])


_CRASHING_TRAINER = r"""
import sys, torch, pyunlearn as pu
from tests.support import TinyNet, tiny_data, tiny_training
path, checkpoints = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = TinyNet()
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
store = pu.UpdateStore.create(path, model, keep=0.5, steps_per_chunk=3)
rec = pu.UpdateRecorder(model, optimizer, store)
def after_step(step):
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f"{checkpoints}/{step}.pt")
    print(step, flush=True)
tiny_training(model, optimizer, tiny_data(), epochs=10**6, recorder=rec, after_step=after_step)
"""


def test_killed_recording_leaves_a_consistent_prefix_and_resumes(tmp_path):
    path, checkpoints = tmp_path / "s.zarr", tmp_path / "ckpt"
    checkpoints.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_TRAINER, str(path), str(checkpoints)],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if int(line) >= 150:  # past two hand-offs of 64 rows to the writer
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = pu.UpdateStore.open(path)
        committed = store.steps
        assert 3 <= committed <= 160 and committed % 3 == 0  # whole chunks only
        offsets = store._data.read("offsets", slice(0, committed + 1))
        assert offsets[-1] == store.samples and np.all(np.diff(offsets) > 0)
        rows = store.read(np.arange(committed))
        pu.kernels.subtract_sparse([torch.zeros(layer.shape) for layer in store.layers], rows, store.k)  # decodes
        resume_at = committed - 1
        store.truncate(resume_at)  # takes over the dead writer's lock
    assert any("no longer runs" in str(w.message) for w in caught)

    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    state = torch.load(checkpoints / f"{resume_at}.pt", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        tiny_training(model, optimizer, tiny_data(32, first_id=7000), epochs=1, recorder=rec)
    assert store.steps == resume_at + 2
    assert store.steps_for([7000]).steps.min() >= resume_at
    report = pu.amnesiac_forget(model, store, [7000])
    assert report.steps_removed == 1


def test_corrupted_chunk_is_a_clear_error(tmp_path):
    _, store = _record(tmp_path / "s.zarr", steps_per_chunk=4)
    store.close()
    chunk = tmp_path / "s.zarr" / "values" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    store = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    store.read([0])  # other chunks still read
    with pytest.raises(pu.CorruptStoreError, match="damaged"):
        store.read([5])


def test_open_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no update store"):
        pu.UpdateStore.open(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w", attributes={"format": "something-else"})
    with pytest.raises(pu.StoreFormatError, match="not a pyunlearn update store"):
        pu.UpdateStore.open(tmp_path / "other.zarr")
    _record(tmp_path / "future.zarr")
    meta = tmp_path / "future.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format_version"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(pu.StoreFormatError, match="format version 99; this pyunlearn .* reads versions 1, 2"):
        pu.UpdateStore.open(tmp_path / "future.zarr")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pu.UpdateStore.create(tmp_path / "other.zarr", TinyNet())


def test_bad_create_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep must be a ratio"):
        pu.UpdateStore.create(tmp_path / "a", TinyNet(), keep=0.0)
    with pytest.raises(ValueError, match="value_dtype"):
        pu.UpdateStore.create(tmp_path / "b", TinyNet(), value_dtype="int8")
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        pu.UpdateStore.create(tmp_path / "c", frozen)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        pu.UpdateStore.create(tmp_path / "d", "model")


def test_bad_lookups(back_end):
    _, store = _record(back_end)
    with pytest.raises(TypeError, match="ids must hold integers"):
        store.steps_for(np.array([1.5]))
    with pytest.raises(ValueError, match="ids is empty"):
        store.steps_for([])
    with pytest.raises(ValueError, match=r"steps must lie in \[0, 16\)"):
        store.read([16])
    with pytest.raises(ValueError, match="row.index must be uint32"):
        store.append(pu.Row(torch.zeros(3, dtype=torch.int32), torch.zeros(3), torch.zeros(4)), [1])


def test_stats(back_end):
    _, store = _record(back_end, keep=0.25)
    stats = store.stats()
    assert stats.steps == 16 and stats.samples == 240
    assert stats.dense_bytes == (128 + 16 + 48 + 3) * 4 * 16
    assert stats.total_bytes == sum(stats.bytes_on_disk.values())
    floor = sum(-(k / n * math.log2(k / n) + (1 - k / n) * math.log2(1 - k / n)) * n
                for k, n in zip(store.k, (128, 16, 48, 3)) if k < n) / sum(store.k)
    assert stats.index_floor_bits_per_entry == pytest.approx(floor)
    assert "dense float32 equivalent" in stats.table()


def test_reads_a_store_written_by_version_0_1(tmp_path):
    """tests/fixtures/v0.1-tinynet.zarr was written by pyunlearn 0.1.0 (format version 1)."""
    store = pu.UpdateStore.open(FIXTURES / "v0.1-tinynet.zarr", mode="r")
    assert store.steps == 8 and store.value_dtype == "float16"
    expected = json.loads((FIXTURES / "v0.1-tinynet.json").read_text())
    assert store.steps_for([1003]).steps.tolist() == expected["steps_of_1003"]
    assert store.read([7]).index[0].tolist() == expected["index_of_step_7"]


def test_store_works_on_each_back_end(back_end):
    path, options = back_end
    model, store = _record(back_end, steps_per_chunk=3)
    assert store.steps == 16
    reader = pu.UpdateStore.open(path, mode="r", storage_options=options)
    assert reader.steps == 16 and torch.equal(reader.read([7]).index, store.read([7]).index)
    assert reader.steps_for([1005]).steps.tolist() == store.steps_for([1005]).steps.tolist()
    with pytest.raises(pu.StoreLockedError) as locked:
        pu.UpdateStore.open(path, storage_options=options).truncate(3)  # the recording handle holds the lock
    report = pu.amnesiac_forget(model, store, [1000, 1001])
    assert report.steps_removed == store.steps_for([1000, 1001]).steps.size > 0
    store.close()
    again = pu.UpdateStore.open(path, storage_options=options)
    assert len(again.ledger.removed_steps) == report.steps_removed
    pu.amnesiac_forget(model, again, [1002])  # the lock is free again; forgetting continues the ledger
    with pytest.raises(FileNotFoundError) as missing:
        pu.UpdateStore.open(path + "-missing", storage_options=options)
    for error in (locked.value, missing.value):
        assert "never-print-this-secret" not in str(error) and "never-print-this-secret" not in repr(store)
