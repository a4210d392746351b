"""A deletion request means what it says (issue 24): a request that matched nothing is not
"applied", keys are canonical, a store of keys refuses integers before anything changes, a
catch-up is not a request, a request id is used once, a pending deletion is never undone by an
unrelated catch-up, a gradient store's catch-up uses the model's own steps, float64 stays float64."""
from __future__ import annotations

import copy
import uuid

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn import attribution
from tests.support import TinyNet, recorded_store, tiny_data, tiny_training

SECRET = "forget-request-tests-secret-012345"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state) -> bool:
    return all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def _keyed(path, keys):
    """A store of keys trained on `keys` (one epoch, batches of 8): (model, store)."""
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(path, model, keep=0.25, secret=SECRET)
    _, x, y = tiny_data(len(keys))
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for batch in torch.arange(len(keys)).split(8):
            rec.batch([keys[i] for i in batch.tolist()])
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model, store


def test_a_request_that_matched_nothing_is_refused_or_recorded_as_not_found(tmp_path):
    recorded = recorded_store(tmp_path / "s.zarr")
    before, records = _state(recorded.model), len(recorded.store.ledger)
    with pytest.raises(pu.errors.NotFoundError, match="none of the 2 IDs"):
        pu.amnesiac_forget(recorded.model, recorded.store, [5, 6])
    assert _unchanged(recorded.model, before) and len(recorded.store.ledger) == records
    report = pu.amnesiac_forget(recorded.model, recorded.store, [5, 6], not_found="record")
    assert report.status == "not-found" and report.matched == 0 and report.steps_removed == 0
    assert recorded.store.ledger.audit()[-1]["status"] == "not-found"
    partly = pu.amnesiac_forget(recorded.model, recorded.store, [1003, 7])  # partly found: applied, says so
    assert partly.status == "applied" and partly.matched == 1 and partly.missing_ids.tolist() == [7]
    assert recorded.store.ledger.audit()[-1]["missing"] == 1


def test_uuid_spellings_and_unicode_forms_are_one_key(tmp_path):
    person = uuid.UUID("e3b0c442-98fc-1c14-9afb-f4c8996fb924")
    keys = [person] + [f"user{i}" for i in range(30)] + ["Zo\u00eb"]  # precomposed ë
    model, store = _keyed(tmp_path / "s.zarr", keys)
    spellings = [str(person).upper(), "{" + str(person) + "}", "urn:uuid:" + str(person), person]
    steps = [store.steps_for([s]).steps.tolist() for s in spellings]
    assert steps[0] and all(s == steps[0] for s in steps)
    assert store.steps_for(["Zoe\u0308"]).steps.tolist() == store.steps_for(["Zo\u00eb"]).steps.tolist() != []
    assert store.steps_for(["zo\u00eb"]).missing.size == 1  # case is kept
    report = pu.amnesiac_forget(model, store, ["URN:UUID:" + str(person).upper(), "Zoe\u0308"])
    assert report.matched == 2 and report.status == "applied"


def test_a_store_of_keys_refuses_integers_and_keys_without_the_secret_before_anything_changes(tmp_path, monkeypatch):
    monkeypatch.delenv("PYUNLEARN_SECRET", raising=False)
    monkeypatch.delenv("PYUNLEARN_SECRET_FILE", raising=False)
    model, store = _keyed(tmp_path / "s.zarr", [f"user{i}" for i in range(32)])
    store.close()
    no_secret = pu.UpdateStore.open(tmp_path / "s.zarr")
    before, records = _state(model), len(no_secret.ledger)
    mapped = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r", secret=SECRET).ids_for(["user3"])
    for ids in ([int(mapped[0])], np.asarray(mapped), torch.tensor([5])):  # the key's very ID, as a plain integer
        with pytest.raises(TypeError, match="maps keys to sample IDs with a secret"):
            pu.amnesiac_forget(model, no_secret, ids)
    with pytest.raises(pu.KeyMappingError, match="need the store's secret"):
        pu.amnesiac_forget(model, no_secret, ["user3"])
    assert _unchanged(model, before) and len(pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").ledger) == records
    with_secret = pu.UpdateStore.open(tmp_path / "s.zarr", secret=SECRET)
    report = pu.amnesiac_forget(model, with_secret, with_secret.ids_for(["user3"]))  # mapped IDs are accepted
    assert report.status == "applied" and report.matched == 1


def test_a_store_of_integers_refuses_keys(tmp_path):
    recorded = recorded_store(tmp_path / "s.zarr")
    with pytest.raises(TypeError, match="recorded its samples by integer ID"):
        pu.amnesiac_forget(recorded.model, recorded.store, ["1003"])


def test_a_catch_up_is_its_own_record_and_a_no_op_writes_nothing(tmp_path):
    recorded = recorded_store(tmp_path / "s.zarr")
    deployed = copy.deepcopy(recorded.model)
    pu.amnesiac_forget(recorded.model, recorded.store, [1003], request_id="R1")
    caught = pu.amnesiac_forget(deployed, recorded.store, [])
    assert caught.status == "caught-up" and caught.request_id is None and caught.steps_applied > 0
    kinds = [r.kind for r in recorded.store.ledger.records]
    assert kinds == ["segment", "deletion", "catch-up"]
    assert [row["request"] for row in recorded.store.ledger.audit()] == ["R1"]  # requests only
    nothing = pu.amnesiac_forget(deployed, recorded.store, [])
    assert nothing.status == "up-to-date" and nothing.record is None and len(recorded.store.ledger) == 3


def test_a_request_id_is_used_once(tmp_path):
    recorded = recorded_store(tmp_path / "s.zarr")
    pu.amnesiac_forget(recorded.model, recorded.store, [1003], request_id="GDPR-7")
    before = _state(recorded.model)
    with pytest.raises(pu.StoreError, match="'GDPR-7' was already used by record 1 .*applied"):
        pu.amnesiac_forget(recorded.model, recorded.store, [1004], request_id="GDPR-7")
    assert _unchanged(recorded.model, before) and len(recorded.store.ledger) == 2
    recorded.store.close()
    reopened = pu.UpdateStore.open(tmp_path / "s.zarr")  # the marker, not the handle, remembers it
    with pytest.raises(pu.StoreError, match="already used"):
        pu.amnesiac_forget(recorded.model, reopened, [1004], request_id="GDPR-7")


def test_a_pending_deletion_is_not_undone_by_an_unrelated_catch_up(tmp_path):
    """Case 6: `pyunlearn forget` wrote its output and was killed before confirming; then an
    older checkpoint is caught up. The pending deletion is applied to that one too and
    confirmed; the saved output stays on the timeline and its samples stay forgotten."""
    recorded = recorded_store(tmp_path / "s.zarr")
    store, model = recorded.store, recorded.model
    old = copy.deepcopy(model)
    pu.amnesiac_forget(model, store, [1010], request_id="R1")
    older = copy.deepcopy(old)  # a checkpoint from before R1
    saved = copy.deepcopy(model)
    report = pu.amnesiac_forget(saved, store, [1003], request_id="R2", commit=False)  # killed before confirm
    assert report.status == "pending" and store.ledger.state.pending == report.record
    caught = pu.amnesiac_forget(older, store, [])
    statuses = {row["request"]: row["status"] for row in store.ledger.audit()}
    assert statuses == {"R1": "applied", "R2": "applied"}
    assert all(torch.equal(a, b) for a, b in zip(older.parameters(), saved.parameters()))  # R1 and R2 both applied
    assert caught.steps_applied == np.union1d(store.steps_for([1010]).steps, store.steps_for([1003]).steps).size
    assert pu.amnesiac_forget(saved, store, []).status == "up-to-date"  # the saved output is still accepted
    assert 1003 in store.forgotten_ids()
    optimizer = torch.optim.SGD([p for p in saved.parameters() if p.requires_grad], lr=0.1)
    with pu.UpdateRecorder(saved, optimizer, store) as rec, pytest.raises(pu.RecorderError, match="requested"):
        rec.batch([1003])


def test_training_from_the_model_before_a_pending_deletion_is_refused_until_it_is_applied(tmp_path):
    recorded = recorded_store(tmp_path / "s.zarr")
    store, model = recorded.store, recorded.model
    before = copy.deepcopy(model)
    pu.amnesiac_forget(model, store, [1003], commit=False)
    optimizer = torch.optim.SGD([p for p in before.parameters() if p.requires_grad], lr=0.1)
    ids, x, y = tiny_data(120)
    with pytest.raises(pu.errors.ResumeRefused, match="still holds"):
        with pu.UpdateRecorder(before, optimizer, store) as rec:
            tiny_training(before, optimizer, (ids[20:40], x[20:40], y[20:40]), epochs=1, recorder=rec)
    assert store.ledger.state.pending is not None  # nothing settled by a refusal


def test_a_gradient_catch_up_uses_the_coefficients_of_the_models_own_steps(tmp_path):
    """Case 4: forgetting from an older segment's end on a gradient store subtracts each step's
    gradient times its effect on *that* model (momentum carried up to its last step), not on the
    store's latest model."""
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32",
                                  attribution="gradient")
    data = tiny_data(64)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        first = tiny_training(model, optimizer, data, epochs=1, recorder=rec)
    segment_one = copy.deepcopy(model)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        tiny_training(model, optimizer, data, epochs=1, seed=1, recorder=rec)
    steps = store.steps_for([1003]).steps
    early = steps[steps < first]
    own = attribution.coefficients(store, early, up_to=first)
    latest = attribution.coefficients(store, early, up_to=store.steps)
    assert not np.allclose(own, latest)  # momentum after the first segment would add to it
    expected = [p.detach().clone() for p in segment_one.parameters() if p.requires_grad]
    rows = store.read(early)
    rows = rows._replace(scales=rows.scales * torch.from_numpy(-own.astype(np.float32))[:, None])
    pu.kernels.subtract_sparse_reference(expected, rows, store.k)
    report = pu.amnesiac_forget(segment_one, store, [1003])
    assert report.steps_applied == early.size
    got = [p.detach() for p in segment_one.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))


def test_float64_parameters_are_forgotten_in_float64(tmp_path):
    """Case 10: forgetting one step of a float64 model changes only the entries that step
    touched (before, every value came back rounded to float32)."""
    torch.manual_seed(0)
    model = TinyNet().double()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.1, value_dtype="float32")
    ids, x, y = tiny_data(64)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        tiny_training(model, optimizer, (ids, x.double(), y), epochs=1, recorder=rec)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    step = int(store.steps_for([1003]).steps[0])
    pu.amnesiac_forget(model, store, [1003])
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float64 for p in after)
    changed = sum(int((a != b).sum()) for a, b in zip(after, before))
    assert 0 < changed <= sum(store.k)  # at most the one step's kept entries
    row = store.read([step])
    for (positions, delta), a, b in zip(pu.kernels.decode_row(pu.Row(*(f[0] for f in row)), store.k), after, before):
        assert torch.equal(a.view(-1)[positions], b.view(-1)[positions] - delta.double())
