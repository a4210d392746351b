"""The Hugging Face Trainer callback and Accelerate: the store equals what the plain recorder
writes for the same run. A tiny BERT built from a config (no download), a few steps on CPU."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pyunlearn as pu

transformers = pytest.importorskip("transformers", reason="the Trainer integration needs transformers")
accelerate = pytest.importorskip("accelerate", reason="the Trainer integration needs accelerate")
from pyunlearn.integrations.transformers import RecordUpdates  # noqa: E402
from tests.support.huggingface import ACCUMULATE, BATCH, EPOCHS, IDS, STEPS  # noqa: E402
from tests.support.huggingface import args as _args  # noqa: E402
from tests.support.huggingface import dataset as _dataset  # noqa: E402
from tests.support.huggingface import model as _model  # noqa: E402

@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons (the accumulation settings among them): each
    test starts from none, as a new process would."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    yield
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()


class _HandWired(transformers.Trainer):
    """pyunlearn wired in by hand, with the plain recorder: what the issue needed before the
    callback (remove_unused_columns=False, compute_loss popping the IDs, the optimizer unwrapped)."""

    store: pu.UpdateStore
    recorder: pu.UpdateRecorder | None = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.recorder is None:
            self.recorder = pu.UpdateRecorder(self.model, self.optimizer, self.store)
        self.recorder.batch(inputs.pop("ids"))
        return super().compute_loss(model, inputs, *args, **kwargs)


def _ids_per_step(store) -> list[list[int]]:
    """Each step's sample IDs, sorted, through the public lookup."""
    per_step = [[] for _ in range(store.steps)]
    for i in IDS:
        for step in store.steps_for([i]).steps.tolist():
            per_step[step].append(i)
    return per_step


def _assert_same_store(a, b, steps):
    assert a.steps == b.steps == steps
    assert _ids_per_step(a) == _ids_per_step(b)
    for x, y in zip(a.read(range(steps)), b.read(range(steps))):
        assert torch.equal(x, y)


def _as(kind: str, rows):
    if kind == "list of dicts":
        return rows
    datasets = pytest.importorskip("datasets", reason="the datasets.Dataset case needs the datasets package")
    return datasets.Dataset.from_list(rows)


# A datasets.Dataset loses the unused columns before batching (dataset.remove_columns), any other
# dataset in the Trainer's collator wrapper: both keep the ID column for the callback.
@pytest.mark.parametrize("kind", ["list of dicts", "datasets.Dataset"])
def test_trainer_callback_records_what_the_plain_recorder_records(tmp_path, kind):
    model = _model()
    callback = RecordUpdates(tmp_path / "callback.zarr", create=dict(keep=0.5, value_dtype="float32"))
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "a"), train_dataset=_as(kind, _dataset()),
                                   callbacks=[callback])
    assert trainer.args.remove_unused_columns  # the default, left alone
    trainer.train()
    store = pu.UpdateStore.open(tmp_path / "callback.zarr", mode="r")

    plain_model = _model()
    reference = pu.UpdateStore.create(tmp_path / "plain.zarr", plain_model, keep=0.5, value_dtype="float32")
    hand = _HandWired(model=plain_model, args=_args(tmp_path / "b", remove_unused_columns=False),
                      train_dataset=_dataset())
    hand.store = reference
    hand.train()
    hand.recorder.close()

    # Same run (same seeds, batches and kernels), so the same rows bit for bit.
    _assert_same_store(store, reference, STEPS)
    assert store.final_fingerprint == reference.final_fingerprint
    per_step = _ids_per_step(store)
    assert all(len(ids) == BATCH * ACCUMULATE for ids in per_step)  # both micro-batches of each step
    for epoch in range(EPOCHS):  # every sample once per epoch
        steps = per_step[epoch * STEPS // EPOCHS : (epoch + 1) * STEPS // EPOCHS]
        assert sorted(i for ids in steps for i in ids) == IDS
    # Forgetting works on the Trainer's model.
    forget = pu.UpdateStore.open(tmp_path / "callback.zarr")
    assert pu.amnesiac_forget(model, forget, [IDS[3]]).steps_removed == EPOCHS
    # An evaluation dataset may carry the column; its IDs are dropped.
    assert "eval_loss" in trainer.evaluate(_as(kind, _dataset()))


def test_batches_without_the_id_column_are_refused(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "ids"} for row in _dataset()]
    callback = RecordUpdates(tmp_path / "s.zarr", create=dict(keep=0.5))
    trainer = transformers.Trainer(model=_model(), args=_args(tmp_path / "a"), train_dataset=rows,
                                   callbacks=[callback])
    with pytest.raises(pu.RecorderError, match="batches carry no 'ids' column"):
        trainer.train()
    callback.close()
    assert pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").steps == 0
    with pytest.raises(TypeError, match="store must be an UpdateStore or a path"):
        RecordUpdates(42)
    with pytest.raises(TypeError, match="restore_callback_states_from_checkpoint"):
        RecordUpdates()


def _samples(rows):
    """The rows as a SampleSet: token IDs as x (attention masks are all ones), labels as y."""
    from pyunlearn.data import SampleSet

    return SampleSet(torch.tensor([r["ids"] for r in rows]), torch.tensor([r["input_ids"] for r in rows]),
                     torch.tensor([r["labels"] for r in rows]))


def test_every_method_and_metric_reads_a_hugging_face_models_logits(tmp_path):
    """A transformers model returns a ModelOutput, not a tensor: pu.forget (its probe, dampening
    and membership check), repair, the other methods and the metrics read its .logits. Before,
    each failed inside cross_entropy on the Trainer's own model. Token IDs alone are the input
    here (the rows are unpadded: a padded batch would need its attention mask)."""
    from pyunlearn import unlearn
    from pyunlearn.evaluation import metrics

    model = _model()
    callback = RecordUpdates(tmp_path / "s.zarr", create=dict(keep=1.0, value_dtype="float32"))
    transformers.Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=_dataset(),
                         callbacks=[callback]).train()
    callback.close()
    forget, retain = _samples(_dataset()[:2]), _samples(_dataset()).without(IDS[:2])
    generator = torch.Generator().manual_seed(7)
    unseen = [{"ids": 900 + i, "input_ids": torch.randint(1, 40, (8,), generator=generator).tolist(),
               "labels": i % 2} for i in range(16)]
    held_out = _samples(unseen)

    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    steps = store.steps_for(IDS[:2]).steps.size
    before = [p.detach().clone() for p in model.parameters()]
    report = pu.forget(model, store, IDS[:2], probe=retain, retain_data=retain, forget_data=forget,
                       held_out=held_out, budget=1.0)
    assert report.forget.steps_removed == steps > 0
    assert any("dampened" in action and "samples' gradients" in action for action in report.actions), report.actions
    (record,) = store.ledger.audit()
    assert record["method"] == "amnesiac+guard" and {"auc_before", "auc_after"} <= record["evidence"].keys()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    for name, run in (("repair", lambda: unlearn.repair(model, store, report.forget, retain, lr=1e-3,
                                                         fine_tune_epochs=0.5, batch_size=4)),
                      ("fine_tune", lambda: unlearn.fine_tune(model, retain, epochs=1, batch_size=4)),
                      ("label_flip", lambda: unlearn.label_flip(model, forget, classes=2, max_steps=2)),
                      ("gradient_ascent", lambda: unlearn.gradient_ascent(model, forget, retain_data=retain,
                                                                          max_steps=2, max_retain_drop=None))):
        before = [p.detach().clone() for p in model.parameters()]
        done = run()
        assert (done.steps_replayed + done.fine_tune_steps if name == "repair" else done.steps) > 0, name
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), name
    store.close()
    result = metrics.evaluate(model, forget=forget, retain=retain, test=held_out, mia_samples=8, progress=False)
    assert all(0 <= value <= 100 for value in (result.UA, result.RA, result.TA, result.MIA))


def test_resume_from_checkpoint_continues_the_store_from_its_step(tmp_path):
    """A run checkpointing every 2 steps goes on to step 6; resuming from checkpoint-2 drops the
    4 later steps and records the rest again. The store then equals a straight run's."""
    args = _args(tmp_path / "run", save_strategy="steps", save_steps=2)
    path = tmp_path / "resumed.zarr"
    transformers.Trainer(model=_model(), args=args, train_dataset=_dataset(),
                         callbacks=[RecordUpdates(path, create=dict(keep=0.5, value_dtype="float32"))]).train()
    assert pu.UpdateStore.open(path, mode="r").steps == STEPS
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert transformers.TrainerState.load_from_json(str(checkpoint / "trainer_state.json")) \
        .stateful_callbacks["RecordUpdates"]["attributes"]["recorder"]["steps"] == 2

    resumed = transformers.Trainer(model=_model(), args=args, train_dataset=_dataset(),
                                   callbacks=[RecordUpdates(path, create=dict(keep=0.5, value_dtype="float32"))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert any("dropped the store's 4 later steps" in str(w.message) for w in caught)

    straight_path = tmp_path / "straight.zarr"
    transformers.Trainer(model=_model(), args=_args(tmp_path / "straight"), train_dataset=_dataset(),
                         callbacks=[RecordUpdates(straight_path, create=dict(keep=0.5, value_dtype="float32"))]).train()
    store, straight = pu.UpdateStore.open(path, mode="r"), pu.UpdateStore.open(straight_path, mode="r")
    # The Trainer restores the model, optimizer, scheduler, RNG and data position: the same run.
    _assert_same_store(store, straight, STEPS)
    assert store.final_fingerprint == straight.final_fingerprint


def test_a_plain_accelerate_loop_with_gradient_accumulation(tmp_path):
    """Accelerator.prepare wraps the optimizer; the recorder hooks the optimizer inside, which
    steps once per accumulation window: one recorded step with the IDs of its micro-batches."""
    from accelerate import Accelerator

    data = _dataset()
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False,
                                         collate_fn=transformers.default_data_collator)

    def run(path, accelerated: bool):
        model = _model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        store = pu.UpdateStore.create(path, model, keep=0.5, value_dtype="float32")
        batches = loader
        if accelerated:
            accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATE, cpu=True)
            model, optimizer, batches = accelerator.prepare(model, optimizer, loader)
            assert type(optimizer).__name__ == "AcceleratedOptimizer"
        with pu.UpdateRecorder(model, optimizer, store) as rec:  # the AcceleratedOptimizer itself
            for _ in range(EPOCHS):
                for i, batch in enumerate(batches):
                    rec.batch(batch.pop("ids"))
                    if accelerated:
                        with accelerator.accumulate(model):
                            accelerator.backward(model(**batch).loss)
                            optimizer.step()
                            optimizer.zero_grad()
                    else:  # the same arithmetic by hand
                        (model(**batch).loss / ACCUMULATE).backward()
                        if (i + 1) % ACCUMULATE == 0:
                            optimizer.step()
                            optimizer.zero_grad()
        return store

    accelerated, plain = run(tmp_path / "acc.zarr", True), run(tmp_path / "plain.zarr", False)
    _assert_same_store(accelerated, plain, STEPS)
    assert _ids_per_step(accelerated)[0] == IDS[: BATCH * ACCUMULATE]
    assert np.isfinite(accelerated.stats().ratio)


_TORCHRUN_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist, transformers
from pyunlearn.integrations.transformers import RecordUpdates
from tests.support.huggingface import args as _args, dataset as _dataset, model as _model
from tests.support.distributed import leave

root = sys.argv[1]
callback = RecordUpdates(os.path.join(root, "ddp.zarr"), create=dict(keep=1.0, value_dtype="float32"))
transformers.Trainer(model=_model(), args=_args(os.path.join(root, "out"), num_train_epochs=1),
                     train_dataset=_dataset(), callbacks=[callback]).train()
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: store {'written' if callback.store else 'none'}", flush=True)
leave()  # gloo may abort at interpreter exit: see tests/support/distributed.py
"""


@pytest.mark.slow  # torchrun, two processes
def test_trainer_under_torchrun_with_two_processes(tmp_path):
    """The same arguments on both ranks (the store as a path): rank 0 creates and writes the
    store, rank 1 only gathers; each step holds the IDs of both ranks' micro-batches."""
    from tests.support.distributed import run_script

    for attempt in range(2):  # a second try only if the processes never got to train (a port taken meanwhile)
        root = tmp_path / f"try{attempt}"
        root.mkdir()
        out = run_script(tmp_path / "hf_ddp.py", _TORCHRUN_SCRIPT, root, torchrun=True, timeout=300, cwd=root)
        if out.returncode == 0 or (root / "ddp.zarr").exists():
            break
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "rank 0 of 2: store written" in out.stdout and "rank 1 of 2: store none" in out.stdout
    store = pu.UpdateStore.open(root / "ddp.zarr", mode="r")
    per_step = _ids_per_step(store)
    # Each rank has 12 samples, 3 micro-batches of 4: a step of 2, then the epoch's last one alone.
    assert store.steps == 2 and [len(ids) for ids in per_step] == [2 * BATCH * ACCUMULATE, 2 * BATCH]
    assert sorted(i for ids in per_step for i in ids) == IDS
    assert store.final_fingerprint is not None
