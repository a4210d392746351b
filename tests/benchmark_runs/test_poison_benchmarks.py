"""Issue 25's benchmarks on the digits: fidelity.py's poison scenarios, poison_store.py's keep ×
precision curve and batching_cost.py's per-user units complete and write what the README reads;
the poisoned data sets and units are what their docstrings say (the claims themselves are read
from benchmarks/results/)."""
from __future__ import annotations

import json

import numpy as np
import torch

from pyunlearn.data import SampleSet


def _data(n=600, side=8, classes=10):
    g = torch.Generator().manual_seed(0)
    return SampleSet(torch.arange(n), torch.rand(n, 1, side, side, generator=g) * 0.5,
                     torch.arange(n) % classes)


def test_backdoor_and_canary_data(benchmark_script):
    poison = benchmark_script("_poison")
    data, test = _data(), _data(200)
    bd = poison.backdoor(data, test, 0.05)
    assert len(bd.forget) == 30 and bool((bd.forget.y == poison.TARGET).all())
    assert bool((data.with_ids(bd.forget.ids).y != poison.TARGET).all())  # drawn from the other classes
    assert bool((bd.forget.x[..., -3:-1, -3:-1] == 1).all())  # the 2x2 trigger on 8x8 images
    clean = bd.train.without(bd.forget.ids)
    assert torch.equal(clean.x, data.without(bd.forget.ids).x)  # nothing else changed
    assert len(bd.probe) == int((test.y != poison.TARGET).sum()) and bool((bd.probe.x[..., -3:-1, -3:-1] == 1).all())
    assert poison.backdoor(data, test, 0.05).forget.ids.tolist() == bd.forget.ids.tolist()  # fixed

    can = poison.canary(data, 5, 4)
    assert len(can.forget) == 20 and len(can.probe) == 5 and len(can.train) == 600 - 5 + 20
    assert torch.unique(can.train.ids).numel() == len(can.train)  # every copy a sample of its own
    for j in range(5):
        copies = can.forget.subset(torch.arange(4 * j, 4 * j + 4))
        assert bool((copies.y == can.probe.y[j]).all()) and torch.equal(copies.x[0], can.probe.x[j])
    originals = data.subset(torch.isin(data.x.flatten(1), can.probe.x.flatten(1)).all(1))
    assert bool((originals.y != can.probe.y).all())  # a wrong label, and the original is gone from training
    assert not bool(torch.isin(originals.ids, can.train.ids).any())

    unit = poison.poison_units(can.train, can.forget, 50)
    forget = np.isin(can.train.ids.numpy(), can.forget.ids.numpy())
    assert (unit[forget] == 0).all() and (unit[~forget] != 0).all()
    sizes = np.bincount(unit)
    assert sizes[0] == 20 and sorted(set(sizes[1:12].tolist())) == [50] and (sizes[12:] == 1).all()


def test_user_units_hold_one_or_two_classes(benchmark_script):
    fidelity = benchmark_script("fidelity")
    labels = torch.arange(2000) % 10
    data = SampleSet(torch.arange(2000), torch.zeros(2000, 1), labels)
    unit = fidelity.user_units(data, units=10)  # users of 200: halves of 100
    assert np.array_equal(unit, fidelity.user_units(data, units=10))
    users = np.unique(unit[unit < 10])
    classes = [np.unique(labels.numpy()[unit == u]).size for u in users]
    assert all((unit == u).sum() == 200 for u in users)
    assert sorted(set(classes)) == [1, 2] and classes.count(1) == 5
    assert np.unique(unit[unit >= 10]).size == (unit >= 10).sum()  # the others units of one


def test_poison_scenarios_smoke_run(tmp_path, benchmark_script):
    fidelity = benchmark_script("fidelity")
    out = tmp_path / "poison.json"
    methods = ["Dense amnesiac", "Amnesiac keep 0.01 + repair", "Fine-tune 0.2 epoch",
               "Dense amnesiac (probe-guarded)", "Amnesiac keep 0.01 + repair (probe-guarded)"]
    result = fidelity.main(["--data", "digits", "--seeds", "0", "--subset", "1400", "--epochs", "1",
                            "--scenarios", "backdoor", "backdoor-unit", "canary-unit", "--mia-seeds", "0",
                            "--mia-samples", "200", "--canaries", "10", "--copies", "5", "--methods", *methods,
                            "--out", str(out)])
    written = json.loads(out.read_text())
    assert set(written["scenarios"]) == {"backdoor", "backdoor-unit", "canary-unit"}
    for name, scenario in result["scenarios"].items():
        rows = scenario["rows"]
        assert [r["method"] for r in rows] == ["Original", "Retrain", "Retrain seed 2"] + methods, name
        assert all(0 <= r["extra"]["attack"] <= 100 and len(r["extra"]["per_class"]) == 10 for r in rows)
        summary = scenario["poison"]
        assert summary["attack"] == ("ASR" if name.startswith("backdoor") else "canary accuracy")
        assert set(summary["floors"]) == {"attack", "classes", "TA"}
        assert not any(summary["methods"][m]["meets"] for m in ("Original", "Retrain", "Retrain seed 2"))
        assert summary["methods"]["Dense amnesiac"]["store_share"][0] == 1.0  # the keep 1 float32 store itself
        assert 0 < summary["methods"]["Amnesiac keep 0.01 + repair"]["store_share"][0] < 1
        guarded = next(r for r in rows if r["method"] == "Dense amnesiac (probe-guarded)")["extra"]
        assert guarded["guard_steps"] <= int(0.3 * 1386 / 128) + 1 and len(guarded["guard_drops"]) == guarded["guard_rounds"] + 1
        assert guarded["guard_within"] == (guarded["guard_drops"][-1] <= 2.0)
    unit = result["scenarios"]["backdoor-unit"]["config"]
    assert unit["forget_classes"] == {0: 14} and unit["units_per_batch"] == 1
    text = out.with_suffix(".md").read_text()
    assert text.count("worst class drop vs Retrain") == 3 and "canary accuracy" in text
    # poison_report recomputes the summaries from the JSON: over every seed that trained (all, here:
    # threshold 0) they are the run's own
    report = benchmark_script("poison_report").report([out], threshold=0.0)
    assert report.count("| Dense amnesiac (probe-guarded) |") == 3 and "Original collapsed" not in report
    assert benchmark_script("poison_report").report([out], threshold=101.0).count("No seed trained.") == 3


def test_poison_store_smoke_run(tmp_path, benchmark_script):
    store = benchmark_script("poison_store")
    out = tmp_path / "store.json"
    result = store.main(["--data", "digits", "--subset", "1400", "--epochs", "1", "--seeds", "0",
                         "--scenarios", "backdoor", "--keeps", "0.1", "1.0", "--dtypes", "float16", "float32",
                         "--extra-stores", "--search-keeps", "0.1", "--gradient-keeps", "0.1", "--mia-seeds", "0",
                         "--mia-samples", "200", "--out", str(out)])
    points = result["scenarios"]["backdoor"]["curve"]
    assert len(points) == 2 * 2 * 2  # keep × dtype × (subtract, + repair)
    share = {(p["keep"], p["dtype"]): p["store_share"][0] for p in points}
    assert share[(1.0, "float32")] == 1.0 and share[(0.1, "float16")] < share[(0.1, "float32")] < 1.0
    methods = result["scenarios"]["backdoor"]["poison"]["methods"]
    assert methods["Subtract keep 0.1 float16 + repair (latest ≤10% of steps)"]["steps_replayed"][0] <= 2
    assert "Fine-tune 0.3 epoch" in methods and "Keep × precision" in out.with_suffix(".md").read_text()
    # gradient attribution: the first-order rule subtracts more than the own step (momentum carried on)
    first, own = (next(r for r in result["scenarios"]["backdoor"]["rows"] if r["method"] == f"Gradient keep 0.1 float16, {m}")
                  for m in ("first-order", "own step"))
    assert first["extra"]["steps_applied"] == own["extra"]["steps_applied"] > 0
    assert 0 < methods["Gradient keep 0.1 float16, first-order"]["store_share"][0] < 1


def test_batching_cost_users_smoke_run(tmp_path, benchmark_script):
    batching_cost = benchmark_script("batching_cost")
    out = tmp_path / "users.json"
    result = batching_cost.main(["--data", "digits", "--subset", "1400", "--epochs", "1", "--seeds", "0", "1",
                                 "--skew", "user", "--units-per-batch", "1", "4", "16", "--plot", "--out", str(out)])
    assert list(result["summary"]) == ["random", "cohort iid", "cohort users", "cohort users, 4 units/batch",
                                       "cohort users, 16 units/batch"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert result["summary"]["cohort users, 16 units/batch"]["unit_steps"][0] == 2.0  # 14 samples, 8 a batch
