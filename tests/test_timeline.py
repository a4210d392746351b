"""A store's life: training segments and deletion requests by key in any order, forgetting from
the latest model and from older checkpoints on the timeline, and the audit trail after each."""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.cli import main
from tests.support import TinyNet
from tests.support.stores import small_recorded_run as _recorded

SECRET = "a test secret of more than sixteen bytes"


def _sample(key) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (x, y) per key (or int ID), whatever the order keys come in."""
    g = torch.Generator().manual_seed(int.from_bytes(str(key).encode()[-6:], "little"))
    return torch.randn(8, generator=g), torch.randint(0, 3, (), generator=g)


class Year:
    """Trains TinyNet with plain SGD into a keep=1.0 float32 store, segment by segment, and keeps
    its own account (independent of the ledger) of every step's update and batch, so the
    expected weights of any model are a sum the test computes itself."""

    def __init__(self, path):
        torch.manual_seed(0)
        self.model = TinyNet()
        self.initial = [p.detach().clone() for p in self.model.parameters()]
        self.store = pu.UpdateStore.create(path, self.model, keep=1.0, value_dtype="float32", secret=SECRET)
        self.updates: list[list[torch.Tensor]] = []  # per step, per parameter
        self.batches: list[set[str]] = []  # per step, its keys
        self.removed: set[int] = set()  # steps that held a key a request asked for

    def train(self, keys: list[str], *, seed: int) -> dict:
        """One segment: two epochs over `keys` in batches of 4; returns the model's state at its end."""
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        rng = np.random.default_rng(seed)
        with pu.UpdateRecorder(self.model, optimizer, self.store) as rec:
            for _ in range(2):
                order = rng.permutation(len(keys))
                for first in range(0, len(keys), 4):
                    self.step([keys[i] for i in order[first:first + 4]], optimizer, rec)
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def step(self, keys: list, optimizer, rec) -> None:
        """One recorded step on `keys`, its update and batch kept."""
        x = torch.stack([_sample(k)[0] for k in keys])
        y = torch.stack([_sample(k)[1] for k in keys])
        before = [p.detach().clone() for p in self.model.parameters()]
        rec.batch(keys)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(self.model(x), y).backward()
        optimizer.step()
        self.updates.append([p.detach() - b for p, b in zip(self.model.parameters(), before)])
        self.batches.append(set(keys))

    def request(self, keys: list[str]) -> None:
        self.removed |= {s for s, batch in enumerate(self.batches) if batch & set(keys)}

    def expected(self, steps: int) -> list[torch.Tensor]:
        """θ0 plus every update of a step below `steps` that no request removed."""
        out = [p.clone().double() for p in self.initial]
        for s in range(steps):
            if s not in self.removed:
                for o, u in zip(out, self.updates[s]):
                    o += u.double()
        return [o.float() for o in out]


def _close(model, expected, atol=2e-5) -> bool:
    return all(torch.allclose(p.detach(), e, atol=atol, rtol=0) for p, e in zip(model.parameters(), expected))


def _model(state: dict) -> TinyNet:
    model = TinyNet()
    model.load_state_dict(state)
    return model


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
        assert row["missing_keys"] == (1 if segment == 5 else 0) == len(report.missing_ids)
        assert row["fingerprint_after"] == ledger.models[-1].fingerprint
        assert set(row["steps"]) == {s for s, b in enumerate(year.batches) if b & set(asked)} - \
            {s for r in ledger.audit()[:-1] for s in r["steps"]}
        assert ledger.removed_steps.tolist() == sorted(year.removed)
        assert row["keys_digest"].startswith("blake2b-keyed:") and "example.com" not in json.dumps(ledger.to_attrs())

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
    report = pu.amnesiac_forget(year.model, year.store, ["u3"], request_id="R1")
    year.store.record_deletion(report.ledger_before, replacing=report.ledger_after)  # the save failed
    year.model.load_state_dict(before)
    audit = year.store.ledger.audit()
    assert [(r["request"], r["status"]) for r in audit] == [("R1", "undone")] and audit[0]["undo_reason"]
    assert not year.store.ledger.has_deletions
    report = pu.amnesiac_forget(year.model, year.store, ["u3"], request_id="R1-retry")
    assert report.steps_removed == report.steps_applied > 0
    assert [(r["request"], r["status"]) for r in year.store.ledger.audit()] == [("R1", "undone"), ("R1-retry", "applied")]


# ---------------------------------------------------------------------- keys and the secret
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


def test_keys_on_a_store_of_integer_ids_are_refused(tmp_path):
    year = Year(tmp_path / "s.zarr")
    optimizer = torch.optim.SGD(year.model.parameters(), lr=0.05)
    with pu.UpdateRecorder(year.model, optimizer, year.store) as rec:
        rec.batch([1, 2])
        torch.nn.functional.cross_entropy(year.model(torch.randn(2, 8)), torch.tensor([0, 1])).backward()
        optimizer.step()
    with pytest.raises(TypeError, match="recorded its samples by integer ID"):
        pu.amnesiac_forget(year.model, year.store, ["alice"])


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


# ---------------------------------------------------------------------- the command line
def test_forget_by_keys_on_the_command_line_and_the_ledger_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(pu.keys.SECRET_ENV, SECRET)
    year = Year(tmp_path / "s.zarr")
    year.train([f"user{i}@example.com" for i in range(8)], seed=0)
    year.store.close()
    torch.save(year.model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "keys.txt").write_text("user1@example.com\nuser5@example.com\nnobody@example.com\n")
    assert main(["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "model.pt"),
                 "--keys", str(tmp_path / "keys.txt"), "--request-id", "TICKET-42",
                 "--out", str(tmp_path / "model.pt")]) == 0
    assert "request TICKET-42: forgot 3 keys (1 never seen)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "s.zarr"), "--ledger"]) == 0
    table = capsys.readouterr().out
    assert "TICKET-42" in table and "applied" in table and "1 deletion requests" in table
    assert main(["inspect", str(tmp_path / "s.zarr"), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    (request,) = exported["requests"]
    assert request["request"] == "TICKET-42" and request["status"] == "applied" and request["keys"] == 3
    assert request["missing_keys"] == 1 and request["version"] == pu.__version__ and request["time"].endswith("+00:00")
    assert [m["made_by"] for m in exported["models"]] == ["training", "deletion"]
    assert "example.com" not in json.dumps(exported)


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
    pu.amnesiac_forget(year.model, year.store, ["u3"], commit=False)  # saved, never confirmed
    year.request(["u3"])
    year.train([f"v{i}" for i in range(4)], seed=1)  # goes on from the pending deletion's model
    assert year.store.ledger.status(0) == "applied" and year.store.ledger.pending is None
    pu.amnesiac_forget(year.model, year.store, ["v1"])
    year.request(["v1"])
    assert _close(year.model, year.expected(year.store.steps))
    assert year.store.ledger.status(0) == "applied" and year.store.ledger.audit()[-1]["steps"] == sorted(
        {s for s, b in enumerate(year.batches) if "v1" in b})


def test_a_deletion_trained_on_cannot_be_undone(tmp_path):
    year = Year(tmp_path / "s.zarr")
    year.train([f"u{i}" for i in range(8)], seed=0)
    report = pu.amnesiac_forget(year.model, year.store, ["u3"])
    optimizer = torch.optim.SGD(year.model.parameters(), lr=0.05)
    rec = pu.UpdateRecorder(year.model, optimizer, year.store)
    year.step(["w1"], optimizer, rec)
    rec.flush()
    with pytest.raises(pu.StoreError, match="can no longer be undone"):
        year.store.record_deletion(report.ledger_before, replacing=report.ledger_after)
    rec.close()
    assert year.store.ledger.status(0) == "applied"


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
    assert last.made_by == "training" and last.requests == len(year.store.ledger.records) == 2
    again = pu.amnesiac_forget(year.model, year.store, [])
    assert again.steps_applied == 0 and _close(year.model, year.expected(year.store.steps))


def test_a_pending_deletion_whose_model_was_lost_lets_the_model_before_it_train(tmp_path):
    year = Year(tmp_path / "s.zarr")
    before = year.train([f"u{i}" for i in range(8)], seed=0)
    pu.amnesiac_forget(year.model, year.store, ["u3"], commit=False)  # killed before the model was saved
    year.store.close()
    store = pu.UpdateStore.open(tmp_path / "s.zarr", secret=SECRET)
    model = _model(before)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        with pytest.raises(pu.RecorderError, match="deletion was requested"):
            rec.batch(["u3"])  # until the first step says which model trains, the deletion may hold
        for keys in (["u1"], ["u3"]):  # then it is undone: u3 is not forgotten after all
            rec.batch(keys)
            torch.nn.functional.cross_entropy(model(torch.randn(1, 8)), torch.tensor([0])).backward()
            optimizer.step()
    assert [r["status"] for r in store.ledger.audit()] == ["undone"]


def test_forgetting_through_a_handle_a_recorder_writes_is_refused(tmp_path):
    year = Year(tmp_path / "s.zarr")
    year.train([f"u{i}" for i in range(8)], seed=0)
    optimizer = torch.optim.SGD(year.model.parameters(), lr=0.05)
    with pu.UpdateRecorder(year.model, optimizer, year.store) as rec:
        year.step(["w1"], optimizer, rec)
        with pytest.raises(pu.StoreError, match="close it"):
            pu.amnesiac_forget(year.model, year.store, ["u1"])
        with pytest.raises(pu.StoreError, match="rec.close"):
            year.store.mark_final(year.model)
    pu.amnesiac_forget(year.model, year.store, ["u1"])


def test_a_format_3_store_with_a_deletion_continues_from_the_deletions_model(tmp_path):
    from pyunlearn.kernels import fingerprint
    from tests.support.old_formats import as_format_3

    year = Year(tmp_path / "s.zarr")
    trained = year.train(list(range(8)), seed=0)
    year.request([3])
    deleted = _model(trained)
    with torch.no_grad():  # what format 3's deletion of u3 produced
        for p, e in zip(deleted.parameters(), year.expected(year.store.steps)):
            p.copy_(e)
    year.store.close()
    path = tmp_path / "s.zarr" / "zarr.json"
    doc = json.loads(path.read_text())
    as_format_3(doc["attributes"], sorted(year.removed), fingerprint([p for p in deleted.parameters() if p.requires_grad]))
    path.write_text(json.dumps(doc))
    store = pu.UpdateStore.open(tmp_path / "s.zarr", secret=SECRET)
    assert store.metadata.format_version == 3 and [m.made_by for m in store.ledger.models] == ["training", "deletion"]
    assert store.metadata.resume_point.fingerprint == store.ledger.models[1].fingerprint
    year.store, year.model = store, _model(trained)
    with pytest.raises(pu.RecorderError, match="deletion requests came in after this model"):
        year.train([21, 22], seed=1)
    year.model = deleted
    year.train([21, 22], seed=1)
    pu.amnesiac_forget(year.model, store, [5])
    year.request([5])
    assert store.steps == len(year.updates), (store.steps, len(year.updates))
    assert _close(year.model, year.expected(store.steps)) and store.metadata.format_version == 4
    old = _model(trained)  # format 3's final model: both deletions are subtracted
    pu.amnesiac_forget(old, store, [])
    assert _close(old, year.expected(4))


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
