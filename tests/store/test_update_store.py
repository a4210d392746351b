"""UpdateStore: appending, flushing and reading rows, truncating, readers beside the writer, bad
lookups, the stats, and the same on every back-end (a local folder, an fsspec in-memory
filesystem, S3 on loopback)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from zarr.storage import LocalStore, WrapperStore

import pyunlearn as pu
from tests.support import TinyNet, tiny_data, tiny_training
from tests.support.stores import create_store as _create
from tests.support.stores import open_store as _open
from tests.support.stores import record_on as _record
from tests.support.stores import recorded_path as _recorded


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


def test_truncate_refuses_a_store_with_a_pending_deletion(tmp_path):
    model, path = _recorded(tmp_path)
    pu.amnesiac_forget(model, pu.UpdateStore.open(path), [1000], commit=False)
    with pytest.raises(pu.StoreError, match="deletions recorded for models or steps past step 3"):
        pu.UpdateStore.open(path).truncate(3)


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
