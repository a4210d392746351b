"""What every benchmark result records about the run that produced it: the machine, the software
versions and the configuration, so numbers from different machines or commits are never
compared blind. Each script puts `run_metadata(config)` under a "meta" key of the JSON it writes
(and `meta_comment(meta)` as the first line of a markdown result)."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux); None where there is no such file."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict:
    """The commit the run's code is at, and whether the working tree differed from it (then the
    numbers belong to uncommitted code: rerun after committing before citing them)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "pyunlearn", "csrc"],
                               cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def run_metadata(config: dict) -> dict:
    """Machine, versions, the code's commit, thread setting, UTC time and the given config, as
    plain JSON values."""
    return {
        "code": git_commit(),
        "machine": {
            "processor": platform.processor(),
            "architecture": platform.machine(),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "system": platform.system(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": _version("torch"),
            "numpy": _version("numpy"),
            "zarr": _version("zarr"),
            "pyunlearn": _version("pyunlearn"),
        },
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": json.loads(json.dumps(config, default=str)),
    }


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reruns this benchmark, as a shell would take it (arguments with spaces,
    such as method names, quoted): `argv` as passed to main(), or the process's own."""
    return shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def meta_comment(meta: dict) -> str:
    """One HTML comment line (invisible when the markdown is rendered) holding `meta` as JSON.
    '>' only occurs inside JSON strings, so escaping it keeps the JSON valid and the comment shut."""
    return f"<!-- run: {json.dumps(meta, separators=(',', ':')).replace('>', chr(92) + 'u003e')} -->"
