"""A model sharded with FSDP2 (torch.distributed.fsdp.fully_shard), two CPU processes over gloo:
the writer rank records a gathered copy, so the store equals a single-process run's over the
same global batches, and forgetting works on the gathered model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyunlearn as pu
from tests.support import TinyNet, recorded_store
from tests.support.distributed import dense_update, free_port, run_script

GLOBAL_BATCH, SAMPLES, EPOCHS = 16, 64, 2

_WORKER = r"""
import sys, torch, torch.multiprocessing as mp
import pyunlearn as pu
from tests.support import TinyNet, tiny_data
from tests.support.distributed import join, leave, rank_rows, say

def worker(rank, world, path, port, mode):
    join(rank, world, port)
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = TinyNet()
    attribution = "gradient" if mode == "gradient" else "update"
    # The store is created from the model before it is sharded, on the writer rank only.
    store = pu.UpdateStore.create(path, model, keep=1.0, value_dtype="float32", steps_per_chunk=4,
                                  attribution=attribution) if rank == 0 else None
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    assert type(model.fc1.weight).__name__ == "DTensor"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    ids, x, y = tiny_data(%(samples)d)
    try:
        rec = pu.UpdateRecorder(model, optimizer, store, rows_per_handoff=1)
        for sel in rank_rows(rank, world, %(samples)d, %(epochs)d, %(batch)d):
            rec.batch(ids[sel])
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[sel]), y[sel]).backward()
            optimizer.step()
        rec.close()
        # The gathered model (a full state_dict): what forgetting works on.
        full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(full, path + ".pt")
            store.close()
        say(f"rank {rank} recorded {rec.steps} steps")
    except pu.PyunlearnError as exc:
        say(f"rank {rank} raised {type(exc).__name__}: " + str(exc).replace(chr(10), " "))
    finally:
        leave()

if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1], int(sys.argv[2]), sys.argv[3]), nprocs=2)
""" % {"samples": SAMPLES, "epochs": EPOCHS, "batch": GLOBAL_BATCH}


def _run(tmp_path, mode):
    out = run_script(tmp_path / "fsdp_worker.py", _WORKER, tmp_path / "fsdp.zarr", free_port(), mode)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_fsdp2_sharded_training_records_the_global_model(tmp_path):
    stdout = _run(tmp_path, "update")
    steps = EPOCHS * SAMPLES // GLOBAL_BATCH
    assert f"rank 0 recorded {steps} steps" in stdout and f"rank 1 recorded {steps} steps" in stdout, stdout
    fsdp = pu.UpdateStore.open(tmp_path / "fsdp.zarr")
    single = recorded_store(tmp_path / "single.zarr", keep=1.0, value_dtype="float32", steps_per_chunk=4, n=SAMPLES,
                            epochs=EPOCHS, batch_size=GLOBAL_BATCH)
    assert fsdp.steps == single.store.steps == steps
    assert [layer.name for layer in fsdp.layers] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    for name in ("sample_ids", "offsets"):  # the global batch of every step
        n = single.store.samples if name == "sample_ids" else steps + 1
        assert np.array_equal(fsdp._data.read(name, slice(0, n)), single.store._data.read(name, slice(0, n)))
    for step in range(steps):  # FSDP averages two half-batch gradients: equal to float rounding
        for a, b in zip(dense_update(fsdp, step), dense_update(single.store, step)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # The gathered model is the one the store's timeline ends with, so a deletion applies to it.
    trained = TinyNet()
    trained.load_state_dict(torch.load(str(tmp_path / "fsdp.zarr") + ".pt", weights_only=True))
    assert fsdp.final_fingerprint == pu.kernels.fingerprint([p for p in trained.parameters() if p.requires_grad])
    report = pu.amnesiac_forget(trained, fsdp, [1000, 1001])
    expected = pu.amnesiac_forget(single.model, single.store, [1000, 1001])
    assert report.steps_removed == expected.steps_removed > 0
    for a, b in zip(trained.parameters(), single.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    fsdp.close()


@pytest.mark.slow
def test_fsdp2_with_gradient_attribution_is_refused_on_every_rank(tmp_path):
    stdout = _run(tmp_path, "gradient")
    for rank in (0, 1):
        assert f"rank {rank} raised RecorderError: rank 0 of 2: gradient attribution reads each step's gradient" \
               in stdout, stdout
    assert pu.UpdateStore.open(tmp_path / "fsdp.zarr", mode="r").steps == 0


def test_dtensor_parameters_without_several_processes_are_refused(tmp_path):
    """DTensor parameters where torch.distributed runs one process (a mesh of one rank): refused
    with what to do, before any step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = TinyNet()
        store = pu.UpdateStore.create(tmp_path / "s.zarr", model)
        mesh = init_device_mesh("cpu", (1,))
        model.fc1.weight = torch.nn.Parameter(distribute_tensor(model.fc1.weight.detach(), mesh, [Shard(0)]))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with pytest.raises(pu.RecorderError, match="parameters are DTensors .* does not run several processes"):
            pu.UpdateRecorder(model, optimizer, store)
        store.close()
    finally:
        dist.destroy_process_group()
