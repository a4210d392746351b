"""The victim of the SIGKILL harness (tests/store/test_sigkill.py): one run that records (with
recorder flushes at "checkpoints"), forgets with the API in the documented order (model saved
atomically, then the ledger), then with the CLI, and reports each phase as it begins.

It runs in a process of its own, forked from multiprocessing's fork server after that server
imported PRELOAD (torch, pyunlearn, the native kernels, this module) and ran nothing: a victim
starts in milliseconds, where a fresh interpreter spends ~2 s importing torch before the first
kill point. The server runs no kernel and starts no thread of its own (numpy's OpenBLAS pool
handles fork), so each fork is as clean as a new interpreter that imported the same modules."""
from __future__ import annotations

import multiprocessing
import time
import traceback
from pathlib import Path

import torch

import pyunlearn as pu
from pyunlearn.cli import main
from tests.support import TinyNet, tiny_data, tiny_training

# What a run imports, the server imports once (torch._dynamo is what the first optimizer imports,
# ~1.6 s).
PRELOAD = ["numpy", "torch", "torch._dynamo", "zarr", "pyunlearn", "pyunlearn.cli", "pyunlearn.kernels._native",
           "pyunlearn.integrations.checkpoints", "tests.support.kill"]


def save_atomically(state: dict, path: Path) -> None:
    """torch.save as the CLI saves (pyunlearn.integrations.checkpoints): atomically, the rename
    made durable."""
    from pyunlearn.integrations.checkpoints import sync_folder, write_atomically

    write_atomically(path, lambda f: torch.save(state, f))
    sync_folder(path.parent)


def scenario(folder: str, report) -> None:
    """The run, in `folder`; sends (phase, seconds since start) through the connection `report`
    as each phase begins, and ("error", traceback) if the run fails."""
    folder = Path(folder)
    start = time.monotonic()
    # As in a fresh interpreter: a fork server's child inherits its start method, under which the
    # locks numcodecs makes are named semaphores that a killed run would leave to clean up.
    multiprocessing.set_start_method("fork", force=True)

    def phase(name):
        report.send((name, round(time.monotonic() - start, 3)))

    try:
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
            report_ = pu.amnesiac_forget(model, store, [1000 + 3 * i], commit=False)
            save_atomically(model.state_dict(), folder / f"model-api-{i}.pt")
            store.confirm(report_.record)
        store.close()
        phase("cli-forget")
        for i in range(4):
            (folder / "ids.txt").write_text(str(1100 + i))
            code = main(["forget", "--store", str(folder / "s.zarr"), "--checkpoint", str(folder / "model-latest.pt"
                         if i else folder / "model-api-5.pt"), "--ids", str(folder / "ids.txt"),
                         "--out", str(folder / "model-latest.pt")])
            assert code == 0
        phase("done")
    except BaseException:
        report.send(("error", traceback.format_exc()))
        raise
