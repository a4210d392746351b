"""Keys to sample IDs (pyunlearn/keys.py): stable IDs under the store's secret, held outside
the store; the wrong or a missing secret, keys on a store of integer IDs and colliding keys are
refused; IdDataset's keys follow the samples through subsets and shuffling."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

import pyunlearn as pu
from tests.support.timeline import SECRET, Year


def test_keys_map_to_stable_ids_and_need_the_right_secret(tmp_path, monkeypatch):
    year = Year(tmp_path / "s.zarr")
    year.train(["alice@example.com", "bob@example.com", str(uuid.UUID(int=7)), "carol"], seed=0)
    store_ids = year.store.ids_for(["alice@example.com", b"alice@example.com"])
    assert store_ids[0] == store_ids[1] and store_ids.dtype == np.int64 and store_ids[0] >= 0
    assert year.store.ids_for([uuid.UUID(int=7)])[0] == year.store.ids_for([str(uuid.UUID(int=7))])[0]
    year.store.close()

    monkeypatch.delenv(pu.keys.SECRET_ENV, raising=False)
    monkeypatch.delenv(pu.keys.SECRET_FILE_ENV, raising=False)
    no_secret = pu.UpdateStore.open(tmp_path / "s.zarr")
    with pytest.raises(pu.KeyMappingError, match="need the store's secret"):
        pu.amnesiac_forget(year.model, no_secret, ["alice@example.com"])
    wrong = pu.UpdateStore.open(tmp_path / "s.zarr", secret="another secret, also long enough")
    with pytest.raises(pu.KeyMappingError, match="not the one .* keys were mapped with"):
        pu.amnesiac_forget(year.model, wrong, ["alice@example.com"])
    (tmp_path / "secret").write_text(SECRET + "\n")
    monkeypatch.setenv(pu.keys.SECRET_FILE_ENV, str(tmp_path / "secret"))
    from_file = pu.UpdateStore.open(tmp_path / "s.zarr")
    assert pu.amnesiac_forget(year.model, from_file, ["alice@example.com"]).steps_removed > 0
    assert from_file.ledger.audit()[0]["keys_digest"] == pu.keys.KeyHasher(SECRET).digest(
        from_file.ids_for(["alice@example.com"]))
    with pytest.raises(ValueError, match="at least 16 bytes"):
        pu.keys.KeyHasher("short")


def test_a_store_created_with_a_secret_records_keys_only(tmp_path):
    """Integer IDs recorded on a store of keys would never match a request by key: refused at the
    batch, before the step. (A store of integers refusing keys: tests/unlearn/test_deletion_requests.py.)"""
    year = Year(tmp_path / "s.zarr")
    optimizer = torch.optim.SGD(year.model.parameters(), lr=0.05)
    with pu.UpdateRecorder(year.model, optimizer, year.store) as rec:
        with pytest.raises(TypeError, match="integer IDs would match nothing"):
            rec.batch([1, 2])
    assert year.store.steps == 0


def test_colliding_keys_are_refused(monkeypatch):
    hasher = pu.keys.KeyHasher(SECRET)
    monkeypatch.setattr(pu.keys, "_ID_MASK", 0)  # every key maps to ID 0: a forced collision
    with pytest.raises(pu.KeyMappingError, match="map to the same sample ID"):
        hasher.ids(["alice", "bob"])
    assert hasher.ids(["alice", b"alice"]).tolist() == [0, 0]  # the same key twice is no collision


def test_id_dataset_keys_survive_subsets_and_reshuffling():
    base = [(torch.full((2,), float(i)), i % 3) for i in range(10)]
    keyed = pu.data.IdDataset(base, key=lambda i: f"row-{i}")
    subset = torch.utils.data.Subset(torch.utils.data.Subset(base, [9, 7, 5, 3]), [2, 0])
    assert [pu.data.IdDataset(subset, key=lambda i: f"row-{i}")[j][0] for j in range(2)] == ["row-5", "row-9"]
    keys, x, _ = next(iter(torch.utils.data.DataLoader(keyed, batch_size=3)))
    assert list(keys) == ["row-0", "row-1", "row-2"] and x[:, 0].tolist() == [0.0, 1.0, 2.0]
    ints = pu.data.IdDataset(subset, key=lambda i: 1000 + i)
    assert ints[0][0].dtype == torch.int64 and int(ints[0][0]) == 1005
    with pytest.raises(TypeError, match="key must be a function"):
        pu.data.IdDataset(base, key="row")
