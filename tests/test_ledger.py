"""The timeline's rule (pyunlearn/ledger.py) for what a forget subtracts from which model, asked
through a store: from a segment's end, the steps of every request it has not seen; from a
deletion's model, only steps no request before removed; a pending deletion applied, never
undone, by the next forget; and two handles on one store never plan from a stale log. (The
verdicts as pure values: tests/test_timeline_verdicts.py; a year of them: tests/test_timeline.py.)"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import pyunlearn as pu
from pyunlearn.store.metadata import attrs_checksum
from tests.support import recorded_store
from tests.support.stores import params_copy, same_tensors


def _steps(store, ids) -> set[int]:
    return set(store.steps_for(ids).steps.tolist())


def test_from_a_segment_end_a_forget_subtracts_every_request_it_has_not_seen(tmp_path):
    run = recorded_store(tmp_path / "s.zarr", momentum=0.0)
    store, trained = run.store, copy.deepcopy(run.model)
    first = pu.amnesiac_forget(run.model, store, [1003])
    old = copy.deepcopy(trained)  # the segment's end, deployed before the first request
    report = pu.amnesiac_forget(old, store, [1004])
    assert set(report.subtracted.tolist()) == _steps(store, [1003, 1004])
    assert report.steps_removed == len(_steps(store, [1004]) - _steps(store, [1003]))
    again = pu.amnesiac_forget(copy.deepcopy(trained), store, [])  # a catch-up: both requests
    assert set(again.subtracted.tolist()) == _steps(store, [1003, 1004]) and again.status == "caught-up"
    assert first.steps_removed == len(_steps(store, [1003]))


def test_from_a_deletions_model_a_forget_subtracts_only_steps_no_request_removed(tmp_path):
    run = recorded_store(tmp_path / "s.zarr", momentum=0.0)
    store = run.store
    pu.amnesiac_forget(run.model, store, [1003])
    report = pu.amnesiac_forget(run.model, store, [1003, 1004])  # 1003 again: nothing of it twice
    assert set(report.subtracted.tolist()) == _steps(store, [1004]) - _steps(store, [1003])
    nothing = pu.amnesiac_forget(run.model, store, [])
    assert nothing.status == "up-to-date" and nothing.steps_applied == 0


def test_a_model_off_the_timeline_and_a_store_without_a_model_are_refused(tmp_path):
    run = recorded_store(tmp_path / "s.zarr")
    stranger = copy.deepcopy(run.model)
    next(p for p in stranger.parameters() if p.requires_grad).data.add_(1e-3)
    before = params_copy(stranger)
    with pytest.raises(pu.ModelMismatchError, match="not on the store.s timeline"):
        pu.amnesiac_forget(stranger, run.store, [1003])
    assert same_tensors(params_copy(stranger), before) and len(run.store.ledger) == 1


def test_a_pending_deletion_is_confirmed_from_its_model_and_applied_from_the_model_before(tmp_path):
    for name, from_before in (("saved", False), ("lost", True)):
        run = recorded_store(tmp_path / name / "s.zarr", momentum=0.0)
        store, before = run.store, copy.deepcopy(run.model)
        pending = pu.amnesiac_forget(run.model, store, [1003], commit=False)
        assert store.ledger.status(pending.record) == "pending"
        start = before if from_before else run.model
        report = pu.amnesiac_forget(start, store, [1004])
        expected = _steps(store, [1004]) | (_steps(store, [1003]) if from_before else set())
        assert set(report.subtracted.tolist()) == expected - (set() if from_before else _steps(store, [1003]))
        assert store.ledger.status(pending.record) == "applied"  # never undone by a forget
        assert store.ledger.removed_steps.tolist() == sorted(_steps(store, [1003, 1004]))
        if from_before:  # the model the forget left holds neither request's steps: the saved one's twin
            twin = copy.deepcopy(run.model)
            pu.amnesiac_forget(twin, store, [])
            assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(params_copy(start), params_copy(twin)))


def test_two_handles_on_one_store_plan_from_the_latest_log(tmp_path):
    run = recorded_store(tmp_path / "s.zarr", momentum=0.0, close=True)
    one, two = pu.UpdateStore.open(tmp_path / "s.zarr"), pu.UpdateStore.open(tmp_path / "s.zarr")
    other = copy.deepcopy(run.model)
    pu.amnesiac_forget(run.model, one, [1003])
    report = pu.amnesiac_forget(other, two, [1004])  # `two` read the log before `one` wrote to it
    assert set(report.subtracted.tolist()) == _steps(two, [1003, 1004])  # it saw the first request
    assert [r["status"] for r in pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").ledger.audit()] == ["applied"] * 2


@pytest.mark.parametrize("ledger", [
    {"removed_steps": [3, 1], "fingerprint": None},  # not sorted
    {"removed_steps": [1, 1], "fingerprint": None},  # repeated
    {"removed_steps": ["1"], "fingerprint": None},
    {"removed_steps": [1]},
    {"removed_steps": [1], "fingerprint": 7},
])
def test_a_malformed_format_3_ledger_is_corruption(tmp_path, ledger):
    import shutil
    from pathlib import Path

    fixture = Path(__file__).resolve().parent / "fixtures" / "v0.2-format3.zarr"
    shutil.copytree(fixture, tmp_path / "s.zarr")
    document = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    attrs = document["attributes"]
    attrs["ledger"] = ledger
    attrs["checksum"] = attrs_checksum({k: v for k, v in attrs.items() if k != "checksum"})  # re-sealed
    (tmp_path / "s.zarr" / "zarr.json").write_text(json.dumps(document))
    with pytest.raises(pu.CorruptStoreError, match="ledger"):
        pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
