"""A store's life, its timeline: training segments and deletion requests by key in any order,
forgetting from the latest model and from older checkpoints on the timeline, the audit trail
after each, and training after a deletion only from a model that has it. (Keys and the secret:
tests/test_keys.py; forgetting by keys on the command line: tests/cli/test_forget.py.)"""
from __future__ import annotations


import pytest
import torch

import pyunlearn as pu
from tests.support import TinyNet
from tests.support.stores import small_recorded_run as _recorded
from tests.support.timeline import SECRET, Year
from tests.support.timeline import close as _close
from tests.support.timeline import model_from as _model


def test_a_year_in_miniature(tmp_path):
    year = Year(tmp_path / "s.zarr")
    users = [f"user{i:03d}@example.com" for i in range(60)]
    checkpoints = {}  # segment -> (steps, state, steps removed then): the deployed model of each segment's end
    segment_keys = []
    requested: list[str] = []
    for segment in range(12):
        # Each segment trains 8 users: 6 new ones and 2 from earlier segments (their data keeps
        # coming), never a user whose deletion was requested.
        fresh = users[segment * 4: segment * 4 + 6]
        returning = [u for u in (segment_keys[-1] if segment_keys else []) if u not in requested][:2]
        keys = list(dict.fromkeys(fresh + returning))
        keys = [k for k in keys if k not in requested]
        segment_keys.append(keys)
        checkpoints[segment] = (year.store.steps + 2 * ((len(keys) + 3) // 4), year.train(keys, seed=segment),
                                set(year.removed))
        assert year.store.steps == checkpoints[segment][0] == len(year.updates)
        assert _close(year.model, year.expected(year.store.steps))  # training went on from the post-deletion model

        # A request between segments: one or two users, from this segment or an earlier one.
        asked = [segment_keys[segment // 2][segment % len(segment_keys[segment // 2])]]
        if segment % 3 == 2:
            asked.append(keys[0])
        if segment == 5:
            asked.append("never-seen@example.com")  # a key no step used: recorded, removes nothing
        asked = [a for a in dict.fromkeys(asked) if a not in requested]
        requested += asked
        year.request(asked)
        records_before = len(year.store.ledger.records)
        report = pu.amnesiac_forget(year.model, year.store, asked, request_id=f"GDPR-{segment:02d}")
        assert _close(year.model, year.expected(year.store.steps)), segment
        ledger = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r", secret=SECRET).ledger  # checksums verified
        row = ledger.audit()[-1]
        assert len(ledger.records) == records_before + 1 and row["status"] == "applied"
        assert row["request"] == f"GDPR-{segment:02d}" and row["keys"] == len(asked)
        assert row["missing"] == (1 if segment == 5 else 0) == len(report.missing_ids)
        assert row["fingerprint_after"] == ledger.models[-1].fingerprint
        assert set(row["steps"]) == {s for s, b in enumerate(year.batches) if b & set(asked)} - \
            {s for r in ledger.audit()[:-1] for s in r["steps"]}
        assert ledger.removed_steps.tolist() == sorted(year.removed)
        assert row["keys_digest"].startswith("blake2b-keyed:")
        assert not any(b"example.com" in f.read_bytes() for f in (tmp_path / "s.zarr").rglob("*") if f.is_file())

        if segment in (3, 8):
            # Last season's deployed checkpoint catches up with every request since, in one call.
            steps, state, removed_then = checkpoints[segment - 3]
            old = _model(state)
            caught_up = pu.amnesiac_forget(old, year.store, [], request_id=f"catch-up-{segment}")
            unseen = {s for s in year.removed - removed_then if s < steps}
            assert caught_up.steps_removed == 0 and caught_up.steps_applied == len(unseen) > 0
            assert set(caught_up.subtracted.tolist()) == unseen  # what repair would replay
            assert _close(old, year.expected(steps))
            again = pu.amnesiac_forget(old, year.store, [])  # nothing left to apply
            assert again.steps_applied == 0

    # Forget every user of every segment: the latest model and the first segment's checkpoint
    # both return to the initial weights.
    everyone = sorted({k for keys in segment_keys for k in keys} - set(requested))
    year.request(everyone)
    pu.amnesiac_forget(year.model, year.store, everyone, request_id="everyone")
    assert _close(year.model, year.initial)
    first = _model(checkpoints[0][1])
    pu.amnesiac_forget(first, year.store, [])
    assert _close(first, year.initial)
    assert pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").ledger.removed_steps.tolist() == list(range(year.store.steps))


def test_a_model_off_the_timeline_and_a_replaced_checkpoint_are_refused(tmp_path):
    year = Year(tmp_path / "s.zarr")
    first = year.train([f"u{i}" for i in range(8)], seed=0)
    pu.amnesiac_forget(year.model, year.store, ["u1"])
    stranger = _model(first)
    with torch.no_grad():
        stranger.fc1.bias.add_(1e-3)
    with pytest.raises(pu.ModelMismatchError, match="not on the store's timeline"):
        pu.amnesiac_forget(stranger, year.store, ["u2"])
    # The model before the deletion may still be forgotten from (it is a segment's end) ...
    old = _model(first)
    report = pu.amnesiac_forget(old, year.store, ["u2"])
    assert report.steps_applied == len({s for s, b in enumerate(year.batches) if b & {"u1", "u2"}})
    # ... but training never continues from it: it holds u1's updates.
    stale = _model(first)
    optimizer = torch.optim.SGD(stale.parameters(), lr=0.05)
    rec = pu.UpdateRecorder(stale, optimizer, year.store)
    rec.batch(["u9"])
    torch.nn.functional.cross_entropy(stale(torch.randn(1, 8)), torch.tensor([0])).backward()
    with pytest.raises(pu.RecorderError, match="deletion requests came in after this model was made"):
        optimizer.step()
    rec.remove()


def test_an_undone_deletion_stays_in_the_audit_trail(tmp_path):
    year = Year(tmp_path / "s.zarr")
    year.train([f"u{i}" for i in range(8)], seed=0)
    before = {k: v.clone() for k, v in year.model.state_dict().items()}
    report = pu.amnesiac_forget(year.model, year.store, ["u3"], request_id="R1", commit=False)
    year.store.undo(report.record)  # the save failed
    year.model.load_state_dict(before)
    audit = year.store.ledger.audit()
    assert [(r["request"], r["status"]) for r in audit] == [("R1", "undone")] and audit[0]["undo_reason"]
    assert not year.store.ledger.has_deletions
    report = pu.amnesiac_forget(year.model, year.store, ["u3"], request_id="R1-retry")
    assert report.steps_removed == report.steps_applied > 0
    assert [(r["request"], r["status"]) for r in year.store.ledger.audit()] == [("R1", "undone"), ("R1-retry", "applied")]


# ---------------------------------------------------------------------- training after a deletion

def test_training_on_a_forgotten_sample_again_is_refused(tmp_path):
    year = Year(tmp_path / "s.zarr")
    year.train([f"u{i}" for i in range(8)], seed=0)
    pu.amnesiac_forget(year.model, year.store, ["u2", "u5"], request_id="R1")
    optimizer = torch.optim.SGD(year.model.parameters(), lr=0.05)
    with pu.UpdateRecorder(year.model, optimizer, year.store) as rec:
        with pytest.raises(pu.RecorderError, match="deletion was requested .*not declared"):
            rec.batch(["u1", "u5"])
        rec.batch(["u1", "u9"])  # the pipeline dropped u5: recording goes on
        torch.nn.functional.cross_entropy(year.model(torch.randn(2, 8)), torch.tensor([0, 1])).backward()
        optimizer.step()
    assert year.store.steps == len(year.batches) + 1
    assert year.store.forgotten_ids().tolist() == sorted(year.store.ids_for(["u2", "u5"]).tolist())


# ---------------------------------------------------------------------- the red team's cases

def test_training_on_from_a_pending_deletion_confirms_it(tmp_path):
    year = Year(tmp_path / "s.zarr")
    year.train([f"u{i}" for i in range(8)], seed=0)
    pending = pu.amnesiac_forget(year.model, year.store, ["u3"], commit=False).record  # saved, never confirmed
    year.request(["u3"])
    year.train([f"v{i}" for i in range(4)], seed=1)  # goes on from the pending deletion's model
    assert year.store.ledger.status(pending) == "applied" and year.store.ledger.pending is None
    pu.amnesiac_forget(year.model, year.store, ["v1"])
    year.request(["v1"])
    assert _close(year.model, year.expected(year.store.steps))
    assert year.store.ledger.status(pending) == "applied" and year.store.ledger.audit()[-1]["steps"] == sorted(
        {s for s, b in enumerate(year.batches) if "v1" in b})


def test_a_deletion_trained_on_cannot_be_undone(tmp_path):
    year = Year(tmp_path / "s.zarr")
    year.train([f"u{i}" for i in range(8)], seed=0)
    report = pu.amnesiac_forget(year.model, year.store, ["u3"])
    optimizer = torch.optim.SGD(year.model.parameters(), lr=0.05)
    rec = pu.UpdateRecorder(year.model, optimizer, year.store)
    year.step(["w1"], optimizer, rec)
    rec.close()
    with pytest.raises(pu.StoreError, match="can no longer be undone"):
        year.store.undo(report.record)
    assert year.store.ledger.status(report.record) == "applied"


def test_a_checkpoint_from_before_a_deletion_cannot_resume_training(tmp_path):
    year = Year(tmp_path / "s.zarr")
    optimizer = torch.optim.SGD(year.model.parameters(), lr=0.05)
    rec = pu.UpdateRecorder(year.model, optimizer, year.store)
    for i in range(4):
        year.step([f"u{i}"], optimizer, rec)
    state, before = rec.state_dict(), {k: v.clone() for k, v in year.model.state_dict().items()}
    rec.close()
    pu.amnesiac_forget(year.model, year.store, ["u1"])
    after = {k: v.clone() for k, v in year.model.state_dict().items()}
    optimizer = torch.optim.SGD(year.model.parameters(), lr=0.05)
    rec = pu.UpdateRecorder(year.model, optimizer, year.store)
    year.step(["u7"], optimizer, rec)
    rec.flush()
    rec.remove()  # the run stops (a crash after the flush)
    old = _model(before)
    with pytest.raises(pu.RecorderError, match="a deletion was applied to this checkpoint's model"):
        pu.UpdateRecorder(old, torch.optim.SGD(old.parameters(), lr=0.05), year.store, state=state)
    assert year.store.steps == 5  # nothing was dropped
    year.store.truncate(4)  # by hand: the resume point is the deletion's model, not the checkpoint's
    assert year.store.metadata.resume_point.fingerprint == year.store.ledger.models[1].fingerprint
    for model, refused in ((_model(before), True), (_model(after), False)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        rec = pu.UpdateRecorder(model, optimizer, year.store)
        rec.batch(["u8"])
        torch.nn.functional.cross_entropy(model(torch.randn(1, 8)), torch.tensor([0])).backward()
        if refused:
            with pytest.raises(pu.RecorderError, match="deletion requests came in after this model"):
                optimizer.step()
        else:
            optimizer.step()
        rec.remove()


def test_a_caught_up_checkpoint_may_resume_training_and_says_what_it_has_seen(tmp_path):
    year = Year(tmp_path / "s.zarr")
    first = year.train([f"u{i}" for i in range(8)], seed=0)
    pu.amnesiac_forget(year.model, year.store, ["u2"])  # the latest model, D
    head = year.model
    old = _model(first)
    pu.amnesiac_forget(old, year.store, ["u5"])  # the checkpoint: both requests; D lacks the second
    year.request(["u2", "u5"])
    year.model = head
    with pytest.raises(pu.RecorderError, match="deletion requests came in after this model"):
        year.train([f"v{i}" for i in range(4)], seed=1)
    year.model = old
    year.train([f"v{i}" for i in range(4)], seed=1)
    last = year.store.ledger.models[-1]
    records = year.store.ledger.records
    assert last.made_by == "training" and last.record == len(records) - 1
    assert [r.kind for r in records[:last.seen]] == ["segment", "deletion", "deletion"]  # both applied to it
    again = pu.amnesiac_forget(year.model, year.store, [])
    assert again.steps_applied == 0 and _close(year.model, year.expected(year.store.steps))


def test_a_pending_deletion_whose_model_was_lost_is_undone_by_hand_and_then_the_model_before_it_trains(tmp_path):
    """A forget killed before its model was saved leaves a pending deletion. Training from the
    model before it is refused while it is pending (the output may have been saved: issue 24,
    case 6); once the operator undoes it, that model trains, and the sample with it."""
    year = Year(tmp_path / "s.zarr")
    before = year.train([f"u{i}" for i in range(8)], seed=0)
    record = pu.amnesiac_forget(year.model, year.store, ["u3"], commit=False).record  # killed before the save
    year.store.close()
    store = pu.UpdateStore.open(tmp_path / "s.zarr", secret=SECRET)
    model = _model(before)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(pu.errors.ResumeRefused, match="still holds"):
        with pu.UpdateRecorder(model, optimizer, store) as rec:
            rec.batch(["u1"])
            torch.nn.functional.cross_entropy(model(torch.randn(1, 8)), torch.tensor([0])).backward()
            optimizer.step()
    assert store.ledger.status(record) == "pending" and store.steps == len(year.batches)
    store.undo(record, "its model was never saved")
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for keys in (["u1"], ["u3"]):  # u3 is not forgotten after all
            rec.batch(keys)
            torch.nn.functional.cross_entropy(model(torch.randn(1, 8)), torch.tensor([0])).backward()
            optimizer.step()
    assert [(r["status"], r["undo_reason"]) for r in store.ledger.audit()] == [("undone", "its model was never saved")]


def test_forgetting_through_a_handle_a_recorder_writes_is_refused(tmp_path):
    year = Year(tmp_path / "s.zarr")
    year.train([f"u{i}" for i in range(8)], seed=0)
    optimizer = torch.optim.SGD(year.model.parameters(), lr=0.05)
    with pu.UpdateRecorder(year.model, optimizer, year.store) as rec:
        year.step(["w1"], optimizer, rec)
        with pytest.raises(pu.StoreError, match="held for recording .* close that first"):
            pu.amnesiac_forget(year.model, year.store, ["u1"])
        with pytest.raises(pu.StoreError, match="rec.close"):
            year.store.mark_final(year.model)
    pu.amnesiac_forget(year.model, year.store, ["u1"])


def test_training_continues_only_from_the_model_a_deletion_produced(tmp_path):
    model, optimizer = _recorded(tmp_path / "s.zarr")
    final = {k: v.clone() for k, v in model.state_dict().items()}
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    pu.amnesiac_forget(model, store, [1000])
    stale = TinyNet()
    stale.load_state_dict(final)  # still holds the deleted sample's updates
    stale_optimizer = torch.optim.SGD(stale.parameters(), lr=0.1)
    rec = pu.UpdateRecorder(stale, stale_optimizer, store)
    rec.batch([1])
    stale(torch.randn(2, 8)).sum().backward()
    with pytest.raises(pu.RecorderError, match="deletion requests came in after this model was made"):
        stale_optimizer.step()
    rec.remove()
    rec = pu.UpdateRecorder(model, optimizer, store)  # the model after the deletion: recording goes on
    rec.batch([1])
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    rec.close()
    assert store.steps == store.ledger.models[-1].steps and store.ledger.models[-1].made_by == "training"
