"""SIGKILL at random moments across recording, recorder flushes, forgetting (in the documented
order: model saved atomically, then the ledger) and the CLI's forget: every store must reopen
consistent, and every ledger must describe a model that exists on disk.

A calibration run records when each phase starts; each trial then kills a fresh run at a random
moment inside one phase (phases taken in turn), so every phase gets kill points."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.kernels import fingerprint

TRIALS = int(os.environ.get("PYUNLEARN_KILL_TRIALS", "52"))
PHASES = ("record", "flush", "forget", "cli-forget")

# One run: records (with recorder flushes at "checkpoints"), then forgets with the API in the
# documented order, then with the CLI. Prints "<phase> <seconds since start>" as each phase begins.
_RUN = r"""
import sys, time, os
from pathlib import Path
import numpy as np, torch
import pyunlearn as pu
from pyunlearn.cli import main, _sync_folder, _write_temporary
from tests.support import TinyNet, tiny_data, tiny_training

folder = Path(sys.argv[1]); start = time.monotonic()
def phase(name):
    print("PHASE", name, round(time.monotonic() - start, 3), flush=True)

torch.manual_seed(0)
model = TinyNet()
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
store = pu.UpdateStore.create(folder / "s.zarr", model, keep=0.3, steps_per_chunk=5)
phase("record")
data = tiny_data(160)
with pu.UpdateRecorder(model, optimizer, store, rows_per_handoff=2) as rec:
    def checkpoint(step):
        if step % 7 == 0:
            if step == 7:
                phase("flush")
            rec.flush()
    tiny_training(model, optimizer, data, epochs=3, batch_size=8, recorder=rec, after_step=checkpoint)
store.close()
torch.save(model.state_dict(), folder / "model-final.pt")  # before any ledger names another model
phase("forget")
store = pu.UpdateStore.open(folder / "s.zarr")
for i in range(6):
    report = pu.amnesiac_forget(model, store, [1000 + 3 * i], commit=False)
    target = folder / f"model-api-{i}.pt"  # saved atomically: temporary file, rename, folder sync
    os.replace(_write_temporary(model.state_dict(), target), target)
    _sync_folder(folder)
    store.record_deletion(report.ledger_after, replacing=report.ledger_pending)
store.close()
phase("cli-forget")
for i in range(4):
    (folder / "ids.txt").write_text(str(1100 + i))
    code = main(["forget", "--store", str(folder / "s.zarr"), "--checkpoint", str(folder / "model-latest.pt"
                 if i else folder / f"model-api-5.pt"), "--ids", str(folder / "ids.txt"),
                 "--out", str(folder / "model-latest.pt")])
    assert code == 0
phase("done")
"""


def _run(folder: Path, kill: tuple[str, float] | None) -> dict[str, float]:
    """Runs the scenario in a child. kill=(phase, delay): SIGKILL it `delay` seconds after it
    reports that phase; None: let it finish. Returns the phases it reported."""
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    phases: dict[str, float] = {}

    def note(line: str) -> str | None:
        if line.startswith("PHASE "):
            _, name, at = line.split()
            phases[name] = float(at)
            return name
        return None

    if kill is None:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    else:
        for line in proc.stdout:
            if note(line) == kill[0]:
                break
        time.sleep(kill[1])
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    for line in out.splitlines():
        note(line)
    return phases


def _models_on_disk(folder: Path, store) -> set[str]:
    prints = set()
    for path in folder.glob("model-*.pt"):
        state = torch.load(path, weights_only=True)
        prints.add(fingerprint([state[layer.name] for layer in store.layers]))
    return prints


def _check(folder: Path) -> str:
    """The invariants after a kill; returns a word describing what state was found."""
    if not (folder / "s.zarr" / "zarr.json").exists():
        return "no store yet"
    store = pu.UpdateStore.open(folder / "s.zarr", mode="r")  # checksummed metadata, every field checked
    steps, samples = store.steps, store.samples
    offsets = store._data.read("offsets", slice(0, steps + 1))
    assert offsets[0] == 0 and offsets[-1] == samples and np.all(np.diff(offsets) == 8)  # batches of 8
    if steps:
        rows = store.read(np.arange(steps))  # every committed chunk exists and decodes
        pu.kernels.subtract_sparse([torch.zeros(layer.shape) for layer in store.layers], rows, store.k)
        assert store.steps_for(np.arange(1000, 1160)).steps.size > 0
    ledger = store.ledger
    if ledger.fingerprint is not None or ledger.pending is not None:
        # The models the ledger accepts; with a deletion pending, the one before it may be the
        # final model. At least one of them must exist on disk.
        accepted = set(ledger.fingerprints_on_chain()) | ({store.final_fingerprint} if ledger.fingerprint is None else set())
        assert accepted & _models_on_disk(folder, store), "the ledger describes no model on disk"
    # The store is usable again: a dead writer's lock is removed, and forgetting resumes from a
    # model on the chain when there is one.
    pu.UpdateStore.break_lock(folder / "s.zarr")
    return f"{steps} steps, ledger {len(ledger.removed_steps)}"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_at_random_points_leaves_consistent_stores_and_true_ledgers(tmp_path):
    calibration = _run(tmp_path / "calibration", None)
    assert list(calibration) == ["record", "flush", "forget", "cli-forget", "done"]
    _check(tmp_path / "calibration")
    times = [calibration[p] for p in PHASES] + [calibration["done"]]
    rng = random.Random(int(os.environ.get("PYUNLEARN_KILL_SEED", "0")))
    plan = []
    for trial in range(TRIALS):  # phases in turn; a random moment within the phase's duration
        i = trial % len(PHASES)
        plan.append((trial, PHASES[i], rng.uniform(0.0, times[i + 1] - times[i])))

    def one(trial_phase_at):
        trial, phase, at = trial_phase_at
        folder = tmp_path / f"trial-{trial}"
        reached = _run(folder, (phase, at))
        return trial, phase, at, max(reached, key=reached.get), _check(folder)

    with ThreadPoolExecutor(max_workers=2) as pool:  # two children at a time on two cores
        results = list(pool.map(one, plan))
    reached = {phase: sum(1 for r in results if r[3] == phase) for phase in PHASES}
    print(json.dumps({"trials": len(results), "killed in phase": reached}))
    assert len(results) >= 50
    # Timing varies on a busy machine; every phase must still have been hit several times.
    assert all(count >= 5 for count in reached.values()), reached
