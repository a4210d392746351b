"""The experiment runner: rows it adds itself, the noise-floor rule, and its errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pyunlearn.data import SampleSet
from pyunlearn.evaluation.experiment import METRICS, ORIGINAL, RETRAIN, RETRAIN_2, MethodRun, Results, Split, run


def _blobs(n, first_id, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 2.0]])
    x = centres[y] + 1.5 * torch.randn(n, 4, generator=gen)
    return SampleSet(torch.arange(first_id, first_id + n), x, y)


def _prepare(seed):
    train = _blobs(400, 0, 100 + seed)
    return Split(train=train, forget=train.subset(torch.arange(20)), test=_blobs(300, 1000, 200 + seed))


class _Artifacts:
    closed = 0

    def close(self):
        _Artifacts.closed += 1


def _train(data, seed, record):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        for _, x, y in data.batches(50, generator=gen):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model, (_Artifacts() if record else None)


def test_run_adds_original_and_two_retrains_and_measures_every_method():
    seen = {}

    def nothing(model, context):
        seen.setdefault("seeds", []).append(context.seed)
        return {"steps": 0}

    def retrain_exactly(model, context):  # what a perfect method would produce
        retrained, _ = _train(context.split.retain, context.seed, False)
        model.load_state_dict(retrained.state_dict())

    _Artifacts.closed = 0
    results = run(seeds=[0, 1], prepare=_prepare, train=_train, methods={"nothing": nothing, "exact": retrain_exactly},
                  mia_seeds=(0, 1), mia_samples=200, log=None)
    assert results.methods() == [ORIGINAL, RETRAIN, RETRAIN_2, "nothing", "exact"]
    assert seen["seeds"] == [0, 1] and _Artifacts.closed == 2
    by = {(r.method, r.seed): r for r in results.rows}
    for seed in (0, 1):
        nothing_row, original = by[("nothing", seed)], by[(ORIGINAL, seed)]
        assert all(getattr(nothing_row, m) == getattr(original, m) for m in METRICS)
        assert nothing_row.extra == {"steps": 0} and original.seconds == 0.0
        exact = by[("exact", seed)]
        assert exact.forget_loss_ks == 0.0 and exact.forget_kl == pytest.approx(0.0, abs=1e-12)
        assert by[(RETRAIN, seed)].time_share == 1.0
    summary = {s.method: s for s in results.summary()}
    assert summary["exact"].beyond_noise == [] and summary["exact"].gap == pytest.approx(0.0, abs=1e-9)
    assert summary[RETRAIN_2].beyond_noise == []  # the floor is its own largest distance
    table = results.table()
    assert "noise floor" in table.lower() and "| exact |" in table
    d = results.to_dict()
    assert set(d) == {"config", "rows", "noise_floor", "summary"} and d["config"]["seeds"] == [0, 1]


def _row(method, seed, **values):
    base = dict(UA=10.0, RA=90.0, TA=85.0, MIA=20.0, MIA_sd=0.0, membership_gap=-0.1, forget_loss_ks=0.0,
                forget_kl=0.0, seconds=1.0, retrain_seconds=10.0)
    base.update(values)
    return MethodRun(method=method, seed=seed, **base)


def test_the_noise_floor_rule_by_hand():
    rows = [
        _row(RETRAIN, 0), _row(RETRAIN, 1, UA=12.0),
        # Retrain seed 2 lands 1 and 3 UA points away, KS 0.1 and 0.2: floors UA 3, KS 0.2.
        _row(RETRAIN_2, 0, UA=11.0, forget_loss_ks=0.1), _row(RETRAIN_2, 1, UA=9.0, forget_loss_ks=0.2),
        # Mean UA distance (2 + 4) / 2 = 3: not above the floor of 3. Mean KS 0.25 > 0.2: counts.
        _row("a", 0, UA=12.0, forget_loss_ks=0.2), _row("a", 1, UA=16.0, forget_loss_ks=0.3),
        # Mean UA distance (4 + 3) / 2 = 3.5 > 3: counts; TA 2 and 0 points off, floor 0: counts.
        _row("b", 0, UA=14.0, TA=87.0, seconds=2.0), _row("b", 1, UA=9.0, seconds=1.0),
    ]
    results = Results(rows)
    floor = results.noise_floor()
    assert floor["UA"] == 3.0 and floor["forget_loss_ks"] == 0.2 and floor["TA"] == 0.0
    s = {x.method: x for x in results.summary()}
    assert s["a"].beyond_noise == ["forget_loss_ks"]
    assert s["b"].beyond_noise == ["UA", "TA"]
    assert s["b"].distance["UA"] == 3.5 and s["b"].time_share == pytest.approx(0.15)
    assert s["b"].mean["UA"] == 11.5 and s["b"].sd["UA"] == pytest.approx(np.std([14.0, 9.0], ddof=1))
    assert s["b"].gap == pytest.approx((3.5 + 0 + 1.0 + 0) / 4)
    assert "11.50 ± 3.54*" in results.table()  # b's UA, marked


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="seeds"):
        run(seeds=[], prepare=_prepare, train=_train, methods={})
    with pytest.raises(ValueError, match="mia_protocol"):
        run(seeds=[0], prepare=_prepare, train=_train, methods={}, mia_protocol="x")
    with pytest.raises(ValueError, match="Retrain"):
        run(seeds=[0], prepare=_prepare, train=_train, methods={RETRAIN: lambda m, c: None})
    with pytest.raises(TypeError, match=r"methods\['x'\]"):
        run(seeds=[0], prepare=_prepare, train=_train, methods={"x": 3})
    with pytest.raises(TypeError, match="prepare"):
        run(seeds=[0], prepare=lambda s: None, train=_train, methods={}, log=None)
    train = _blobs(10, 0, 0)
    with pytest.raises(ValueError, match="nothing to forget"):
        Split(train=train, forget=_blobs(3, 500, 1), test=train)
    with pytest.raises(ValueError, match="no Retrain seed 2"):
        Results([_row(RETRAIN, 0)]).noise_floor()
