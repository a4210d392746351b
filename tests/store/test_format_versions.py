"""Stores of every format version (tests/fixtures/, written by the releases that had them) still
read as they were, forget as they did, and convert to format 5 at their first write: the ledger
into the audit log, the forgotten IDs in effect, the key mapping they were recorded with."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.store.verify import verify
from tests.support import TinyNet

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FACTS = json.loads((FIXTURES / "v0.2-formats.json").read_text())
SECRET = FACTS["v0.2-format4-keys"]["secret"]


def _copy(tmp_path, name: str) -> Path:
    shutil.copytree(FIXTURES / f"{name}.zarr", tmp_path / f"{name}.zarr")
    return tmp_path / f"{name}.zarr"


def _model(state: dict) -> TinyNet:
    model = TinyNet()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("name, version", [("v0.1-tinynet", 1), ("v0.2-format2", 2), ("v0.2-format3", 3),
                                           ("v0.2-format4-gradient", 4), ("v0.2-format4-keys", 4)])
def test_every_version_reads_as_its_own_release_wrote_it(name, version):
    store = pu.UpdateStore.open(FIXTURES / f"{name}.zarr", mode="r", secret=SECRET)
    assert store.metadata.format_version == version and store.metadata.legacy is not None
    assert store.final_steps == store.steps  # each fixture's last segment ended its recording
    assert not [f for f in verify(store) if not f.ok]


def test_a_format_4_store_of_keys_keeps_its_timeline(tmp_path):
    facts = FACTS["v0.2-format4-keys"]
    store = pu.UpdateStore.open(FIXTURES / "v0.2-format4-keys.zarr", mode="r", secret=SECRET)
    assert [row["request"] for row in store.ledger.audit()] == facts["requests"]
    assert [row["status"] for row in store.ledger.audit()] == facts["statuses"]
    assert store.ledger.removed_steps.tolist() == facts["removed_steps"]
    assert store.ledger.pending.removed.tolist() == facts["pending_steps"]
    assert store.forgotten_ids().tolist() == sorted(facts["forgotten_ids"])
    assert store.steps_for(["user3@example.com"]).steps.tolist() == facts["steps_of_user3"]  # mapped as recorded
    assert store.metadata.key_mapping == 1


def test_a_format_4_store_converts_at_its_first_write_and_goes_on(tmp_path):
    path = _copy(tmp_path, "v0.2-format4-keys")
    models = torch.load(FIXTURES / "v0.2-format4-keys.models.pt")
    store = pu.UpdateStore.open(path, secret=SECRET)
    saved = _model(models["after3"])  # REQ-3 was pending: its model is the one saved
    report = pu.amnesiac_forget(saved, store, ["user10@example.com"], request_id="REQ-4")
    assert report.status == "applied"
    store.close()
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    assert attrs["format_version"] == 5 and "ledger" not in attrs and attrs["key_mapping"] == 1
    assert attrs["digests_from"] == FACTS["v0.2-format4-keys"]["steps"]
    reader = pu.UpdateStore.open(path, mode="r", secret=SECRET)
    assert [(row["request"], row["status"]) for row in reader.ledger.audit()] == [
        ("REQ-1", "applied"), ("REQ-2", "undone"), ("REQ-3", "applied"), ("REQ-4", "applied")]
    assert not [f for f in verify(reader) if not f.ok]
    assert reader.steps_for(["user3@example.com"]).steps.tolist() == FACTS["v0.2-format4-keys"]["steps_of_user3"]
    # a checkpoint from before the first request catches up with everything in effect, REQ-2 not included
    old = _model(models["segment1"])
    expected = _model(models["segment1"])
    pu.amnesiac_forget(old, pu.UpdateStore.open(path, secret=SECRET), [])
    steps = reader.ledger.removed_steps
    steps = steps[steps < reader.ledger.records[0].model.steps]
    params = [p.detach() for p in expected.parameters() if p.requires_grad]
    pu.kernels.subtract_sparse_reference(params, reader.read(steps), reader.k)
    assert all(torch.equal(a, b) for a, b in zip(params, [p.detach() for p in old.parameters() if p.requires_grad]))


def test_a_format_4_gradient_store_forgets_as_its_release_did(tmp_path):
    path = _copy(tmp_path, "v0.2-format4-gradient")
    models = torch.load(FIXTURES / "v0.2-format4-gradient.models.pt")
    model = _model(models["final"])
    report = pu.amnesiac_forget(model, pu.UpdateStore.open(path), [])  # catches up with G-1
    assert report.status == "caught-up"
    expected = models["after"]
    assert all(torch.allclose(model.state_dict()[k], v, atol=1e-7) for k, v in expected.items())


@pytest.mark.parametrize("version", [2, 3])
def test_formats_2_and_3_convert_and_keep_their_deletions(tmp_path, version):
    name = f"v0.2-format{version}"
    path = _copy(tmp_path, name)
    final = _model(torch.load(FIXTURES / f"{name}.final.pt")["final"])
    store = pu.UpdateStore.open(path)
    report = pu.amnesiac_forget(final, store, [1010], request_id="NEW")
    store.close()
    reader = pu.UpdateStore.open(path, mode="r")
    assert reader.metadata.format_version == 5
    if version == 3:  # its deletion converted into a record, applied to the final model first
        assert reader.ledger.audit()[0]["request"] == "before-format-4"
        assert report.steps_applied == np.union1d(FACTS[name]["removed_steps"], reader.steps_for([1010]).steps).size
    assert not [f for f in verify(reader) if not f.ok]


def test_a_format_3_store_with_a_deletion_trains_on_from_the_deletions_model_only(tmp_path):
    """Format 3 refused training after a deletion; converted, the deletion's model is where
    training goes on, and the final model (which still holds the deleted steps) is refused."""
    name = "v0.2-format3"
    path = _copy(tmp_path, name)
    store = pu.UpdateStore.open(path)
    assert [m.made_by for m in store.ledger.models] == ["training", "deletion"]
    final = _model(torch.load(FIXTURES / f"{name}.final.pt")["final"])
    with pytest.raises(pu.RecorderError, match="deletion requests came in after this model"):
        _one_step(final, store)
    assert store.steps == FACTS[name]["steps"]
    _one_step(_model(torch.load(FIXTURES / f"{name}.models.pt")["after"]), store)
    assert store.steps == FACTS[name]["steps"] + 1 and store.metadata.format_version == 5
    assert store.ledger.removed_steps.tolist() == FACTS[name]["removed_steps"]


def _one_step(model, store):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        rec.batch([2000])
        model(torch.randn(1, 8)).sum().backward()
        optimizer.step()


def test_a_store_relabelled_with_an_older_version_is_refused(tmp_path):
    from pyunlearn.store.metadata import attrs_checksum
    from tests.support import recorded_store

    recorded_store(tmp_path / "s.zarr", close=True)
    document = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    attrs = document["attributes"]
    attrs["format_version"] = 4
    attrs["checksum"] = attrs_checksum({k: v for k, v in attrs.items() if k != "checksum"})
    (tmp_path / "s.zarr" / "zarr.json").write_text(json.dumps(document))
    with pytest.raises(pu.CorruptStoreError, match="claim format version 4 but hold fields of a later version"):
        pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    attrs["format_version"] = 5
    attrs["added_by_someone"] = 1
    attrs["checksum"] = attrs_checksum({k: v for k, v in attrs.items() if k != "checksum"})
    (tmp_path / "s.zarr" / "zarr.json").write_text(json.dumps(document))
    with pytest.raises(pu.CorruptStoreError, match="does not define \\(added_by_someone\\)"):
        pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
