"""String keys end to end in the training frameworks: the Hugging Face Trainer (a key column
mapped once, gradient accumulation, resume_from_checkpoint, then a deletion by key), Lightning
(keys in the batches, secret=, the environment) and Accelerate (rec.loader and the recorder
registered for checkpointing); and a store path that exists when a run starts again."""
from __future__ import annotations

import warnings

import pytest
import torch

import pyunlearn as pu
from tests.support import tiny_data, tiny_lightning_module

SECRET = "frameworks-keys-secret-0123456789"
N, BATCH, ACCUMULATE, EPOCHS = 24, 4, 2, 2
STEPS = EPOCHS * N // (BATCH * ACCUMULATE)  # 6 optimizer steps
USERS = [f"user{i}@example.com" for i in range(N)]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons (the accumulation settings among them): each
    test starts from none, as a new process would."""
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState
    except ImportError:
        yield
        return
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    yield
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


def _keys_per_step(store, users=USERS) -> list[list[str]]:
    """Each step's keys, through the public lookup by key."""
    per_step = [[] for _ in range(store.steps)]
    for user in users:
        for step in store.steps_for([user]).steps.tolist():
            per_step[step].append(user)
    return per_step


def _assert_same_store(a, b, steps):
    assert a.steps == b.steps == steps
    assert _keys_per_step(a) == _keys_per_step(b)
    for x, y in zip(a.read(range(steps)), b.read(range(steps))):
        assert torch.equal(x, y)


# ----------------------------------------------------------------- Hugging Face Trainer
def _bert(**options):
    transformers = pytest.importorskip("transformers", reason="the Trainer integration needs transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2, **options)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _rows():
    """Feature dicts with each sample's key in a "user" column (a str: the collator cannot batch it)."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for user in USERS:
        tokens = torch.randint(1, 40, (8,), generator=gen)
        rows.append({"input_ids": tokens.tolist(), "attention_mask": [1] * 8, "labels": int(tokens[0] % 2),
                     "user": user})
    return rows


def _args(root, **options):
    import transformers

    base = dict(output_dir=str(root), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATE,
                num_train_epochs=EPOCHS, learning_rate=1e-3, seed=0, use_cpu=True, report_to="none",
                disable_tqdm=True, logging_strategy="no", save_strategy="no")
    return transformers.TrainingArguments(**{**base, **options})


def _trainer(root, path, data_kind="datasets.Dataset", secret=SECRET, **options):
    import transformers
    from pyunlearn.integrations.transformers import RecordUpdates

    callback = RecordUpdates(path, create=dict(keep=0.5, value_dtype="float32"), secret=secret)
    rows = _rows()
    if data_kind == "datasets.Dataset":
        datasets = pytest.importorskip("datasets", reason="the datasets.Dataset case needs the datasets package")
        rows = datasets.Dataset.from_list(rows)
    train = callback.map_keys(rows, column="user")  # the one line a key column needs
    return transformers.Trainer(model=_bert(), args=_args(root, **options), train_dataset=train,
                                callbacks=[callback]), callback


@pytest.mark.parametrize("data_kind", ["datasets.Dataset", "list of dicts"])
def test_trainer_with_string_keys_accumulation_resume_and_forget_by_key(tmp_path, data_kind):
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
    path = tmp_path / "keys.zarr"
    trainer, callback = _trainer(tmp_path / "run", path, data_kind, save_strategy="steps", save_steps=2)
    trainer.train()  # 6 steps, checkpoints after 2, 4 and 6
    assert callback.store.metadata.keyed
    assert callback.recorder.key_check == callback.store.metadata.key_check == pu.keys.KeyHasher(SECRET).check
    checkpoint = tmp_path / "run" / "checkpoint-2"

    resumed, _ = _trainer(tmp_path / "run", path, data_kind, save_strategy="steps", save_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert any("dropped the store's 4 later steps" in str(w.message) for w in caught)

    straight_trainer, _ = _trainer(tmp_path / "straight", tmp_path / "straight.zarr", data_kind)
    straight_trainer.train()
    store = pu.UpdateStore.open(path, secret=SECRET)
    straight = pu.UpdateStore.open(tmp_path / "straight.zarr", mode="r", secret=SECRET)
    _assert_same_store(store, straight, STEPS)
    assert store.final_fingerprint == straight.final_fingerprint
    per_step = _keys_per_step(store)
    assert all(len(users) == BATCH * ACCUMULATE for users in per_step)  # both micro-batches of each step
    assert sorted(u for users in per_step[:3] for u in users) == sorted(USERS)  # each key once per epoch

    # Integer IDs are refused by a store of keys; the key itself is found.
    with pytest.raises(TypeError, match="integer IDs would match nothing"):
        store.steps_for([int(store.ids_for([USERS[3]])[0])])
    report = pu.amnesiac_forget(resumed.model, store, [USERS[3]], request_id="GDPR-7")
    assert report.steps_removed == EPOCHS and report.status == "applied"
    (request,) = store.ledger.audit()
    assert request["request"] == "GDPR-7" and request["status"] == "applied"
    store.close()


def test_map_keys_needs_a_secret_and_keeps_other_columns(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the Trainer integration needs transformers")
    from pyunlearn.integrations.transformers import RecordUpdates

    monkeypatch.delenv("PYUNLEARN_SECRET", raising=False)
    monkeypatch.delenv("PYUNLEARN_SECRET_FILE", raising=False)
    with pytest.raises(pu.KeyMappingError, match="map_keys needs the secret"):
        RecordUpdates(tmp_path / "s.zarr").map_keys(_rows(), column="user")
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET + "\n")
    monkeypatch.setenv("PYUNLEARN_SECRET_FILE", str(secret_file))
    rows = RecordUpdates(tmp_path / "s.zarr").map_keys(_rows(), column="user", remove=False)
    expected = pu.keys.KeyHasher(SECRET).ids(USERS)
    assert [row["ids"] for row in rows] == expected.tolist() and rows[0]["user"] == USERS[0]
    assert "user" not in RecordUpdates(tmp_path / "s.zarr").map_keys(_rows(), column="user")[0]
    with pytest.raises(KeyError, match="'nobody'"):
        RecordUpdates(tmp_path / "s.zarr").map_keys(_rows(), column="nobody")


# ----------------------------------------------------------------- Lightning
def _lightning():
    return pytest.importorskip("lightning", reason="the Lightning integration is an optional extra")


def _keyed_loader(n=64):
    _, x, y = tiny_data(n)
    return torch.utils.data.DataLoader(list(zip([f"user{i}" for i in range(n)], x, y)), batch_size=16)


def _fit(module, callback, root, epochs=2):
    lightning = _lightning()
    lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                      callbacks=[callback]).fit(module, _keyed_loader())


def test_lightning_with_string_keys_and_a_secret(tmp_path, monkeypatch):
    _lightning()
    from pyunlearn.integrations.lightning import RecordUpdates

    monkeypatch.delenv("PYUNLEARN_SECRET", raising=False)
    monkeypatch.delenv("PYUNLEARN_SECRET_FILE", raising=False)
    Module = tiny_lightning_module()
    module = Module()
    callback = RecordUpdates(tmp_path / "lit.zarr", create=dict(keep=0.3), secret=SECRET)
    _fit(module, callback, tmp_path)

    plain = Module()
    optimizer = plain.configure_optimizers()
    reference = pu.UpdateStore.create(tmp_path / "plain.zarr", plain, keep=0.3, secret=SECRET)
    with pu.UpdateRecorder(plain, optimizer, reference) as rec:
        for _ in range(2):
            for batch in _keyed_loader():
                assert isinstance(batch[0], (list, tuple)) and isinstance(batch[0][0], str)  # the default collate
                rec.batch(batch[0])
                optimizer.zero_grad()
                plain.training_step(batch, 0).backward()
                optimizer.step()
    store = pu.UpdateStore.open(tmp_path / "lit.zarr", secret=SECRET)
    assert store.metadata.keyed and store.steps == reference.steps == 8
    for a, b in zip(store.read(range(8)), reference.read(range(8))):
        assert torch.equal(a, b)
    assert store.steps_for(["user3"]).steps.tolist() == reference.steps_for(["user3"]).steps.tolist() == [0, 4]
    assert pu.amnesiac_forget(module, store, ["user3"]).steps_removed == 2
    store.close()

    # The secret from the environment instead; a wrong one is refused before any step.
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET)
    monkeypatch.setenv("PYUNLEARN_SECRET_FILE", str(secret_file))
    env_callback = RecordUpdates(tmp_path / "env.zarr", create=dict(keep=0.3))
    _fit(Module(), env_callback, tmp_path, epochs=1)
    env = pu.UpdateStore.open(tmp_path / "env.zarr", mode="r", secret=SECRET)
    assert env.metadata.key_check == store.metadata.key_check and env.steps_for(["user3"]).steps.tolist() == [0]
    with pytest.raises(pu.KeyMappingError, match="not the secret"):
        _fit(Module(), RecordUpdates(tmp_path / "lit.zarr", secret="another secret, 16+ bytes"), tmp_path)


# ----------------------------------------------------------------- Accelerate
def test_accelerate_with_string_keys_and_the_recorder_registered_for_checkpointing(tmp_path):
    """rec.loader declares the keys of each micro-batch of an accumulation window (Accelerate's
    collator drops str columns, so the keys come from the dataset index); the recorder is a
    checkpointed object: accelerator.load_state hands its state back, and recording continues at
    the checkpoint's step."""
    transformers = pytest.importorskip("transformers", reason="the model is a tiny BERT")
    accelerate = pytest.importorskip("accelerate", reason="the Accelerate case needs accelerate")
    from accelerate.state import AcceleratorState, GradientState, PartialState

    rows = [{k: v for k, v in row.items() if k != "user"} for row in _rows()]

    def run(path, *, stop_after=None, resume_from=None, save_at=None):
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()
        accelerator = accelerate.Accelerator(gradient_accumulation_steps=ACCUMULATE, cpu=True)
        # No dropout: the DataLoader iterator a mid-epoch resume creates draws its seed from the
        # global RNG, so the dropout masks after it differ from a straight run's (Accelerate's
        # resume, not the recorder, would make the stores differ).
        model = _bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(rows, batch_size=BATCH, collate_fn=transformers.default_data_collator)
        store = pu.UpdateStore.create(path, model, keep=0.5, value_dtype="float32", secret=SECRET) \
            if resume_from is None else pu.UpdateStore.open(path, secret=SECRET)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        rec = pu.UpdateRecorder(model, optimizer, store)
        accelerator.register_for_checkpointing(rec)  # its state_dict / load_state_dict
        start = 0
        if resume_from is not None:
            with pytest.warns(RuntimeWarning, match="dropped the store's 4 later steps"):
                accelerator.load_state(resume_from)
            start = rec.steps
        for epoch in range(start * ACCUMULATE // len(loader), EPOCHS):
            batches = loader
            skip = start * ACCUMULATE - epoch * len(loader)
            if skip > 0:  # the rest of the checkpoint's epoch
                batches = accelerator.skip_first_batches(loader, skip)
            for batch in rec.loader(batches, key=lambda index: USERS[index]):
                with accelerator.accumulate(model):
                    accelerator.backward(model(**batch).loss)
                    optimizer.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients and rec.steps == save_at:
                    accelerator.save_state(str(tmp_path / "checkpoint"))
                if rec.steps == stop_after:
                    rec.close()
                    return store
        rec.close()
        return store

    abandoned = run(tmp_path / "acc.zarr", save_at=2)
    assert abandoned.steps == STEPS
    abandoned.close()
    resumed = run(tmp_path / "acc.zarr", resume_from=str(tmp_path / "checkpoint"))
    straight = run(tmp_path / "straight.zarr")
    _assert_same_store(resumed, straight, STEPS)
    assert resumed.final_fingerprint == straight.final_fingerprint
    assert _keys_per_step(resumed)[0] == USERS[: BATCH * ACCUMULATE]


# ----------------------------------------------------------------- a store path that exists
def test_a_rerun_reopens_its_store_and_refuses_another_model(tmp_path):
    _lightning()
    from pyunlearn.integrations.lightning import RecordUpdates

    Module = tiny_lightning_module()
    module = Module()
    path = tmp_path / "rerun.zarr"
    _fit(module, RecordUpdates(path, create=dict(keep=0.3), secret=SECRET), tmp_path, epochs=1)
    assert pu.UpdateStore.open(path, mode="r").steps == 4

    # The same script again, from a fresh model: the store is opened, and the recorder's resume
    # rules refuse this model at the first step (the store's 4 steps end with another one).
    with pytest.raises(pu.RecorderError, match="already holds 4 steps, and this model is not the one they end with"):
        _fit(Module(), RecordUpdates(path, create=dict(keep=0.3), secret=SECRET), tmp_path, epochs=1)
    # From the model the first run ended with, training goes on in the same store.
    _fit(module, RecordUpdates(path, create=dict(keep=0.3), secret=SECRET), tmp_path, epochs=1)
    assert pu.UpdateStore.open(path, mode="r").steps == 8

    class Wider(Module):
        def __init__(self):
            super().__init__()
            self.net.fc2 = torch.nn.Linear(16, 4)

    with pytest.raises(pu.ModelMismatchError, match="already holds an update store, of another model"):
        _fit(Wider(), RecordUpdates(path, create=dict(keep=0.3), secret=SECRET), tmp_path, epochs=1)
    with pytest.raises(pu.StoreError, match=r"recorded with keep 0.3 \(create= asks for 0.5\)"):
        _fit(module, RecordUpdates(path, create=dict(keep=0.5), secret=SECRET), tmp_path, epochs=1)
    with pytest.raises(FileExistsError, match="already holds an update store"):
        _fit(module, RecordUpdates(path, create=dict(keep=0.3), secret=SECRET, exist_ok=False), tmp_path, epochs=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    with pytest.raises(FileExistsError, match="not a pyunlearn update store"):
        _fit(module, RecordUpdates(tmp_path / "other", create=dict(keep=0.3)), tmp_path, epochs=1)
    assert pu.UpdateStore.open(path, mode="r").steps == 8
