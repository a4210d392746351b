"""Two CPU ranks over gloo, for the tests of DDP, FSDP2 and refusals across ranks.

The launcher's side (`free_port`, `run_script`, `dense_update`) and the worker's (`join`, `say`,
`rank_rows`, `leave`), which the worker scripts import (tests/conftest.py puts the repository
on PYTHONPATH): every worker joins, splits the same seeded global batches and leaves in the
same way, so the scripts differ only in what they test.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import pyunlearn as pu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: Path, text: str, *argv, torchrun: bool = False, timeout: float = 240,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Writes `text` to `script` (a file: spawned ranks import the worker from it) and runs it
    with `argv`, under `torchrun` with two processes on a free port if asked. The timeout turns
    a hang (a rank waiting in a collective for one that stopped) into a failure."""
    script.write_text(text)
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                     "--master_port", str(free_port())]
    return subprocess.run([*launcher, str(script), *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def dense_update(store, step: int) -> list[torch.Tensor]:
    """Step `step`'s stored update as dense tensors, one per layer."""
    out = [torch.zeros(layer.shape) for layer in store.layers]
    pu.kernels.subtract_sparse(out, store.read([step]), store.k, alpha=-1.0)
    return out


# ------------------------------------------------------------------------ inside a worker rank

def join(rank: int, world: int, port: int) -> None:
    """Joins the gloo process group of `world` ranks on this host's `port`."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def say(line: str) -> None:
    """One write of at most PIPE_BUF (4,096) bytes: the ranks' lines never interleave."""
    os.write(1, line.encode()[:4000] + b"\n")


def rank_rows(rank: int, world: int, samples: int, epochs: int, global_batch: int):
    """The rows of `samples` this rank trains on at each step: the global batches of a seeded
    shuffle per epoch (those `tests.support.recorded_store` trains one process on), cut into
    `world` equal parts."""
    generator = torch.Generator().manual_seed(0)
    part = global_batch // world
    for _ in range(epochs):
        order = torch.randperm(samples, generator=generator)
        for start in range(0, samples, global_batch):
            yield order[start : start + global_batch][rank * part : (rank + 1) * part]


def leave() -> None:
    """Tears down and exits without running C++ static destructors: torch 2.13 with gloo
    sometimes aborts a rank at interpreter exit ("terminate called without an active
    exception", ~1 run in 10, seen on the rank that never touches pyunlearn's native code) after
    all work is done. The caller deletes its DDP wrapper first: the reducer goes before the
    process group it uses."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
