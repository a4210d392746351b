"""The command line in this process: `cli(...)` calls pyunlearn.cli.main as `pyunlearn ...`
would, and gives back what a subprocess run would (exit code, standard output, standard error,
warnings included as a fresh interpreter prints them). tests/cli/test_entry_point.py runs the
installed command itself."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest

from pyunlearn.cli import main


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    def run(*args) -> Ran:
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            # What a fresh interpreter shows: every warning once per place, except the kinds
            # Python ignores by default.
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's usage errors (2), --help
                code = exc.code
        out = capsys.readouterr()
        shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
        return Ran(code, out.out, out.err + shown)

    return run
