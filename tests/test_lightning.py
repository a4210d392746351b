"""The Lightning callback records what the plain recorder records for the same run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.testing import TinyNet, tiny_data

lightning = pytest.importorskip("lightning", reason="the Lightning integration is an optional extra")
from pyunlearn.integrations.lightning import RecordUpdates  # noqa: E402


class Module(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet()

    def training_step(self, batch, batch_idx):
        _, x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


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
    with pytest.raises(TypeError, match="store must be an UpdateStore"):
        RecordUpdates("updates.zarr")


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
    assert np.array_equal(store._data.read("offsets", slice(0, 13)), reference._data.read("offsets", slice(0, 13)))
    assert np.array_equal(store._data.read("sample_ids", slice(0, store.samples)),
                          reference._data.read("sample_ids", slice(0, reference.samples)))
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
