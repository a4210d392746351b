"""LoRA adapters (peft) trained by the Hugging Face Trainer: the store records the adapter
parameters only (the frozen base model is not trainable, so it is not in the layer table), and
forgetting by key changes the adapters only. A tiny GPT-2 built from a config (no download)."""
from __future__ import annotations

import pytest
import torch

import pyunlearn as pu

transformers = pytest.importorskip("transformers", reason="the Trainer integration needs transformers")
peft = pytest.importorskip("peft", reason="the LoRA case needs peft (pip install 'pyunlearn[peft]')")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
from pyunlearn.integrations.transformers import RecordUpdates  # noqa: E402

SECRET = "frameworks-peft-secret-0123456789"
N, BATCH, ACCUMULATE, EPOCHS, TOKENS = 16, 4, 2, 2, 12
STEPS = EPOCHS * N // (BATCH * ACCUMULATE)  # 4 optimizer steps
USERS = [f"user{i}@example.com" for i in range(N)]


def _lora_gpt2(**config):
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        **{"vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2, **config}))
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"],
                           fan_in_fan_out=True)  # GPT-2's c_attn is a Conv1D
    return peft.get_peft_model(base, lora)


def _rows(n=N, tokens=TOKENS, vocab=64):
    gen = torch.Generator().manual_seed(1)
    rows = []
    for user in USERS[:n] if n <= len(USERS) else [f"user{i}" for i in range(n)]:
        ids = torch.randint(0, vocab, (tokens,), generator=gen).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * tokens, "labels": ids, "user": user})
    return rows


def _train(root, path, *, keep, value_dtype, **options):
    model = _lora_gpt2()
    callback = RecordUpdates(path, create=dict(keep=keep, value_dtype=value_dtype), secret=SECRET)
    args = transformers.TrainingArguments(
        output_dir=str(root), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATE,
        num_train_epochs=EPOCHS, seed=0, use_cpu=True, report_to="none", disable_tqdm=True, logging_strategy="no",
        save_strategy="no", **options)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=callback.map_keys(_rows(), column="user"),
                                   callbacks=[callback])
    return trainer, callback


def _split(model):
    """(adapter, base) parameters by name, cloned."""
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    return adapter, base


def test_lora_adapters_are_recorded_and_forgotten_by_key(tmp_path):
    trainer, callback = _train(tmp_path / "run", tmp_path / "lora.zarr", keep=0.25, value_dtype="float16",
                               learning_rate=1e-2)
    adapter_before, base_before = _split(trainer.model)
    trainer.train()
    store = pu.UpdateStore.open(tmp_path / "lora.zarr", secret=SECRET)
    names = [layer.name for layer in store.layers]
    # Only the adapters: lora_A and lora_B of c_attn in both blocks, named as in the PEFT model.
    assert names == [f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.default.weight"
                     for i in range(2) for ab in "AB"]
    assert sum(layer.numel for layer in store.layers) == sum(p.numel() for p in adapter_before.values())
    assert store.steps == STEPS and store.metadata.keyed
    assert all(len(store.step_ids([s])[0]) == BATCH * ACCUMULATE for s in range(STEPS))
    adapter_trained, base_trained = _split(trainer.model)
    assert all(torch.equal(base_trained[n], base_before[n]) for n in base_before)  # the base did not train
    assert any(not torch.equal(adapter_trained[n], adapter_before[n]) for n in adapter_before)

    report = pu.amnesiac_forget(trainer.model, store, [USERS[3]], request_id="lora-1")
    assert report.steps_removed == EPOCHS
    adapter_forgot, base_forgot = _split(trainer.model)
    assert all(torch.equal(base_forgot[n], base_before[n]) for n in base_before)  # forgetting leaves the base
    assert any(not torch.equal(adapter_forgot[n], adapter_trained[n]) for n in adapter_trained)
    assert store.stats().dense_bytes == STEPS * 4 * sum(p.numel() for p in adapter_before.values())
    store.close()


def test_dense_lora_with_sgd_forgetting_every_key_gives_the_initial_adapters(tmp_path):
    """keep=1.0 in float32 and plain SGD at a constant rate: each recorded step is the exact
    adapter update, so forgetting every key subtracts all of training from the adapters."""
    trainer, _ = _train(tmp_path / "run", tmp_path / "dense.zarr", keep=1.0, value_dtype="float32", optim="sgd",
                        learning_rate=0.05, lr_scheduler_type="constant")
    adapter_before, base_before = _split(trainer.model)
    trainer.train()
    store = pu.UpdateStore.open(tmp_path / "dense.zarr", secret=SECRET)
    assert any(not torch.equal(p, adapter_before[n]) for n, p in _split(trainer.model)[0].items())
    report = pu.amnesiac_forget(trainer.model, store, USERS)
    assert report.steps_removed == STEPS
    adapter, base = _split(trainer.model)
    for name, value in adapter.items():
        torch.testing.assert_close(value, adapter_before[name], rtol=0, atol=1e-6)
    assert all(torch.equal(base[n], base_before[n]) for n in base_before)
    store.close()


@pytest.mark.slow
def test_lora_storage_per_step_on_gpt2_small_shapes(tmp_path, capsys):
    """The measurement docs/integrations.md quotes: LoRA r=8 on c_attn of a GPT-2-small-shaped
    model (12 blocks, 768 wide; 294,912 adapter parameters), built from a config, 8 optimizer
    steps of 2 sequences of 32 tokens, AdamW at 1e-4: bytes per step of the store at keep 0.01
    and 0.1 (float16 values) against dense float32 adapter updates."""
    results = {}
    for keep in (0.01, 0.1):
        torch.manual_seed(0)
        base = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=64))  # 12 × 768, vocab 50257
        model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                          lora_dropout=0.0, target_modules=["c_attn"],
                                                          fan_in_fan_out=True))
        callback = RecordUpdates(tmp_path / f"keep{keep}.zarr", create=dict(keep=keep), secret=SECRET)
        rows = [{**row, "user": f"user{i}"} for i, row in enumerate(_rows(n=16, tokens=32, vocab=50257))]
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                                              num_train_epochs=1, learning_rate=1e-4, seed=0, use_cpu=True,
                                              report_to="none", disable_tqdm=True, logging_strategy="no",
                                              save_strategy="no")
        transformers.Trainer(model=model, args=args, train_dataset=callback.map_keys(rows, column="user"),
                             callbacks=[callback]).train()
        stats = pu.UpdateStore.open(tmp_path / f"keep{keep}.zarr", mode="r").stats()
        assert stats.steps == 8
        results[keep] = stats
    adapter = sum(layer.numel for layer in pu.UpdateStore.open(tmp_path / "keep0.01.zarr", mode="r").layers)
    assert adapter == 12 * (8 * 768 + 3 * 768 * 8)
    with capsys.disabled():
        print(f"\nLoRA r=8 on c_attn, GPT-2 small shapes: {adapter:,} adapter parameters, dense float32 "
              f"{adapter * 4:,} bytes per step")
        for keep, stats in results.items():
            print(f"keep {keep}: {stats.total_bytes / stats.steps:,.0f} bytes per step on disk "
                  f"({stats.ratio:.1f}x smaller than dense); values {stats.value_bits_per_entry:.1f} bits, "
                  f"index {stats.index_bits_per_entry:.1f} bits per kept entry")
    assert results[0.01].ratio > 30 and results[0.1].ratio > 4
