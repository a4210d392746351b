"""benchmarks/fidelity.py, saliency_sweep.py and batching_cost.py on the digits: they complete and
write their JSON and tables (fidelity's with the noise-floor rows and rule); fidelity's class
units by hand. The claims themselves are read from benchmarks/results/."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pyunlearn.data import SampleSet


@pytest.mark.slow
def test_digits_smoke_run(tmp_path, benchmark_script):
    fidelity = benchmark_script("fidelity")
    out = tmp_path / "fidelity.json"
    methods = ["Amnesiac keep 0.01 + repair", "Label flip keep 0.1 saliency mask (guarded)",
               "Gradient ascent to held-out loss (guarded)", "Gradient attribution keep 0.01, first-order",
               "Gradient attribution keep 0.01, own step"]
    result = fidelity.main(["--data", "digits", "--seeds", "0", "--subset", "1400", "--epochs", "1",
                            "--scenarios", "random1", "cohort", "cohort-skewed", "--mia-seeds", "0", "--mia-samples", "200",
                            "--methods", *methods, "--units-per-batch", "2", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["meta"]["config"]["seeds"] == [0] and set(written["scenarios"]) == {"random1", "cohort", "cohort-skewed"}
    for name, scenario in result["scenarios"].items():
        rows = [r["method"] for r in scenario["rows"]]
        expected = ["Original", "Retrain", "Retrain seed 2"] + methods[: 3 if name == "random1" else 5]
        assert rows == expected, name
        assert set(scenario["noise_floor"]) >= {"UA", "MIA", "forget_loss_ks"}
        repaired = next(r for r in scenario["rows"] if r["method"] == methods[0])
        assert 0 < repaired["extra"]["sample_share"] < 1
        targeted = next(r for r in scenario["rows"] if r["method"] == methods[2])
        assert 0 < targeted["extra"]["gap_seconds"] < targeted["seconds"]  # measured inside the timed call
    # Two rows forget from one gradient store, each on its own copy of the original: the first records
    # the deletion, the second finds it recorded, yet subtracts the same steps from its copy.
    first, second = (next(r for r in result["scenarios"]["cohort"]["rows"] if r["method"] == m) for m in methods[3:])
    assert first["extra"]["steps_removed"] == first["extra"]["steps_applied"] > 0
    assert second["extra"]["steps_removed"] == 0 and second["extra"]["steps_applied"] == first["extra"]["steps_applied"]
    assert len(result["scenarios"]["cohort-skewed"]["config"]["forget_classes"]) == 1  # unit 0: one class
    assert result["scenarios"]["cohort"]["config"]["units_per_batch"] == 2
    assert "CohortBatchSampler(units_per_batch=2), at most 64 samples" in out.with_suffix(".md").read_text()
    assert "noise floor" in out.with_suffix(".md").read_text().lower()
    assert out.with_suffix(".md").read_text().count("with the gap measured once per model") == 3
    # The recorded command reruns the benchmark: method names, which hold spaces, are quoted.
    assert "--methods 'Amnesiac keep 0.01 + repair' 'Label flip keep 0.1" in written["meta"]["config"]["command"]


@pytest.mark.slow
def test_saliency_sweep_smoke_run(tmp_path, benchmark_script):
    sweep = benchmark_script("saliency_sweep")
    out = sweep.main(["--data", "digits", "--seeds", "0", "--lrs", "0.001", "0.05", "--ua", "50",
                      "--out", str(tmp_path / "s.json")])
    assert len(out["runs"]) == 6 and set(out["matched"]) == set(sweep.VARIANTS)
    assert all(0.0 <= r["UA"] <= 100.0 and 0.0 <= r["TA"] <= 100.0 for r in out["runs"])
    for name, point in out["matched"].items():  # the lowest rate reaching UA >= 50, if any
        reaching = [r for r in out["runs"] if r["variant"] == name and r["UA"] >= 50]
        assert point["seeds_reaching"] == (1 if reaching else 0)
        if reaching:
            assert point["lrs"] == [min(r["lr"] for r in reaching)]


def test_class_units_hold_one_class_each(benchmark_script):
    """cohort-skewed's units: each of one class and of the iid units' size, taken class by class
    in turn up to `units`, the same every time (fixed seed); everyone else a unit of one."""
    fidelity = benchmark_script("fidelity")
    labels = torch.tensor([0] * 450 + [1] * 430 + [2] * 120)  # room for 4 + 4 + 1 units of 100
    data = SampleSet(torch.arange(1000), torch.zeros(1000, 1), labels)
    unit = fidelity.class_units(data, units=10)
    assert np.array_equal(unit, fidelity.class_units(data, units=10))
    assert np.unique(unit[unit < 10]).tolist() == list(range(9))  # 9 whole units fit, not 10
    classes = []
    for u in range(9):
        assert (unit == u).sum() == 100 and labels[unit == u].unique().numel() == 1
        classes.append(int(labels[unit == u][0]))
    assert sorted(classes) == [0] * 4 + [1] * 4 + [2]
    singles = unit[unit >= 10]
    assert singles.size == 100 and np.unique(singles).size == 100
    capped = fidelity.class_units(data, units=3)  # units of 333: one from class 0, one from class 1
    assert sorted(int(labels[capped == u][0]) for u in range(2)) == [0, 1] and (capped == 2).sum() == 0


@pytest.mark.slow
def test_batching_cost_smoke_run(tmp_path, benchmark_script):
    batching_cost = benchmark_script("batching_cost")
    out = tmp_path / "batching_cost.json"
    result = batching_cost.main(["--data", "digits", "--subset", "1400", "--epochs", "1", "--seeds", "0", "1",
                                 "--units-per-batch", "4", "16", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["meta"]["config"]["seeds"] == [0, 1] and len(written["runs"]) == 10
    summary = result["summary"]
    mixed = ["cohort skewed, 4 units/batch", "cohort skewed, 16 units/batch"]
    assert list(summary) == ["random", "cohort iid", "cohort skewed", *mixed]
    # digits: units of 14 (1400 // 100) in batches of 128; one epoch. A unit touches one step
    # when it may fill the batch (m = 1) or 32 samples of it (m = 4), two at 8 a batch (m = 16).
    for training, steps in [("cohort iid", 1), ("cohort skewed", 1), (mixed[0], 1), (mixed[1], 2)]:
        assert summary[training]["unit_steps"] == (steps, 0.0) and summary[training]["unit0_steps"] == (steps, 0.0)
    assert summary["random"]["unit_steps"][0] > 5  # 14 random samples over 11 steps: ~8 of them
    for training in ("cohort iid", "cohort skewed", *mixed):
        diff = summary[training]["TA_vs_random"]
        assert abs(diff["mean"] - (summary[training]["TA"][0] - summary["random"]["TA"][0])) < 1e-9
        assert len(diff["per_seed"]) == 2
    # digits units of 14 share batches, but the skewed ones still make batches less mixed
    assert summary["cohort skewed"]["largest_class_share"][0] > summary["cohort iid"]["largest_class_share"][0]
    assert "TA − random" in out.with_suffix(".md").read_text()
