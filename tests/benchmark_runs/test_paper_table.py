"""The paper-comparison script on the digits: it completes and its numbers are in range (the
claims themselves are checked by reading benchmarks/results/, not asserted)."""
from __future__ import annotations

import csv

import pytest


@pytest.mark.slow
def test_digits_smoke_run(tmp_path, benchmark_script):
    paper_table = benchmark_script("paper_table")
    rows = paper_table.main(["--data", "digits", "--forget", "random:20", "--epochs", "2", "--batch-size", "32",
                             "--mia-samples", "300", "--out", str(tmp_path), "--name", "smoke"])
    methods = [r.method for r in rows]
    assert methods[:2] == ["Original", "Retrain"] and "Dense amnesiac + fine-tune" in methods
    assert len(methods) == 12
    for r in rows:
        for metric in (r.UA, r.RA, r.TA, r.MIA, r.gap):
            assert 0.0 <= metric <= 100.0
    assert next(r for r in rows if r.method == "Retrain").gap == 0.0
    stored = {r.method: r.store_bytes for r in rows if r.store_bytes}
    assert stored["Partial amnesiac keep=0.01"] < stored["Partial amnesiac keep=0.2"] < stored["Dense amnesiac"]
    with open(tmp_path / "smoke.csv") as f:
        assert len(list(csv.DictReader(f))) == 12
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert "| Partial amnesiac keep=0.05 |" in (tmp_path / "smoke.md").read_text()
    # The recorded command is the arguments main() was given, not the test runner's.
    assert "`python benchmarks/paper_table.py --data digits --forget random:20 --epochs 2" in (tmp_path / "smoke.md").read_text()
