"""`pyunlearn demo`'s arguments are checked before any work. (The demo itself runs in
tests/cli/test_entry_point.py, through the installed command.)"""
from __future__ import annotations

import re
import time

import pytest


@pytest.mark.parametrize("args, message", [
    (["--forget", "0"], "argument --forget: must be at least 1"),
    (["--epochs", "0"], "argument --epochs: must be at least 1"),
    (["--keep", "0"], r"argument --keep: must be in \(0, 1\]"),
    (["--keep", "1.5"], r"argument --keep: must be in \(0, 1\]"),
    (["--forget", "many"], "argument --forget: expected a whole number"),
])
def test_demo_arguments_are_refused_before_any_work(cli, args, message):
    started = time.perf_counter()
    out = cli("demo", *args)
    assert out.returncode == 2 and re.search(message, out.stderr), out.stderr
    assert "trained in" not in out.stdout and time.perf_counter() - started < 30


def test_demo_refuses_forgetting_more_than_the_training_set_before_training(cli):
    out = cli("demo", "--forget", "100000")
    assert out.returncode == 1, out.stderr
    assert "forget must be at most the 1438 training samples" in out.stderr and "trained in" not in out.stdout
