"""benchmarks/cohort_table.py on the digits: the evidence script for cohort batching completes
(the claims themselves are read from benchmarks/results/)."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_cohort_table_smoke_run(tmp_path, benchmark_script):
    """The evidence script on the digits: completes, numbers in range, cohort batching touches
    fewer steps than random batching (a property of the sampler, not a claim about accuracy)."""
    cohort_table = benchmark_script("cohort_table")
    rows = cohort_table.main(["--data", "digits", "--forget", "cohort:20:20", "--epochs", "2", "--batch-size", "32",
                              "--mia-samples", "300", "--out", str(tmp_path), "--name", "smoke"])
    assert len(rows) == 12
    for r in rows:
        assert all(0.0 <= v <= 100.0 for v in (r.UA, r.RA, r.TA, r.MIA, r.gap))
    touched = {(r.batching, r.method): r.steps_touched for r in rows if r.steps_touched is not None}
    assert touched[("cohort", "update keep=1.0")] == 2  # 20 samples < 32: one batch per epoch
    assert touched[("random", "update keep=1.0")] > touched[("cohort", "update keep=1.0")]
    assert (tmp_path / "smoke.md").exists() and (tmp_path / "smoke.csv").exists()
