"""Data bound to its place (issue 24, case 3): a shard swapped with another shard of the same
array, or copied from another store, passes every crc32c; its place-bound digests refuse it on
the rows a forget reads, before the model or the log change, naming the shard."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.store.verify import verify
from tests.support import recorded_store


def _store(path, seed: int = 0):
    # 4 steps per shard: the 16 steps of two epochs of 120 samples fill 4 shards of each row array
    return recorded_store(path, keep=0.25, steps_per_chunk=4, seed=seed)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _swap(a, b):
    moved = a.with_suffix(".tmp")
    a.rename(moved)
    b.rename(a)
    moved.rename(b)


@pytest.mark.parametrize("array", ["values", "index", "scales"])
def test_a_swapped_row_shard_is_refused_before_anything_changes(tmp_path, array):
    recorded = _store(tmp_path / "s.zarr")
    store, model = recorded.store, recorded.model
    steps = store.steps_for([1003]).steps
    assert steps.size and len({int(s) // 4 for s in steps}) < 4  # the sample's steps leave a shard untouched
    shard = int(steps[0]) // 4
    other = next(i for i in range(4) if i not in {int(s) // 4 for s in steps})
    store.close()
    folder = tmp_path / "s.zarr" / array / "c"
    _swap(folder / str(shard) / "0", folder / str(other) / "0")
    before, log = _state(model), sorted(p.name for p in (tmp_path / "s.zarr" / "log").iterdir())
    reopened = pu.UpdateStore.open(tmp_path / "s.zarr")
    with pytest.raises(pu.CorruptStoreError, match=rf"not the one written for that step.*{array}/c/{shard}/0"):
        pu.amnesiac_forget(model, reopened, [1003])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert sorted(p.name for p in (tmp_path / "s.zarr" / "log").iterdir()) == log
    failed = [f for f in verify(pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")) if not f.ok]
    assert [f.check for f in failed] == ["data"]


def test_a_shard_copied_from_another_store_is_refused(tmp_path):
    """Same model, same layout, same step: only the store's identity tells the shards apart."""
    recorded = _store(tmp_path / "a.zarr", seed=0)
    twin = _store(tmp_path / "b.zarr", seed=0)  # the same training run, another store
    recorded.store.close()
    twin.store.close()
    shard = int(recorded.store.steps_for([1003]).steps[0]) // 4
    for array in ("values", "index", "scales"):  # bit-identical rows: the copy changes no value at all
        source = tmp_path / "b.zarr" / array / "c" / str(shard) / "0"
        assert source.read_bytes() == (tmp_path / "a.zarr" / array / "c" / str(shard) / "0").read_bytes()
    shutil.copy(tmp_path / "b.zarr" / "step_digests" / "c" / str(shard) / "0",
                tmp_path / "a.zarr" / "step_digests" / "c" / str(shard) / "0")
    with pytest.raises(pu.CorruptStoreError, match="copied from another store"):
        pu.amnesiac_forget(recorded.model, pu.UpdateStore.open(tmp_path / "a.zarr"), [1003])


def test_swapped_sample_ids_are_refused_where_they_are_read(tmp_path):
    """The IDs of each step are bound to it too: a lookup scanning them, and repair reading a
    step's batch, refuse IDs that are not the ones written there."""
    recorded = _store(tmp_path / "s.zarr")
    recorded.store.close()
    root = tmp_path / "s.zarr"
    offsets = pu.UpdateStore.open(root, mode="r")
    step_ids = offsets.step_ids([0, 1])
    assert not np.array_equal(step_ids[0], step_ids[1])
    import zarr

    ids = zarr.open_array(str(root / "sample_ids"), mode="r+")
    first = ids[0:16].copy()
    ids[0:16] = ids[16:32]
    ids[16:32] = first  # each chunk rewritten through zarr: every crc32c is right
    store = pu.UpdateStore.open(root, mode="r")
    with pytest.raises(pu.CorruptStoreError, match="sample IDs of step 0"):
        store.step_ids([0])
    with pytest.raises(pu.CorruptStoreError, match="sample IDs of step"):
        store.steps_for([1003])


def test_an_id_index_run_moved_or_edited_is_refused(tmp_path):
    """Runs of the ID index carry a digest per inner chunk and the run table pins their
    attributes: an edited fence (which would skip a chunk, hiding a sample's steps) is refused."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for step in range(40):  # 40 steps of 2,048 IDs: past the 65,536-ID tail, so runs are written
            rec.batch(torch.arange(step * 2048, (step + 1) * 2048))
            optimizer.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
    store.close()
    reader = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    assert reader.metadata.lookup_runs and reader.steps_for([5000]).steps.tolist() == [2]
    run = reader.metadata.lookup_runs[0]
    import zarr

    arr = zarr.open_array(str(tmp_path / "s.zarr" / "lookup" / run.name), mode="r+")
    fences = list(arr.attrs["fences"])
    arr.attrs["fences"] = [fences[0]] + [f + 1 for f in fences[1:]]
    with pytest.raises(pu.CorruptStoreError, match=f"run lookup/{run.name} is not the one"):
        pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").steps_for([5000])
    assert [f.check for f in verify(pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")) if not f.ok] == ["data"]
