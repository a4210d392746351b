"""The Lightning callback records what the plain recorder records for the same run, also under
DDP (two CPU processes, gloo) and across fit(ckpt_path=...)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyunlearn as pu
from tests.support import tiny_data, tiny_lightning_module
from tests.support.distributed import dense_update
from tests.support.shared import made_once
from tests.support.stores import stored_ids

lightning = pytest.importorskip("lightning", reason="the Lightning integration is an optional extra")
from pyunlearn.integrations.lightning import RecordUpdates  # noqa: E402


Module = tiny_lightning_module()


def _loader():
    ids, x, y = tiny_data(64)
    return torch.utils.data.DataLoader(list(zip(ids, x, y)), batch_size=16, shuffle=False)


def test_callback_matches_the_plain_recorder(tmp_path):
    module = Module()
    store = pu.UpdateStore.create(tmp_path / "lit.zarr", module, keep=0.3)
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[RecordUpdates(store)])
    trainer.fit(module, _loader())

    plain = Module()
    optimizer = plain.configure_optimizers()
    reference = pu.UpdateStore.create(tmp_path / "plain.zarr", plain, keep=0.3)
    with pu.UpdateRecorder(plain, optimizer, reference) as rec:
        for _ in range(2):
            for batch in _loader():
                rec.batch(batch[0])
                optimizer.zero_grad()
                plain.training_step(batch, 0).backward()
                optimizer.step()
    assert store.steps == reference.steps == 8
    assert store.final_fingerprint == reference.final_fingerprint
    for a, b in zip(store.read(range(8)), reference.read(range(8))):
        assert torch.equal(a, b)
    assert store.steps_for([1003]).steps.tolist() == reference.steps_for([1003]).steps.tolist()
    assert pu.amnesiac_forget(module, store, [1003]).steps_removed == 2


def test_batches_without_ids_are_refused(tmp_path):
    module = Module()
    store = pu.UpdateStore.create(tmp_path / "lit.zarr", module)
    _, x, y = tiny_data(32)
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=16)  # (x, y): no IDs
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordUpdates(store)])
    with pytest.raises(TypeError, match="ids must hold integers"):
        trainer.fit(module, loader)
    assert store.steps == 0
    with pytest.raises(TypeError, match="store must be an UpdateStore or a path"):
        RecordUpdates(42)
    with pytest.raises(TypeError, match="go with a store path"):
        RecordUpdates(store, create=dict(keep=0.1))


def _trainer(root, callbacks, **options):
    return lightning.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=root, callbacks=callbacks, **options)


def _abandoned_run(tmp_path):
    """12 steps (3 epochs of 4 batches) recorded by the callback, saving a checkpoint after 4
    (an epoch's end, where Lightning resumes a plain DataLoader exactly) and after 12."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = Module()
    store = pu.UpdateStore.create(tmp_path / "lit.zarr", module, keep=0.3)
    saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    _trainer(tmp_path, [RecordUpdates(store), saving]).fit(module, _loader())
    assert store.steps == 12
    store.close()
    return tmp_path / "ckpt" / "step=4.ckpt"


def test_fit_from_a_checkpoint_continues_the_store_from_its_step(tmp_path):
    checkpoint = _abandoned_run(tmp_path)
    assert torch.load(checkpoint, weights_only=True)["callbacks"]["RecordUpdates"]["recorder"]["steps"] == 4

    store = pu.UpdateStore.open(tmp_path / "lit.zarr")  # as a new process would
    with pytest.warns(RuntimeWarning, match=r"dropped the store's 8 later steps"):
        _trainer(tmp_path, [RecordUpdates(store)], enable_checkpointing=False).fit(
            Module(), _loader(), ckpt_path=checkpoint)

    straight = Module()
    reference = pu.UpdateStore.create(tmp_path / "straight.zarr", straight, keep=0.3)
    _trainer(tmp_path, [RecordUpdates(reference)], enable_checkpointing=False).fit(straight, _loader())
    assert store.steps == reference.steps == 12 and store.samples == reference.samples
    (store_ids, store_offsets), (reference_ids, reference_offsets) = stored_ids(store), stored_ids(reference)
    assert np.array_equal(store_offsets, reference_offsets)
    assert np.array_equal(store_ids, reference_ids)
    for a, b in zip(store.read(range(12)), reference.read(range(12))):
        assert torch.equal(a, b)
    assert store.final_fingerprint == reference.final_fingerprint


def test_fit_from_a_checkpoint_without_the_callback_state_is_refused(tmp_path):
    checkpoint = _abandoned_run(tmp_path)
    stripped = torch.load(checkpoint, weights_only=True)
    del stripped["callbacks"]["RecordUpdates"]
    torch.save(stripped, tmp_path / "stripped.ckpt")
    store = pu.UpdateStore.open(tmp_path / "lit.zarr")
    with pytest.raises(pu.RecorderError, match=r"already holds 12 steps, and this model is not the one they end with"
                                               r".*rec\.load_state_dict"):
        _trainer(tmp_path, [RecordUpdates(store)], enable_checkpointing=False).fit(
            Module(), _loader(), ckpt_path=tmp_path / "stripped.ckpt")
    assert store.steps == 12 and store.final_steps == 12  # untouched


def test_a_store_path_with_create_options_records_the_same(tmp_path):
    """RecordUpdates(path, create=...) creates the store when training starts: the same store as
    one created beforehand from the module."""
    created = Module()
    store = pu.UpdateStore.create(tmp_path / "given.zarr", created, keep=0.3)
    _trainer(tmp_path, [RecordUpdates(store)], enable_checkpointing=False).fit(created, _loader())
    callback = RecordUpdates(tmp_path / "path.zarr", create=dict(keep=0.3))
    _trainer(tmp_path, [callback], enable_checkpointing=False).fit(Module(), _loader())
    by_path = pu.UpdateStore.open(tmp_path / "path.zarr")
    with by_path.writing():  # the callback closed the store it opened: its writer lock is free
        pass
    assert by_path.steps == store.steps == 12
    for a, b in zip(by_path.read(range(12)), store.read(range(12))):
        assert torch.equal(a, b)
    assert by_path.final_fingerprint == store.final_fingerprint
    with pytest.raises(FileExistsError):  # exist_ok=False: create= on a store that exists is refused
        _trainer(tmp_path, [RecordUpdates(tmp_path / "path.zarr", create=dict(keep=0.3), exist_ok=False)],
                 enable_checkpointing=False).fit(Module(), _loader())


# ----------------------------------------------------------------- DDP: strategy="ddp", devices=2
# Lightning's "ddp" strategy starts the second process by running the script again, so the run
# is a script of its own. Each rank gets every other sample of a batch of 16 (DistributedSampler
# with shuffle off), so a step's global batch is 16 consecutive samples, as in one process with
# batch_size=16.
_DDP_SCRIPT = r"""
import os, sys, warnings
import torch, lightning
import pyunlearn as pu
from lightning.pytorch.callbacks import ModelCheckpoint
from pyunlearn.integrations.lightning import RecordUpdates
from tests.support import tiny_data, tiny_lightning_module
from tests.support.distributed import leave

class Module(tiny_lightning_module()):
    def train_dataloader(self):  # after the process group exists; Lightning's own sampler would shuffle
        data = list(zip(*tiny_data(64)))
        sampler = torch.utils.data.DistributedSampler(data, shuffle=False)
        return torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)

path, root, mode = sys.argv[1], sys.argv[2], sys.argv[3]
saving = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=4, save_top_k=-1, filename="{step}")
# The same arguments on every rank: rank 0 creates (or, resuming, opens) the store, rank 1 only gathers.
callback = RecordUpdates(path, create=dict(keep=1.0, value_dtype="float32"))
trainer = lightning.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=3, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                            callbacks=[callback, saving], use_distributed_sampler=False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer.fit(Module(), ckpt_path=os.path.join(root, "ckpt", "step=4.ckpt") if mode == "resume" else None)
rank = trainer.global_rank
for w in caught:
    if "dropped the store" in str(w.message):
        print(f"rank {rank} warned: {w.message}", flush=True)
print(f"rank {rank} done, store {'none' if callback.store is None else 'written'}", flush=True)
leave()  # without C++ static destructors: gloo sometimes aborts at exit (tests/support/distributed.py)
"""


def _ddp_fit(tmp_path, mode):
    script = tmp_path / "lit_ddp.py"
    script.write_text(_DDP_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "ddp.zarr"), str(tmp_path), mode],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "rank 0 done, store written" in out.stdout and "rank 1 done, store none" in out.stdout, \
        out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def _single_process_run(tmp_path):
    module = Module()
    store = pu.UpdateStore.create(tmp_path / "single.zarr", module, keep=1.0, value_dtype="float32")
    ids, x, y = tiny_data(64)
    loader = torch.utils.data.DataLoader(list(zip(ids, x, y)), batch_size=16, shuffle=False)
    _trainer(tmp_path, [RecordUpdates(store)], enable_checkpointing=False).fit(module, loader)
    return store


def _assert_equals_single_process(ddp, single):
    assert ddp.steps == single.steps == 12
    for i in range(1000, 1064):  # each sample in the same steps: the global batches
        assert ddp.steps_for([i]).steps.tolist() == single.steps_for([i]).steps.tolist(), i
    for step in range(12):  # DDP averages two 8-sample gradients: equal to float rounding
        for a, b in zip(dense_update(ddp, step), dense_update(single, step)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="session")
def ddp_fresh(tmp_path_factory):
    """The folder of one fresh two-process fit (its store, ddp.zarr: 12 steps; checkpoints after
    4, 8 and 12), made once for the run: the tests below read it, or copy it before they change it."""
    return made_once(tmp_path_factory, "lightning-ddp", lambda root: _ddp_fit(root, "fresh"))


@pytest.mark.slow  # two processes
def test_ddp_records_the_global_batches_on_the_writer_rank(tmp_path, ddp_fresh):
    _assert_equals_single_process(pu.UpdateStore.open(ddp_fresh / "ddp.zarr", mode="r"), _single_process_run(tmp_path))


@pytest.mark.slow  # two processes
def test_ddp_fit_from_a_checkpoint_continues_the_store(tmp_path, ddp_fresh):
    shutil.copytree(ddp_fresh, tmp_path, dirs_exist_ok=True)  # 12 steps, checkpoints after 4, 8 and 12
    assert torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=True)[
        "callbacks"]["RecordUpdates"]["recorder"]["steps"] == 4
    out = _ddp_fit(tmp_path, "resume")  # from step 4: the writer drops the 8 later steps
    assert "rank 0 warned: resuming from the checkpoint at step 4: dropped the store's 8 later steps" in out
    _assert_equals_single_process(pu.UpdateStore.open(tmp_path / "ddp.zarr", mode="r"), _single_process_run(tmp_path))
