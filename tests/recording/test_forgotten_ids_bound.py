"""Forgotten samples stay forgotten (issue 24, case 7): the recorder refuses a batch holding a
sample a request asked to forget, and the list it checks is bound to the audit log, so a
forgotten-ID array rewritten through zarr or copied from another store is refused, not trusted."""
from __future__ import annotations

import shutil

import pytest
import torch
import zarr

import pyunlearn as pu
from tests.support import recorded_store


def _optimizer(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)


def test_a_rewritten_forgotten_array_is_refused_before_recording(tmp_path):
    recorded = recorded_store(tmp_path / "s.zarr")
    pu.amnesiac_forget(recorded.model, recorded.store, [1003, 1004])
    recorded.store.close()
    forgotten = zarr.open_array(str(tmp_path / "s.zarr" / "forgotten"), mode="r+")
    assert forgotten[:2].tolist() == [1003, 1004]
    forgotten[0] = 1005  # 1003 would be trainable again; every crc32c is right
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    with pytest.raises(pu.CorruptStoreError, match="forgotten_ids does not hold the IDs"):
        pu.UpdateRecorder(recorded.model, _optimizer(recorded.model), store)


def test_a_forgotten_array_copied_from_another_store_is_refused(tmp_path):
    a = recorded_store(tmp_path / "a.zarr")
    b = recorded_store(tmp_path / "b.zarr")
    pu.amnesiac_forget(a.model, a.store, [1003, 1004])
    pu.amnesiac_forget(b.model, b.store, [1007, 1008])  # as many IDs: only their values differ
    a.store.close()
    b.store.close()
    shutil.rmtree(tmp_path / "a.zarr" / "forgotten")
    shutil.copytree(tmp_path / "b.zarr" / "forgotten", tmp_path / "a.zarr" / "forgotten")
    with pytest.raises(pu.CorruptStoreError, match="copied from another store"):
        pu.UpdateStore.open(tmp_path / "a.zarr").forgotten_ids()


def test_forgotten_samples_are_refused_by_the_recorder_after_reopening(tmp_path):
    recorded = recorded_store(tmp_path / "s.zarr")
    pu.amnesiac_forget(recorded.model, recorded.store, [1003])
    recorded.store.close()
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    with pu.UpdateRecorder(recorded.model, _optimizer(recorded.model), store) as rec:
        with pytest.raises(pu.RecorderError, match=r"deletion was requested \(IDs \[1003\]"):
            rec.batch([1002, 1003])
