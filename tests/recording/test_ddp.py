"""Recording under DistributedDataParallel: two CPU processes (gloo) against one process."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyunlearn as pu
from tests.support import TinyNet, recorded_store
from tests.support.distributed import dense_update, free_port, run_script
from tests.support.stores import stored_ids

pytestmark = pytest.mark.slow  # each launch is a process group of two (a launcher, two forked ranks)

GLOBAL_BATCH, SAMPLES, EPOCHS = 16, 96, 2

# The ranks are forks of the launcher, which imported torch and pyunlearn and ran nothing (no
# kernel, no process group): two processes as with spawn, without two more interpreters
# importing torch. Every worker tears down on every path (tests/support/distributed.py: leave).
_WORKER = r"""
import sys, torch, torch.multiprocessing as mp
import pyunlearn as pu
from tests.support import TinyNet, tiny_data
from tests.support.distributed import join, leave, rank_rows, say

def worker(rank, world, path, port, fail):
    join(rank, world, port)
    torch.manual_seed(0)
    model = TinyNet()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(path, model, keep=1.0, value_dtype="float32", steps_per_chunk=4) if rank == 0 else None
    if fail and rank == 0:
        def broken(row, ids, hyper=None):
            raise OSError("disk full")
        store.append = broken
    ids, x, y = tiny_data(%(samples)d)
    rec = pu.UpdateRecorder(ddp, optimizer, store, rows_per_handoff=1)
    try:
        for sel in rank_rows(rank, world, %(samples)d, %(epochs)d, %(batch)d):
            rec.batch(ids[sel])
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x[sel]), y[sel]).backward()
            optimizer.step()
            if fail:
                import time; time.sleep(0.05)  # let the writer fail before the next step
        rec.close()
        if rank == 0:
            torch.save(model.state_dict(), path + ".pt")
            store.close()
    except pu.RecorderError as exc:
        say(f"rank {rank} stopped: {exc}")
    finally:
        del ddp
        leave()

if __name__ == "__main__":
    mp.start_processes(worker, args=(2, sys.argv[1], int(sys.argv[2]), sys.argv[3] == "fail"), nprocs=2, start_method="fork")
""" % {"samples": SAMPLES, "epochs": EPOCHS, "batch": GLOBAL_BATCH}


def _run_ddp(path, mode="ok"):
    return run_script(path.parent / "ddp_worker.py", _WORKER, path, free_port(), mode)


def _single_process(path):
    """The workers' run on one process: same seeds, same global batches in the same order."""
    run = recorded_store(path, keep=1.0, value_dtype="float32", steps_per_chunk=4, n=SAMPLES, epochs=EPOCHS,
                         batch_size=GLOBAL_BATCH)
    return run.model, run.store


def test_ddp_store_equals_a_single_process_run(tmp_path):
    result = _run_ddp(tmp_path / "ddp.zarr")
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = pu.UpdateStore.open(tmp_path / "ddp.zarr")
    model, single = _single_process(tmp_path / "single.zarr")
    assert ddp.steps == single.steps == EPOCHS * SAMPLES // GLOBAL_BATCH
    for ddp_array, single_array in zip(stored_ids(ddp), stored_ids(single)):  # sample IDs, offsets
        assert np.array_equal(ddp_array, single_array)
    for step in range(single.steps):
        for a, b in zip(dense_update(ddp, step), dense_update(single, step)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Forgetting works on the DDP-trained model as on the single-process one.
    trained = TinyNet()
    trained.load_state_dict(torch.load(str(tmp_path / "ddp.zarr") + ".pt", weights_only=True))
    report = pu.amnesiac_forget(trained, ddp, [1000, 1001])
    assert report.steps_removed == single.steps_for([1000, 1001]).steps.size
    expected = pu.amnesiac_forget(model, single, [1000, 1001])
    assert report.steps_applied == expected.steps_applied
    for a, b in zip(trained.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_failing_writer_stops_every_rank(tmp_path):
    result = _run_ddp(tmp_path / "ddp.zarr", "fail")  # the timeout turns a hang into a failure
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 stopped" in result.stdout and "rank 1 stopped" in result.stdout
    assert "disk full" in result.stdout


_SECRETS_WORKER = r"""
import os, sys, torch, torch.multiprocessing as mp
import pyunlearn as pu
from tests.support import TinyNet
from tests.support.distributed import join, leave, say

def worker(rank, path, port, same):
    os.environ["PYUNLEARN_SECRET"] = "the store's secret, 16+ bytes" if same or rank == 0 else "another secret, 16+ bytes"
    join(rank, 2, port)
    torch.manual_seed(0)
    model = TinyNet()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    store = pu.UpdateStore.create(path, model, keep=1.0, value_dtype="float32") if rank == 0 else None
    try:
        with pu.UpdateRecorder(ddp, optimizer, store) as rec:
            for step in range(2):
                rec.batch([f"rank{rank}-user{step}"])
                optimizer.zero_grad()
                ddp(torch.randn(1, 8)).sum().backward()
                optimizer.step()
        say(f"rank {rank} recorded")
    except pu.RecorderError as exc:
        say(f"rank {rank} refused: {exc}")
    finally:
        if rank == 0:
            store.close()
        del ddp
        leave()

if __name__ == "__main__":
    mp.start_processes(worker, args=(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "same"), nprocs=2, start_method="fork")
"""


def test_ranks_with_different_secrets_are_refused_before_any_step(tmp_path):
    for mode in ("different", "same"):
        path = tmp_path / f"{mode}.zarr"
        result = run_script(tmp_path / "secrets_worker.py", _SECRETS_WORKER, path, free_port(), mode)
        assert result.returncode == 0, result.stderr[-3000:]
        store = pu.UpdateStore.open(path, mode="r", secret="the store's secret, 16+ bytes")
        if mode == "different":
            assert "rank 0 refused" in result.stdout and "rank 1 refused" in result.stdout
            assert "different secrets" in result.stdout and store.steps == 0
        else:
            assert "rank 0 recorded" in result.stdout and "rank 1 recorded" in result.stdout
            assert store.steps_for(["rank1-user1"]).steps.tolist() == [1]  # the follower's keys are found
