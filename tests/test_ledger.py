"""The deletion ledger (pyunlearn/ledger.py): its rule for what a deletion subtracts from which
model, its checksummed records, and on a store its compare-and-swap, undo and pending entries."""
from __future__ import annotations

import numpy as np
import pytest

import pyunlearn as pu
from pyunlearn.ledger import Ledger
from tests.support import TinyNet
from tests.support.stores import params_copy as _params
from tests.support.stores import recorded_path as _recorded


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


# ------------------------------------------------------------------ on a store: compare-and-swap, undo, pending

def test_undoing_a_deletion_whose_model_could_not_be_saved(tmp_path):
    model, path = _recorded(tmp_path)
    final = _params(model)
    store = pu.UpdateStore.open(path)
    report = pu.amnesiac_forget(model, store, [1000])
    assert report.committed and store.ledger == report.ledger_after
    store.record_deletion(report.ledger_before, replacing=report.ledger_after)  # the save failed: undo
    assert not store.ledger.has_deletions
    restored = TinyNet()
    restored.load_state_dict(dict(zip([n for n, _ in model.named_parameters()], final)), strict=False)
    again = pu.amnesiac_forget(restored, store, [1000])  # from the final model, as if never forgotten
    assert again.steps_removed == report.steps_removed


def test_a_stale_ledger_write_is_refused(tmp_path):
    model, path = _recorded(tmp_path)
    other = TinyNet()
    other.load_state_dict(model.state_dict())
    store = pu.UpdateStore.open(path)
    report = pu.amnesiac_forget(model, store, [1000], commit=False)
    assert not report.committed and not store.ledger.has_deletions and store.ledger == report.ledger_pending
    pu.amnesiac_forget(other, pu.UpdateStore.open(path), [1001])  # another deletion came first
    with pytest.raises(pu.StoreError, match="ledger changed"):
        store.record_deletion(report.ledger_after, replacing=report.ledger_pending)


def test_a_pending_deletion_accepts_the_model_before_and_the_model_after(tmp_path):
    """The state a kill between "model saved" and "deletion committed" leaves: whichever of the
    two models survived on disk can be forgotten from, and settles the pending entry."""
    model, path = _recorded(tmp_path)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    report = pu.amnesiac_forget(model, pu.UpdateStore.open(path), [1000], commit=False)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    assert pu.UpdateStore.open(path, mode="r").ledger.pending is not None

    saved = TinyNet()
    saved.load_state_dict(after)  # the save went through: the pending deletion is applied
    r1 = pu.amnesiac_forget(saved, pu.UpdateStore.open(path), [1001])
    assert r1.ledger_after.removed_steps.tolist() == sorted(set(report.ledger_after.removed_steps) |
                                                             set(r1.ledger_after.removed_steps))
    assert set(report.ledger_after.removed_steps) <= set(r1.ledger_after.removed_steps)
    assert r1.steps_applied == r1.steps_removed  # only new steps were subtracted from it

    model2, path2 = _recorded(tmp_path / "b")
    pu.amnesiac_forget(model2, pu.UpdateStore.open(path2), [1000], commit=False)
    lost = TinyNet()
    lost.load_state_dict(final)  # the save never happened: the final model is still accepted
    r2 = pu.amnesiac_forget(lost, pu.UpdateStore.open(path2), [1001])
    assert r2.ledger_after.pending is None
    assert r2.steps_applied == r2.steps_removed == len(pu.UpdateStore.open(path2, mode="r").steps_for([1001]).steps)
