"""The storage side's parts on their own: errors, the ledger's rule, the metadata value, the
write session and the attribution lookup."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn import attribution, errors
from pyunlearn.store.metadata import StoreMetadata, attrs_checksum
from pyunlearn.ledger import Ledger
from tests.support import TinyNet, recorded_store
from tests.support.old_formats import as_format_2


@pytest.mark.parametrize("error, builtin", [
    (errors.StoreError, RuntimeError), (errors.StoreLockedError, RuntimeError),
    (errors.StoreNotFoundError, FileNotFoundError), (errors.StoreFormatError, ValueError),
    (errors.CorruptStoreError, OSError), (errors.ModelMismatchError, ValueError),
    (errors.NonFiniteUpdateError, ValueError), (errors.RecorderError, RuntimeError),
])
def test_every_error_is_a_pyunlearn_error_and_a_builtin(error, builtin):
    assert issubclass(error, errors.PyunlearnError) and issubclass(error, builtin)
    assert str(error("what happened")) == "what happened"


def test_a_missing_store_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no update store") as caught:
        pu.UpdateStore.open(tmp_path / "nothing.zarr")
    assert isinstance(caught.value, pu.StoreError)


# ------------------------------------------------------------------ the ledger's rule
NOW = "2026-01-01T00:00:00.000+00:00"


def _delete(ledger, requested, model_fp, after_fp, *, pending=False):
    plan = ledger.plan(np.asarray(requested, dtype=np.int64), model_fingerprint=model_fp, where="s.zarr", now=NOW)
    after = plan.base.with_deletion(plan, fingerprint_after=after_fp, request_id="r", keys=1, keys_digest=None,
                                    missing_keys=0, method="amnesiac", params={}, version="test", pending=pending,
                                    now=NOW)
    return plan, after


def _timeline():
    """Segment 1 (steps 0-9) ends with model A; a deletion of steps 2 and 5 gives B; segment 2
    (steps 10-19) trains B into C."""
    ledger = Ledger.empty().with_training_end("A", 10, 0)
    _, ledger = _delete(ledger, [2, 5], "A", "B")
    return ledger.with_training_end("C", 20, 1)


def test_ledger_rule_from_a_segment_end_subtracts_the_requests_it_has_not_seen():
    ledger = _timeline()
    plan, after = _delete(ledger, [5, 7, 14], "A", "A2")  # segment 1's end has seen no request
    assert plan.subtract.tolist() == [2, 5, 7] and plan.new_steps.tolist() == [7, 14]
    assert after.removed_steps.tolist() == [2, 5, 7, 14] and after.models[-1].steps == 10
    plan, _ = _delete(ledger, [5, 7, 14], "C", "C2")  # segment 2's end has seen the first request
    assert plan.subtract.tolist() == [7, 14] and plan.new_steps.tolist() == [7, 14]


def test_ledger_rule_from_a_deletion_result_subtracts_only_new_steps_below_its_own():
    plan, after = _delete(_timeline(), [5, 7, 14], "B", "B2")
    assert plan.subtract.tolist() == [7] and plan.new_steps.tolist() == [7, 14]
    # B2 has seen both requests: a later deletion from it subtracts nothing of theirs.
    plan, _ = _delete(after, [], "B2", "B3")
    assert plan.subtract.tolist() == [] and after.models[-1].requests == 2


def test_ledger_rule_refuses_any_other_model_and_a_store_without_any():
    with pytest.raises(pu.ModelMismatchError, match="not on the store.s timeline"):
        _delete(_timeline(), [3], "other", "x")
    with pytest.raises(pu.StoreError, match="mark_final"):
        _delete(Ledger.empty(), [3], "other", "x")


def test_an_undone_deletion_stays_listed_and_its_model_is_refused():
    ledger = _timeline()
    _, after = _delete(ledger, [7], "C", "D")
    undone = after.undone_back_to(ledger, "s.zarr", now=NOW)
    assert undone.extends(after) and undone.status(len(ledger.records)) == "undone"
    assert undone.removed_steps.tolist() == [2, 5]
    with pytest.raises(pu.ModelMismatchError):
        _delete(undone, [7], "D", "x")
    plan, _ = _delete(undone, [7], "C", "D")
    assert plan.subtract.tolist() == [7]


def test_a_pending_deletion_is_confirmed_by_its_model_and_undone_by_another():
    _, pending = _delete(_timeline(), [7], "C", "D", pending=True)
    assert pending.pending is not None and pending.removed_steps.tolist() == [2, 5]
    plan, _ = _delete(pending, [8], "D", "E")
    assert plan.subtract.tolist() == [8] and plan.base.removed_steps.tolist() == [2, 5, 7]
    plan, _ = _delete(pending, [8], "C", "E")  # the save did not happen: C still holds step 7
    assert plan.subtract.tolist() == [8] and plan.base.removed_steps.tolist() == [2, 5]


def test_the_ledger_round_trips_and_an_edited_record_fails_its_checksum():
    ledger = _timeline()
    assert Ledger.from_attrs(ledger.to_attrs(), "s.zarr") == ledger
    attrs = ledger.to_attrs()
    attrs["records"][0]["steps"] = [2]
    with pytest.raises(pu.CorruptStoreError, match="record 0 fails its checksum"):
        Ledger.from_attrs(attrs, "s.zarr")
    attrs = ledger.to_attrs()
    attrs["records"].append(dict(attrs["records"][0]))  # a copied record: the chain breaks
    with pytest.raises(pu.CorruptStoreError, match="record 1"):
        Ledger.from_attrs(attrs, "s.zarr")


@pytest.mark.parametrize("attrs", [
    {"removed_steps": [3, 2], "fingerprint": None},  # not sorted
    {"removed_steps": [1, 1], "fingerprint": None},  # repeated
    {"removed_steps": ["1"], "fingerprint": None},
    {"removed_steps": [1]},
    {"removed_steps": [1], "fingerprint": 7},
])
def test_a_malformed_format_3_ledger_is_corruption(attrs):
    with pytest.raises(pu.CorruptStoreError, match="ledger"):
        Ledger.from_format_3(attrs, final_fingerprint="A", final_steps=4, steps=4, where="s.zarr")


# ------------------------------------------------------------------ the metadata value
def test_metadata_round_trips_and_damaged_fields_are_corruption(tmp_path):
    store = recorded_store(tmp_path / "s.zarr", close=True).store
    attrs = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    meta = StoreMetadata.from_attrs(attrs, "s.zarr")
    assert meta == store.metadata and StoreMetadata.from_attrs(meta.to_checked_attrs(), "s.zarr") == meta
    # Field checks: each edit re-sealed with a valid checksum, so that the field's own check runs.
    def sealed(document):
        document = {k: v for k, v in document.items() if k != "checksum"}
        return document | {"checksum": attrs_checksum(document)}

    assert StoreMetadata.from_attrs(sealed(attrs), "s.zarr") == meta
    for field, bad in (("committed_steps", -1), ("committed_steps", "24"), ("layers", [{"name": "x"}]),
                       ("value_dtype", "int8"), ("row_length", meta.row_length + 1), ("fingerprint_final", 3),
                       ("resume_point", {"steps": "x", "fingerprint": "f"}), ("compression", "brotli:3"),
                       ("inner_steps", 7), ("lookup", {"from": 0, "runs": [["r2-5", 2, 5, 9]]}),
                       ("lookup", {"from": 0, "runs": [["r0-99", 0, 99, 9]]})):
        with pytest.raises(pu.CorruptStoreError, match="s.zarr"):
            StoreMetadata.from_attrs(sealed(dict(attrs, **{field: bad})), "s.zarr")
    damaged = dict(attrs)
    del damaged["ledger"]
    with pytest.raises(pu.CorruptStoreError, match="ledger"):
        StoreMetadata.from_attrs(sealed(damaged), "s.zarr")
    with pytest.raises(pu.StoreFormatError, match="format version 99"):
        StoreMetadata.from_attrs(dict(attrs, format_version=99), "s.zarr")


def _edit_attributes(path, edit):
    doc = json.loads(path.read_text())
    edit(doc["attributes"])
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("edit", [
    lambda a: a["ledger"]["models"][0].update(steps=3),  # a model said to hold other steps
    lambda a: a.update(committed_steps=a["committed_steps"] - 1),
    lambda a: a.update(fingerprint_final=a["fingerprint_final"][:-1] + "0"),
    lambda a: a.update(format_version=2),  # '4' -> '2' must not switch the checksum off
    lambda a: a.update(committed_samples=None),
], ids=["ledger", "count", "fingerprint", "version", "malformed"])
def test_edited_metadata_on_disk_fails_its_checksum_before_anything_changes(tmp_path, edit):
    recorded_store(tmp_path / "s.zarr", close=True)
    path = tmp_path / "s.zarr" / "zarr.json"
    _edit_attributes(path, edit)
    before = path.read_bytes()
    for attempt in (lambda: pu.UpdateStore.open(tmp_path / "s.zarr"),
                    lambda: pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")):
        with pytest.raises(pu.CorruptStoreError, match="checksum|claim format version"):
            attempt()
    assert path.read_bytes() == before


def test_an_edit_that_claims_format_2_to_skip_the_checksum_is_refused(tmp_path):
    recorded_store(tmp_path / "s.zarr", close=True)
    path = tmp_path / "s.zarr" / "zarr.json"
    _edit_attributes(path, lambda a: (as_format_2(a), a["ledger"]["removed_steps"].append(3),
                                      a.update(checksum="sha256:0")))
    with pytest.raises(pu.CorruptStoreError, match="claim format version 2"):
        pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")


def test_a_store_of_format_2_reads_and_is_checksummed_at_its_first_write(tmp_path):
    recorded_store(tmp_path / "s.zarr", close=True)
    path = tmp_path / "s.zarr" / "zarr.json"
    _edit_attributes(path, as_format_2)
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    assert store.metadata.format_version == 2
    with pytest.raises(pu.StoreError, match="records no step hyper-parameters"):
        store.read_step_hyper(store.steps)  # update stores record learning rates since format 4
    store.truncate(10)
    store.close()
    attrs = json.loads(path.read_text())["attributes"]
    assert attrs["format_version"] == 4 and attrs["checksum"].startswith("sha256:")


# ------------------------------------------------------------------ the write session
def test_a_write_session_releases_only_the_lock_it_took(tmp_path):
    store = recorded_store(tmp_path / "s.zarr", close=True).store
    other = pu.UpdateStore.open(tmp_path / "s.zarr")
    with store.writing():
        with pytest.raises(pu.StoreLockedError):
            with other.writing():
                pass
        with store.writing():  # nested: already held, so not released at its end
            pass
        with pytest.raises(pu.StoreLockedError):
            other.truncate(1)
    with other.writing():  # released at the end of the outer session
        other.truncate(10)
    with store.writing():  # a session starts from what is on disk, not from its stale copy
        assert store.steps == 10


def test_a_failing_session_still_releases_its_lock(tmp_path):
    store = recorded_store(tmp_path / "s.zarr", close=True).store
    with pytest.raises(ZeroDivisionError):
        with store.writing():
            1 / 0
    with pu.UpdateStore.open(tmp_path / "s.zarr").writing():
        pass


def test_a_read_only_store_refuses_a_session(tmp_path):
    recorded_store(tmp_path / "s.zarr", close=True)
    with pytest.raises(pu.StoreError, match="read-only"):
        with pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").writing():
            pass


# ------------------------------------------------------------------ attribution lookup
@pytest.mark.parametrize("make, family", [
    (lambda p: torch.optim.SGD(p, lr=0.1), attribution.SGDMomentum),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), attribution.SGDMomentum),
    (lambda p: torch.optim.Adam(p), attribution.AdamFamily),
    (lambda p: torch.optim.AdamW(p), attribution.AdamFamily),
])
def test_family_lookup(make, family):
    assert attribution.family_for(make(TinyNet().fc1.parameters())) is family
    assert attribution.family_named(family.name) is family


def test_unknown_family_name_is_a_clear_error():
    with pytest.raises(pu.StoreError, match="optimizer family 'lion'"):
        attribution.family_named("lion")


def test_coefficients_need_a_gradient_store_with_a_final_model(tmp_path):
    store = recorded_store(tmp_path / "s.zarr").store
    with pytest.raises(pu.StoreError, match="attribution='update'"):
        attribution.coefficients(store, [0])
    model = TinyNet()
    grad_store = pu.UpdateStore.create(tmp_path / "g.zarr", model, attribution="gradient")
    with pytest.raises(pu.StoreError, match="no final model"):
        attribution.coefficients(grad_store, [0])
