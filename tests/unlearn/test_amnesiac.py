"""amnesiac_forget: the arithmetic, the ledger, refusals, and all-or-nothing behaviour."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import pyunlearn as pu
from tests.support import TinyNet, recorded_store, tiny_data, tiny_training
from tests.support.stores import params_copy
from tests.support.stores import recorded_path as _recorded
from tests.support.stores import same_tensors as _same
from tests.support.stores import small_recorded_run


@pytest.fixture
def recorded(tmp_path, device):
    """A recorded TinyNet on each device of the `device` axis (conftest)."""
    run = recorded_store(tmp_path / "s.zarr", keep=0.2, epochs=3, device=device)
    return run.model, run.store


def _params(model):
    return [p.detach().cpu().clone() for p in model.parameters() if p.requires_grad]


def test_equals_a_pure_torch_computation_from_the_stored_rows(recorded):
    model, store = recorded
    expected = _params(model)
    steps = store.steps_for([1000, 1050]).steps
    pu.kernels.subtract_sparse_reference(expected, store.read(steps), store.k)
    report = pu.amnesiac_forget(model, store, [1000, 1050, 99999])
    assert report.steps_removed == steps.size == report.steps_applied
    assert report.missing_ids.tolist() == [99999]
    for got, want in zip(_params(model), expected):
        assert torch.equal(got, want)
    assert report.change_norm > 0 and report.seconds > 0


def test_ledger_never_subtracts_a_step_twice(recorded):
    model, store = recorded
    original = copy.deepcopy(model)
    first = pu.amnesiac_forget(model, store, [1000, 1001])
    after_first = _params(model)
    again = pu.amnesiac_forget(model, store, [1000])
    assert again.steps_removed == 0 and again.steps_applied == 0
    assert all(torch.equal(a, b) for a, b in zip(_params(model), after_first))
    overlapping = pu.amnesiac_forget(model, store, [1001, 1002])
    steps_1002 = set(store.steps_for([1002]).steps) - set(store.steps_for([1000, 1001]).steps)
    assert overlapping.steps_removed == len(steps_1002)
    assert overlapping.ledger_steps == first.steps_removed + len(steps_1002)
    pu.amnesiac_forget(model, store, [1003])
    # The original model, reloaded, gets every ledger step subtracted and lands where the
    # sequence of requests led (to float rounding: the subtraction order differs).
    report = pu.amnesiac_forget(original, store, [1003])
    assert report.steps_removed == 0
    assert report.steps_applied == len(set(store.steps_for([1000, 1001, 1002, 1003]).steps))
    for got, want in zip(_params(original), _params(model)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert store.ledger.fingerprint == pu.kernels.fingerprint(_params(original))
    # Both are fine to forget from again; a third model is not.
    pu.amnesiac_forget(original, store, [1004])


def test_unknown_model_is_refused(recorded, tmp_path):
    model, store = recorded
    stranger = copy.deepcopy(model)
    with torch.no_grad():
        stranger.fc1.bias.add_(1e-3)
    before = _params(stranger)
    with pytest.raises(pu.ModelMismatchError, match="not on the store.s timeline"):
        pu.amnesiac_forget(stranger, store, [1000])
    assert all(torch.equal(a, b) for a, b in zip(_params(stranger), before))
    other = torch.nn.Linear(8, 3)
    with pytest.raises(pu.ModelMismatchError, match="missing"):
        pu.amnesiac_forget(other, store, [1000])
    reshaped = TinyNet()
    reshaped.fc2 = torch.nn.Linear(16, 4)
    with pytest.raises(pu.ModelMismatchError, match=r"fc2.weight has shape \(4, 16\)"):
        pu.amnesiac_forget(reshaped, store, [1000])


def test_bad_ids(recorded):
    model, store = recorded
    with pytest.raises(TypeError, match="ids must hold integers"):
        pu.amnesiac_forget(model, store, [1.5, 2.0])
    with pytest.raises(TypeError, match="recorded its samples by integer ID"):
        pu.amnesiac_forget(model, store, ["alice@example.com"])
    with pytest.raises(TypeError, match="store must be an UpdateStore"):
        pu.amnesiac_forget(model, "store.zarr", [1000])


def test_failed_ledger_write_puts_the_model_back(recorded, monkeypatch):
    model, store = recorded
    before = _params(model)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    records = len(store.ledger)
    monkeypatch.setattr(store, "record", fail)
    with pytest.raises(OSError, match="disk full"):
        pu.amnesiac_forget(model, store, [1000])
    assert all(torch.equal(a, b) for a, b in zip(_params(model), before))
    assert store.ledger.removed_steps.size == 0 and len(store.ledger) == records


def test_store_without_a_final_model_is_refused(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.2)
    rec = pu.UpdateRecorder(model, optimizer, store)
    tiny_training(model, optimizer, tiny_data(), epochs=1, recorder=rec)
    with pytest.raises(pu.StoreError, match="held for recording .* close that first"):  # not while it records here
        pu.amnesiac_forget(model, store, [1000])
    rec.close()
    # Steps written without a recorder that closes (as a crashed run leaves them): no final model.
    bare = pu.UpdateStore.create(tmp_path / "bare.zarr", model, keep=0.2)
    params = [p.detach() for p in bare.check_model(model)]
    bare.append(pu.kernels.prune_topk([p.clone() for p in params], [p + 1 for p in params], bare.k, refresh=False), [7])
    bare.flush()
    with pytest.raises(pu.StoreError, match="no model to forget from.*mark_final"):
        pu.amnesiac_forget(model, bare, [7])
    bare.mark_final(model)
    assert pu.amnesiac_forget(model, bare, [7]).steps_removed == 1


def test_non_contiguous_and_half_parameters(tmp_path):
    """Parameters the kernels cannot update in place are worked on as float32 copies."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
    model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32")
    initial = _params(model)
    ids, x = torch.arange(8), torch.randn(8, 2, 6, 6)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for step in range(4):
            rec.batch(ids[step * 2 : step * 2 + 2])
            optimizer.zero_grad()
            model(x[step * 2 : step * 2 + 2]).sum().backward()
            optimizer.step()
    pu.amnesiac_forget(model, store, ids)
    for got, want in zip(_params(model), initial):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ rollback, change norm, models before later steps, fresh handles
@pytest.mark.parametrize("whole_copy", [False, True])
def test_a_failure_after_some_batches_puts_every_entry_back(tmp_path, monkeypatch, whole_copy):
    """Rows are subtracted a batch at a time; a failure in a later batch restores the entries
    the earlier ones changed (saved per batch, or a whole copy when the rows touch more entries
    than the model holds)."""
    import zarr

    import pyunlearn.unlearn.amnesiac as amnesiac

    model, path = _recorded(tmp_path, value_dtype="float32")
    store = pu.UpdateStore.open(path)
    steps = store.steps_for([1000, 1001, 1002, 1003]).steps
    assert steps.size >= 3
    zarr.open_array(path / "values", mode="r+")[int(steps[-1]), 0] = np.nan  # its place-bound digest no longer matches
    monkeypatch.setattr(amnesiac, "READ_BATCH_BYTES", 1)  # one row per batch
    if whole_copy:
        monkeypatch.setattr(amnesiac._Rollback, "__init__", _always_copy(amnesiac._Rollback.__init__))
    before = params_copy(model)
    with pytest.raises(pu.CorruptStoreError, match=f"row of step {int(steps[-1])} is not the one written"):
        pu.amnesiac_forget(model, store, [1000, 1001, 1002, 1003])
    assert _same(params_copy(model), before)


def _always_copy(init):
    def patched(self, work, store, rows):
        init(self, work, store, rows)
        self._copy = [w.clone() for w in work]
    return patched


def test_change_norm_counts_each_entry_once(tmp_path):
    model, path = _recorded(tmp_path, value_dtype="float32")
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters() if p.requires_grad])
    report = pu.amnesiac_forget(model, pu.UpdateStore.open(path), [1000, 1001, 1002, 1003])
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    assert report.change_norm == pytest.approx(float(torch.linalg.vector_norm(after - before)), rel=1e-6)


@pytest.mark.parametrize("numel", [40, 100_000])  # dense buffer path, unique path
def test_rollback_change_norm_counts_an_entry_once_with_its_earliest_value(numel):
    from pyunlearn.unlearn.amnesiac import _Rollback

    class Store:  # what _Rollback reads of a store
        k, row_length = [3], 3

    work = [torch.zeros(numel)]
    rollback = _Rollback(work, Store(), rows=1)
    gaps = torch.tensor([[1, 2, 3]], dtype=torch.uint32)  # positions 0, 2, 5
    rollback.save(pu.Row(gaps, torch.ones(1, 3), torch.ones(1, 1)))
    work[0][[0, 2, 5]] -= 1.0
    rollback.save(pu.Row(torch.tensor([[3, 1, 2]], dtype=torch.uint32), torch.ones(1, 3), torch.ones(1, 1)))  # 2, 3, 5
    work[0][[2, 3, 5]] -= 2.0
    original = torch.zeros(numel)
    assert rollback.change_norm() == pytest.approx(float(torch.linalg.vector_norm(work[0] - original)))
    rollback.restore()
    assert torch.equal(work[0], original)


def test_forgetting_from_a_model_before_later_steps_skips_the_steps_it_never_took(tmp_path):
    """A model marked final at step N, then more steps recorded and flushed without a new final
    (a crash before close): forgetting from the step-N model must not subtract steps it never
    took."""
    model, path = _recorded(tmp_path)
    store = pu.UpdateStore.open(path)
    final_n = TinyNet()
    final_n.load_state_dict(model.state_dict())
    params = [p.detach() for p in store.check_model(model)]
    row = pu.kernels.prune_topk([p.clone() for p in params], [p + 1 for p in params], store.k, refresh=False)
    store.append(row, [99999])
    store.flush()
    assert store.final_fingerprint is None and store.final_steps is None
    before = [p.detach().clone() for p in final_n.parameters()]
    report = pu.amnesiac_forget(final_n, store, [99999])
    assert report.steps_removed == 1 and report.steps_applied == 0  # step N is removed, but not from this model
    assert all(torch.equal(a, b) for a, b in zip(before, final_n.parameters()))


def test_forgetting_twice_with_fresh_handles(tmp_path):
    model, _ = small_recorded_run(tmp_path / "s.zarr")
    pu.amnesiac_forget(model, pu.UpdateStore.open(tmp_path / "s.zarr"), [1000])
    report = pu.amnesiac_forget(model, pu.UpdateStore.open(tmp_path / "s.zarr"), [1001])  # the lock was given back
    assert report.ledger_steps >= 1
