"""A missing or damaged chunk is CorruptStoreError naming it, never zeros (issue 11): the
values, the sample IDs, the ID index, the offsets, a shard; stored rows holding NaN are refused
before the model changes."""
from __future__ import annotations

import numpy as np
import pytest

import pyunlearn as pu
from tests.support.stores import write_sealed_value
from tests.support.stores import params_copy as _params
from tests.support.stores import record_on as _record
from tests.support.stores import recorded_path as _recorded
from tests.support.stores import same_tensors as _same
from tests.support.stores import sharded_store as _sharded


# ------------------------------------------------------------------ missing chunks

def test_a_missing_values_chunk_is_corruption_not_zeros(tmp_path):
    model, path = _recorded(tmp_path)
    store = pu.UpdateStore.open(path)
    steps = store.steps_for([1000]).steps
    (path / "values" / "c" / str(int(steps[0]) // 4) / "0").unlink()
    before = _params(model)
    with pytest.raises(pu.CorruptStoreError, match=r"chunk values/c/\d+/0 of array 'values' is missing"):
        pu.amnesiac_forget(model, store, [1000])
    assert _same(_params(model), before) and not pu.UpdateStore.open(path, mode="r").ledger.has_deletions


def test_a_missing_sample_ids_chunk_does_not_make_ids_look_unseen(tmp_path):
    _, path = _recorded(tmp_path)
    (path / "sample_ids" / "c" / "0").unlink()
    with pytest.raises(pu.CorruptStoreError, match="sample_ids"):
        pu.UpdateStore.open(path, mode="r").steps_for([1000])


def test_a_missing_chunk_of_the_id_index_does_not_make_ids_look_unseen(tmp_path, monkeypatch):
    monkeypatch.setattr("pyunlearn.store.id_index.TAIL_IDS", 16)  # every commit writes a run
    _, path = _recorded(tmp_path)
    store = pu.UpdateStore.open(path, mode="r")
    assert store.steps_for([1000]).missing.size == 0 and store.metadata.lookup_runs
    for run in store.metadata.lookup_runs:
        for chunk in (path / "lookup" / run.name / "c").rglob("*"):
            if chunk.is_file():
                chunk.unlink()
    with pytest.raises(pu.CorruptStoreError, match="lookup/r"):
        pu.UpdateStore.open(path, mode="r").steps_for([1000])


def test_a_missing_offsets_chunk_is_corruption(tmp_path):
    _, path = _recorded(tmp_path)
    (path / "offsets" / "c" / "0").unlink()
    with pytest.raises(pu.CorruptStoreError, match="offsets"):
        pu.UpdateStore.open(path).truncate(1)  # reads where step 1's IDs end
    assert pu.UpdateStore.open(path, mode="r").steps == 16  # nothing changed


# ------------------------------------------------------------------ damaged chunks and rows

def test_stored_rows_with_nan_are_refused_before_the_model_changes(tmp_path):
    model, path = _recorded(tmp_path, value_dtype="float32")
    store = pu.UpdateStore.open(path)
    steps = store.steps_for([1000, 1001, 1002]).steps
    write_sealed_value(path, int(steps[-1]), 0, np.nan)  # checksum and place-bound digest fine: a recorded NaN
    before = _params(model)
    with pytest.raises(pu.CorruptStoreError, match=f"step {int(steps[-1])} holds NaN or Inf"):
        pu.amnesiac_forget(model, store, [1000, 1001, 1002])
    assert _same(_params(model), before) and not store.ledger.has_deletions


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


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_a_damaged_or_missing_shard_is_corruption(tmp_path, damage):
    model, store = _sharded(tmp_path)
    shard = tmp_path / "s.zarr" / "values" / "c" / "0" / "0"
    if damage == "missing":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x01  # one bit inside an inner chunk
        shard.write_bytes(bytes(data))
    before = _params(model)
    with pytest.raises(pu.CorruptStoreError, match="values"):
        pu.amnesiac_forget(model, store, [1000, 1001, 1002])
    assert _same(_params(model), before) and not store.ledger.has_deletions
