"""The timeline's rules, asked as the recorder, a forget and mark_final ask them
(pyunlearn.ledger's verdicts), including the seam cases a review found (issue 24, cases 5 and 6)."""
from __future__ import annotations

import copy

import pytest
import torch

import pyunlearn as pu
from pyunlearn import ledger
from tests.support import recorded_store, tiny_data, tiny_training


def test_mark_final_refuses_a_model_that_contradicts_the_resume_point(tmp_path):
    """Case 5: after a flush recorded the model after the last step, another model cannot be
    marked as these steps' end (a later forget would subtract steps it never took)."""
    recorded = recorded_store(tmp_path / "s.zarr")
    store, model = recorded.store, recorded.model
    stranger = copy.deepcopy(model)
    with torch.no_grad():
        stranger.fc1.weight.add_(1.0)
    records = len(store.ledger)
    with pytest.raises(pu.ModelMismatchError, match="not with this model"):
        store.mark_final(stranger)
    assert len(store.ledger) == records
    store.mark_final(model)  # the right one: accepted (already the segment's end: nothing new)
    assert len(store.ledger) == records


def test_mark_final_after_an_interrupted_run_accepts_the_recovered_model(tmp_path):
    """Steps committed after the last flush (a run that died before its recorder flushed or
    closed): the store knows no model after them, so the model recovered from that run is
    marked (the documented recovery)."""
    recorded = recorded_store(tmp_path / "s.zarr")
    store, model = recorded.store, recorded.model
    params = store.check_model(model)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        params[0].add_(0.01)
    store.append(pu.kernels.prune_topk(before, [p.detach() for p in params], store.k), [2000])  # the run's step
    store.flush()
    assert store.resume_point.steps == store.steps - 1 and store.final_steps is None
    store.mark_final(model)
    assert store.final_steps == store.steps and store.ledger.records[-1].kind == "segment"
    assert store.resume_point.fingerprint == pu.kernels.fingerprint(params)


def test_the_verdicts_are_pure_values(tmp_path):
    """Asked twice with the same timeline, a verdict is the same and nothing was written."""
    recorded = recorded_store(tmp_path / "s.zarr")
    store = recorded.store
    pu.amnesiac_forget(recorded.model, store, [1003])
    timeline, point = store.ledger, store.resume_point
    first, again = ledger.truncation(timeline, point, 2), ledger.truncation(timeline, point, 2)
    assert not first.allowed and str(first.refusal) == str(again.refusal) and len(store.ledger) == 2
    plan = ledger.plan_forget(timeline, pu.kernels.Fingerprints(store.check_model(recorded.model)),
                              store.steps_for([1004]).steps)
    assert plan.start.record == 1 and plan.settle == ()
    verdict = ledger.continue_training(timeline, point, committed_steps=store.steps,
                                       initial_fingerprint=store.initial_fingerprint,
                                       model=pu.kernels.Fingerprints(store.check_model(recorded.model)))
    assert verdict.allowed and len(store.ledger) == 2


def test_a_forget_from_a_model_off_the_timeline_names_the_newest_it_knows(tmp_path):
    recorded = recorded_store(tmp_path / "s.zarr")
    stranger = copy.deepcopy(recorded.model)
    with torch.no_grad():
        stranger.fc1.weight.mul_(2)
    with pytest.raises(pu.ModelMismatchError, match="not on the store's timeline.*newest it knows: xxh3:"):
        pu.amnesiac_forget(stranger, recorded.store, [1003])


def test_an_undone_deletion_stays_listed_and_its_samples_are_trainable_again(tmp_path):
    recorded = recorded_store(tmp_path / "s.zarr")
    store, model = recorded.store, recorded.model
    before = copy.deepcopy(model)
    report = pu.amnesiac_forget(model, store, [1003])
    store.undo(report.record)  # the model could not be saved
    assert [row["status"] for row in store.ledger.audit()] == ["undone"]
    assert store.forgotten_ids().size == 0 and store.ledger.state.removed == 0
    with pytest.raises(pu.ModelMismatchError):
        pu.amnesiac_forget(model, store, [1004])  # its model is refused
    assert pu.amnesiac_forget(before, store, [1004]).status == "applied"


def test_a_deletion_a_later_model_has_applied_cannot_be_undone(tmp_path):
    recorded = recorded_store(tmp_path / "s.zarr")
    store, model = recorded.store, recorded.model
    first = pu.amnesiac_forget(model, store, [1003])
    pu.amnesiac_forget(model, store, [1004])
    with pytest.raises(pu.StoreError, match="can no longer be undone"):
        store.undo(first.record)
    ids, x, y = tiny_data(120)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    last = pu.amnesiac_forget(model, store, [1005])
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        tiny_training(model, optimizer, (ids[40:60], x[40:60], y[40:60]), epochs=1, recorder=rec)
    with pytest.raises(pu.StoreError, match="can no longer be undone"):
        store.undo(last.record)
