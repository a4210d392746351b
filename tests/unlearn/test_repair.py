"""repair: replaying the removed steps' retained samples at each step's learning rate."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.data import SampleSet
from pyunlearn.unlearn import StaleBuffersWarning, forget_and_repair, repair, subtracted_steps


def _data(n=120, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return SampleSet(torch.arange(100, 100 + n), torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def _record(tmp_path, model, data, *, attribution="update", lrs=None, momentum=0.0, name="s.zarr"):
    """Two epochs of batches of 20 (the ID lists are returned), lr per step from `lrs`."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    store = pu.UpdateStore.create(tmp_path / name, model, keep=1.0, value_dtype="float32", attribution=attribution)
    batches, gen = [], torch.Generator().manual_seed(1)
    with pu.UpdateRecorder(model, opt, store) as rec:
        for _ in range(2):
            for ids, x, y in data.batches(20, generator=gen):
                if lrs is not None:
                    opt.param_groups[0]["lr"] = lrs[len(batches)]
                batches.append(ids.tolist())
                rec.batch(ids)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    return store, batches


def _replay_by_hand(model, data, batches, steps, rates):
    by_id = {int(i): n for n, i in enumerate(data.ids.tolist())}
    for step, rate in zip(steps, rates):
        rows = [by_id[i] for i in sorted(batches[step]) if i in by_id]
        if not rows:
            continue
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x[rows]), data.y[rows]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= rate * p.grad


def test_step_ids_are_the_recorded_batches(tmp_path):
    torch.manual_seed(0)
    store, batches = _record(tmp_path, torch.nn.Linear(5, 3), _data())
    got = store.step_ids([3, 0, 11])
    assert [g.tolist() for g in got] == [sorted(batches[s]) for s in (3, 0, 11)]
    assert store.step_ids([]) == []
    with pytest.raises(ValueError, match="steps"):
        store.step_ids([12])
    store.close()


def test_repair_replays_each_removed_steps_retained_samples(tmp_path):
    torch.manual_seed(0)
    data = _data()
    model = torch.nn.Linear(5, 3)
    store, batches = _record(tmp_path, model, data)
    forget_ids = [101, 150, 177]
    retain = data.without(forget_ids)
    report = pu.amnesiac_forget(model, store, forget_ids)
    steps = subtracted_steps(report)
    assert steps.tolist() == sorted(s for s, b in enumerate(batches) if set(b) & set(forget_ids))
    expected = copy.deepcopy(model)
    _replay_by_hand(expected, retain, batches, steps.tolist(), [0.1] * steps.size)
    result = repair(model, store, report, retain, lr=0.1)
    for p, q in zip(model.parameters(), expected.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    replayed = sum(len(set(batches[s]) - set(forget_ids)) for s in steps)
    assert result.steps_replayed == steps.size and result.samples_replayed == replayed
    assert result.retrain_share == pytest.approx(replayed / store.samples) and result.retrain_share < 1
    store.close()


@pytest.mark.parametrize("attribution", ["gradient", "update"])
def test_repair_reads_the_recorded_learning_rates(tmp_path, attribution):
    torch.manual_seed(0)
    data = _data()
    lrs = np.linspace(0.2, 0.02, 12)  # a schedule: one rate per step
    model = torch.nn.Linear(5, 3)
    store, batches = _record(tmp_path, model, data, attribution=attribution, lrs=lrs)
    assert np.array_equal(store.read_step_hyper(store.steps)[:, 0], lrs)
    retain = data.without([130])
    report = pu.amnesiac_forget(model, store, [130])
    steps = subtracted_steps(report)
    expected = copy.deepcopy(model)
    _replay_by_hand(expected, retain, batches, steps.tolist(), lrs[steps])
    repair(model, store, steps, retain)  # lr=None: the recorded per-step rates
    for p, q in zip(model.parameters(), expected.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    store.close()


def test_repair_budget_fine_tune_and_errors(tmp_path):
    torch.manual_seed(0)
    data = _data()
    model = torch.nn.Linear(5, 3)
    store, batches = _record(tmp_path, model, data)
    report = pu.amnesiac_forget(model, store, [101, 150, 177])
    steps = subtracted_steps(report)
    retain = data.without([101, 150, 177])
    m = copy.deepcopy(model)
    r = repair(m, store, steps, retain, lr=0.1, max_steps=2, fine_tune_epochs=0.5, batch_size=20)
    assert r.steps_replayed == 2 and r.fine_tune_steps == 3 and r.samples_fine_tuned == 60
    assert r.retrain_share == pytest.approx((r.samples_replayed + 60) / store.samples)
    # The steps' sample IDs read beforehand (as pu.forget does) replay the same, max_steps included.
    given = copy.deepcopy(model)
    g = repair(given, store, steps, retain, lr=0.1, max_steps=2, fine_tune_epochs=0.5, batch_size=20,
               step_ids=store.step_ids(steps))
    assert (g.steps_replayed, g.samples_replayed, g.samples_fine_tuned) == (2, r.samples_replayed, 60)
    for p, q in zip(given.parameters(), m.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="removed_steps must be in ascending order without repeats when step_ids"):
        reverse = steps[::-1]  # store.step_ids keeps the order given: each array must meet its own step
        repair(copy.deepcopy(model), store, reverse, retain, lr=0.1, step_ids=store.step_ids(reverse))
    with pytest.raises(ValueError, match=r"step_ids must hold one array per removed step \(%d\), got 1" % steps.size):
        repair(copy.deepcopy(model), store, steps, retain, lr=0.1, step_ids=store.step_ids(steps[:1]))
    with pytest.raises(ValueError, match="lr, given per step"):
        repair(copy.deepcopy(model), store, steps, retain, lr=[0.1, 0.1])
    with pytest.raises(ValueError, match="removed_steps"):
        repair(copy.deepcopy(model), store, [99], retain, lr=0.1)
    with pytest.raises(TypeError, match="data"):
        repair(copy.deepcopy(model), store, steps, retain.x, lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        repair(copy.deepcopy(model), store, steps, retain, lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="fine_tune_epochs"):
        repair(copy.deepcopy(model), store, steps, retain, lr=0.1, fine_tune_epochs=-1)
    store.close()


def test_repair_brings_back_what_subtraction_took(tmp_path):
    """Dense subtraction of most steps loses retained accuracy; replaying them restores it."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (300,), generator=gen)
    x = torch.nn.functional.one_hot(y, 5).float() * 2 + torch.randn(300, 5, generator=gen)
    data = SampleSet(torch.arange(300), x, y)
    model = torch.nn.Linear(5, 3)
    store, batches = _record(tmp_path, model, data)
    forget = data.subset(torch.arange(0, 300, 20))  # 15 samples, in most batches
    retain = data.without(forget.ids)
    original = pu.evaluation.metrics.accuracy(model, retain)
    report = pu.amnesiac_forget(model, store, forget.ids)
    assert report.steps_removed > len(batches) // 2
    subtracted = pu.evaluation.metrics.accuracy(model, retain)
    repair(model, store, report, retain, lr=0.1)
    assert subtracted < original - 10 and pu.evaluation.metrics.accuracy(model, retain) > original - 5
    store.close()


def test_forget_and_repair_recomputes_batchnorm_without_warning(tmp_path):
    torch.manual_seed(0)
    data = _data()
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    store, _ = _record(tmp_path, model, data)
    retain = data.without([101])
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleBuffersWarning)
        forget_report, repaired = forget_and_repair(model, store, [101], retain, lr=0.1)
    assert repaired.batchnorm_samples == len(retain) and forget_report.steps_removed == 2
    with torch.no_grad():
        assert torch.allclose(model[1].running_mean, model[0](retain.x).mean(0), atol=0.05)
    store.close()


def test_a_step_without_a_known_learning_rate_needs_lr(tmp_path):
    """Steps appended by hand (no recorder) and stores before format 4 record no rate."""
    model = torch.nn.Linear(5, 3)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32")
    params = [p.detach() for p in store.check_model(model)]
    row = pu.kernels.prune_topk([p.clone() for p in params], [p + 1 for p in params], store.k, "float32", refresh=False)
    store.append(row, [100])
    store.append(row, [101], hyper=(0.05,))
    store.mark_final(model)
    rates = store.read_step_hyper(2)[:, 0]
    assert np.isnan(rates[0]) and rates[1] == 0.05
    with pytest.raises(ValueError, match="records no learning rate for some steps"):
        repair(model, store, [0, 1], _data())
    repair(model, store, [1], _data())  # step 1's rate is known
    with pytest.raises(ValueError, match="hyper"):
        store.append(row, [102], hyper=(0.1,) * 5)
    store.close()
