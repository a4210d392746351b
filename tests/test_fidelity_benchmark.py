"""benchmarks/fidelity.py on the digits: it completes, writes its JSON and table with the
noise-floor rows and rule (the claims themselves are read from benchmarks/results/)."""
from __future__ import annotations

import json


def test_digits_smoke_run(tmp_path, benchmark_script):
    fidelity = benchmark_script("fidelity")
    out = tmp_path / "fidelity.json"
    methods = ["Amnesiac keep 0.01 + repair", "Label flip keep 0.1 saliency mask (guarded)",
               "Gradient attribution keep 0.01, own step"]
    result = fidelity.main(["--data", "digits", "--seeds", "0", "--subset", "1400", "--epochs", "1",
                            "--scenarios", "random1", "cohort", "--mia-seeds", "0", "--mia-samples", "200",
                            "--methods", *methods, "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["meta"]["config"]["seeds"] == [0] and set(written["scenarios"]) == {"random1", "cohort"}
    for name, scenario in result["scenarios"].items():
        rows = [r["method"] for r in scenario["rows"]]
        expected = ["Original", "Retrain", "Retrain seed 2"] + methods[: 3 if name == "cohort" else 2]
        assert rows == expected, name
        assert set(scenario["noise_floor"]) >= {"UA", "MIA", "forget_loss_ks"}
        repaired = next(r for r in scenario["rows"] if r["method"] == methods[0])
        assert 0 < repaired["extra"]["sample_share"] < 1
    assert "noise floor" in out.with_suffix(".md").read_text().lower()


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
