"""Work done once for the whole test run, also when pytest-xdist runs it on several workers."""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder `make(folder)` filled, made once for the whole run: the workers of pytest-xdist
    share the run's temporary root, and the first to take the lock makes it while the others
    wait for it (a session fixture alone would make it once per worker). If `make` raises, the
    folder is not marked done and the next caller starts it again from empty."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's base folder lies in the run's root
    folder = root / f"{name}-shared"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / f"{name}.done"
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            make(folder)
            done.touch()
    return folder
