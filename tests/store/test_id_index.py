"""The sample-ID index (pyunlearn/store/id_index.py) finds exactly what a scan of every stored
ID finds: across runs, merges, the unindexed tail, truncation, stores written before it
existed, and on every back-end."""
from __future__ import annotations


from pathlib import Path

import numpy as np
import pytest

import pyunlearn as pu
from pyunlearn.store.id_index import SampleIndex
from tests.support import TinyNet
from tests.support.stores import record_on as _record
from tests.support.stores import stored_ids


def _brute_force(store, ids):
    stored, offsets = stored_ids(store)
    found = SampleIndex(stored, offsets).lookup(np.unique(ids))
    return found.steps.tolist(), found.missing.tolist()


def _row(store):
    params = [p.detach() for p in store.check_model(TinyNet())]
    return pu.kernels.prune_topk([p.clone() for p in params], [p + 1 for p in params], store.k, refresh=False)


@pytest.mark.parametrize("tail_ids", [1, 7, 40, 1 << 16])
def test_lookups_match_a_full_scan(tmp_path, monkeypatch, tail_ids):
    monkeypatch.setattr("pyunlearn.store.id_index.TAIL_IDS", tail_ids)
    monkeypatch.setattr("pyunlearn.store.metadata.IDS_PER_INNER_CHUNK", 8)  # many inner chunks per run
    monkeypatch.setattr("pyunlearn.store.id_index.IDS_PER_INNER_CHUNK", 8)
    rng = np.random.default_rng(tail_ids)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", TinyNet(), steps_per_chunk=3)
    row = _row(store)
    for step in range(90):
        store.append(row, rng.integers(0, 300, size=int(rng.integers(0, 9))))  # repeats, empty steps
        if step % 17 == 16:
            store.flush()
        if step == 60:
            store.flush()
            store.truncate(44)  # a cut inside a run
    store.flush()
    reader = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    if tail_ids < 100:
        assert len(reader.metadata.lookup_runs) >= 2  # merges keep them few, but some exist
    for ids in ([5], list(range(0, 300, 7)), rng.integers(0, 400, 50).tolist(), list(range(300, 310))):
        got = reader.steps_for(ids)
        assert (got.steps.tolist(), got.missing.tolist()) == _brute_force(reader, ids)


def test_runs_stay_few(tmp_path, monkeypatch):
    monkeypatch.setattr("pyunlearn.store.id_index.TAIL_IDS", 4)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", TinyNet(), steps_per_chunk=2)
    row = _row(store)
    for step in range(512):
        store.append(row, [step, step + 1000])
    store.flush()
    runs = store.metadata.lookup_runs
    assert len(runs) <= 2 * np.log2(512 * 2)  # O(log n)
    assert [r.step_from for r in runs[1:]] == [r.step_to for r in runs[:-1]]
    assert sorted(p.name for p in (tmp_path / "s.zarr" / "lookup").iterdir() if p.is_dir()) == \
        sorted(r.name for r in runs)  # merged-away runs are deleted


def test_a_store_without_the_index_is_scanned_then_indexed(tmp_path, monkeypatch):
    """A format-2 store (no index; written by pyunlearn 0.2.0) is searched by its CSR arrays;
    steps written after its conversion go into runs; both are found."""
    import shutil

    monkeypatch.setattr("pyunlearn.store.id_index.TAIL_IDS", 4)
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "v0.2-format2.zarr", tmp_path / "s.zarr")
    old = pu.UpdateStore.open(tmp_path / "s.zarr")
    first = old.steps
    assert old.metadata.lookup_from == first and not old.metadata.lookup_runs
    scanned = int(old.step_ids([2])[0][0])  # an ID step 2 used, found by the scan
    assert 2 in old.steps_for([scanned]).steps.tolist()
    row = _row(old)
    for step in range(first, first + 20):
        old.append(row, [10_000 + step])
    old.flush()
    assert old.metadata.lookup_runs and old.metadata.lookup_from == first
    again = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    got = again.steps_for([scanned, 10_000 + first + 5, 99_999])
    assert 2 in got.steps.tolist() and first + 5 in got.steps.tolist() and got.missing.tolist() == [99_999]


def test_steps_for_matches_brute_force(back_end):
    _, store = _record(back_end, epochs=3)
    ids, offsets = stored_ids(store)
    rng = np.random.default_rng(0)
    query = np.concatenate([rng.choice(ids, 7), [5, -3, 10**12]])
    expected = sorted({s for s in range(store.steps) for i in ids[offsets[s]:offsets[s + 1]] if i in set(query)})
    lookup = store.steps_for(query)
    assert lookup.steps.tolist() == expected
    assert lookup.missing.tolist() == [-3, 5, 10**12]
