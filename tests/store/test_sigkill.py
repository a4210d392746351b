"""SIGKILL at random moments across recording, recorder flushes, forgetting (in the documented
order: model saved atomically, then the ledger) and the CLI's forget: every store must reopen
consistent, and every ledger must describe a model on disk.

A calibration run records when each phase starts; each trial then kills a fresh run at a random
moment inside one phase (phases taken in turn), so every phase gets kill points. Each run is a
process of its own (tests/support/kill.py), forked from a server that imported torch and
pyunlearn once, and is killed with SIGKILL."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import pyunlearn as pu
from pyunlearn.kernels import fingerprint
from tests.support.kill import PRELOAD, scenario

pytestmark = pytest.mark.slow  # 53 runs of the scenario, ~30 s on two cores

TRIALS = int(os.environ.get("PYUNLEARN_KILL_TRIALS", "52"))
PHASES = ("record", "flush", "forget", "cli-forget")


def _victims():
    """Processes forked from a server that imported everything a run needs, and nothing else."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _run(folder: Path, kill: tuple[str, float] | None) -> dict[str, float]:
    """Runs the scenario in a process of its own. kill=(phase, delay): SIGKILL it `delay` seconds
    after it reports that phase; None: let it finish. Returns the phases it reported."""
    folder.mkdir()
    context = _victims()
    receiver, sender = context.Pipe(duplex=False)
    proc = context.Process(target=scenario, args=(str(folder), sender), daemon=True)
    proc.start()
    sender.close()  # the victim holds the only writing end: its death ends the stream
    # The fork server reaps the run the moment it ends, so its pid may name another process by
    # the time of the kill: the signal goes through a pidfd, which names this process only.
    victim = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
    phases: dict[str, float] = {}
    errors: list[str] = []

    def note(message) -> str:
        name, value = message
        if name == "error":
            errors.append(value)
        else:
            phases[name] = value
        return name

    try:
        if kill is None:
            while True:
                try:
                    note(receiver.recv())
                except EOFError:
                    break
            proc.join(300)
            assert proc.exitcode == 0, errors
        else:
            while note(receiver.recv()) != kill[0]:
                pass
            time.sleep(kill[1])
            try:
                if victim is not None:
                    signal.pidfd_send_signal(victim, signal.SIGKILL)
                elif proc.exitcode is None:
                    proc.kill()  # SIGKILL
            except ProcessLookupError:
                pass  # the run ended before this moment: nothing left to kill
            proc.join(60)
            assert proc.exitcode is not None, "the killed run did not end"
            while True:  # what it reported before it died
                try:
                    note(receiver.recv())
                except EOFError:
                    break
    finally:
        receiver.close()
        if victim is not None:
            os.close(victim)
    assert not errors, errors[0]
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
    offsets = zarr.open_array(folder / "s.zarr" / "offsets", mode="r")[: steps + 1]  # docs/format.md's array
    assert offsets[0] == 0 and offsets[-1] == samples and np.all(np.diff(offsets) == 8)  # batches of 8
    if steps:
        rows = store.read(np.arange(steps))  # every committed chunk exists and decodes
        pu.kernels.subtract_sparse([torch.zeros(layer.shape) for layer in store.layers], rows, store.k)
        assert [len(ids) for ids in store.step_ids(np.arange(steps))] == [8] * steps  # and the IDs' chunks
        assert store.steps_for(np.arange(1000, 1160)).steps.size > 0
    ledger = store.ledger
    if ledger.deletions:
        # The model the log ends with must exist on disk; with a deletion pending (killed between
        # the forget and its confirmation), the model it started from may be the one saved.
        accepted = {ledger.models[-1].fingerprint}
        if ledger.pending is not None:
            accepted.add(ledger.pending.fields["fingerprint_before"])
        assert accepted & _models_on_disk(folder, store), "the log describes no model on disk"
    # The store is usable again: a dead writer's lock is removed, and forgetting resumes from a
    # model on the chain when there is one.
    pu.UpdateStore.break_lock(folder / "s.zarr")
    return f"{steps} steps, {len(ledger.removed_steps)} removed"


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

    with ThreadPoolExecutor(max_workers=2) as pool:  # two runs at a time on two cores
        results = list(pool.map(one, plan))
    reached = {phase: sum(1 for r in results if r[3] == phase) for phase in PHASES}
    print(json.dumps({"trials": len(results), "killed in phase": reached}))
    assert len(results) >= 50
    # Timing varies on a busy machine; every phase must still have been hit several times.
    assert all(count >= 5 for count in reached.values()), reached
