"""A refusal on one rank stops every rank before the optimizer step runs: the plain recorder
(two gloo processes), Lightning (strategy="ddp" on the CPU) and the Hugging Face Trainer (under
torchrun). Before, the refusing rank raised in rec.batch and the others went on into DDP's next
all-reduce (gloo fails there, NCCL hangs): each test's timeout turns a hang into a failure."""
from __future__ import annotations

import re

import pytest
import torch

import pyunlearn as pu
from tests.support import TinyNet, tiny_lightning_module
from tests.support.distributed import free_port, run_script
from tests.support.shared import made_once

pytestmark = pytest.mark.slow

SECRET = "frameworks-refusals-secret-0123456789"

# As tests/recording/test_ddp.py: the ranks are forks of a launcher that imported torch and
# ran nothing, one pair of ranks per mode in turn (one interpreter for every mode); every worker
# tears down on every path (tests/support/distributed.py: leave).
_WORKER = r"""
import os, sys, torch, torch.multiprocessing as mp
import pyunlearn as pu
from tests.support import TinyNet
from tests.support.distributed import join, leave, say as say_line

SECRET = %(secret)r

def worker(rank, path, port, mode):
    def say(line):
        say_line(f"[{mode}] " + line)

    os.environ.pop("PYUNLEARN_SECRET", None)
    join(rank, 2, port)
    model = TinyNet()
    model.load_state_dict(torch.load(path + ".model.pt", weights_only=True))  # the deletion's model
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    secret = SECRET
    if mode == "other secret" and rank == 1:
        secret = "another secret, 16+ bytes long"
    if mode == "no secret on rank 1" and rank == 1:
        secret = None
    store = pu.UpdateStore.open(path, secret=SECRET) if rank == 0 else None
    rec = None
    try:
        rec = pu.UpdateRecorder(ddp, optimizer, store, secret=secret)
        if mode == "wrong state on rank 1" and rank == 1:  # the recorder state of another checkpoint
            assert rec.load_state_dict({"format": "pyunlearn.recorder-state", "version": 1, "steps": 1,
                                        "fingerprint": "xxh3:" + "0" * 32}) == 0  # raised at the step
        for step in range(3):
            users = [f"user{rank}-{step}"]
            if mode == "forgotten" and rank == 1 and step == 1:
                users.append("forgotten-user")
            before = pu.kernels.fingerprint(list(model.parameters()))
            rec.batch(users)
            optimizer.zero_grad()
            ddp(torch.randn(2, 8)).sum().backward()
            try:
                optimizer.step()
            finally:
                unchanged = pu.kernels.fingerprint(list(model.parameters())) == before
            say(f"rank {rank} stepped {step}")
        rec.close()
    except Exception as exc:
        message = str(exc).replace(chr(10), " ")
        say(f"rank {rank} raised {type(exc).__name__}: {message}")
        if mode in ("forgotten", "no secret on rank 1", "wrong state on rank 1"):
            say(f"rank {rank} model unchanged by the refused step: {unchanged}")
        if rec is not None:
            rec.close()
    finally:
        if store is not None:
            store.close()
        del ddp
        leave()

if __name__ == "__main__":  # argv: (store path, port, mode) for each mode
    for path, port, mode in zip(*[iter(sys.argv[1:])] * 3):
        mp.start_processes(worker, args=(path, int(port), mode), nprocs=2, start_method="fork")
""" % {"secret": SECRET}


def _store_with_a_deletion(path, module=None, forgotten="forgotten-user"):
    """A store of keys holding one step (with `forgotten` and another key) and the deletion of
    `forgotten`; the deletion's model is saved beside it (path + ".model.pt"), for training to go
    on from. `module`: the model (a TinyNet by default)."""
    torch.manual_seed(0)
    model = module if module is not None else TinyNet()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    store = pu.UpdateStore.create(path, model, keep=1.0, value_dtype="float32", secret=SECRET)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        rec.batch([forgotten, "someone-else"])
        optimizer.zero_grad()
        sum(p.sum() for p in trainable).backward()
        optimizer.step()
    assert pu.amnesiac_forget(model, store, [forgotten]).steps_removed == 1
    store.close()
    torch.save(model.state_dict(), str(path) + ".model.pt")
    return model


def _raised(stdout: str) -> dict[int, str]:
    return {int(rank): error for rank, error in re.findall(r"rank (\d) raised (.*)", stdout)}


MODES = ("forgotten", "no secret on rank 1", "wrong state on rank 1", "other secret", "store locked")


@pytest.fixture(scope="session")
def refusals(tmp_path_factory):
    """Every mode's run, one pair of ranks after another from one launcher (made once for the
    run): mode → (its stdout lines, the launcher's output, the store's path)."""
    def run_every_mode(folder):
        paths = {mode: folder / f"store-{i}.zarr" for i, mode in enumerate(MODES)}
        for path in paths.values():
            _store_with_a_deletion(path)
        argv = [a for mode, path in paths.items() for a in (path, free_port(), mode)]
        with pu.UpdateStore.open(paths["store locked"]) as held, held.writing():  # another writer of this host
            out = run_script(folder / "worker.py", _WORKER, *argv, timeout=300)
        (folder / "stdout.txt").write_text(out.stdout)
        (folder / "context.txt").write_text(f"exit {out.returncode}\n{out.stdout[-2000:]}{out.stderr[-3000:]}")

    folder = made_once(tmp_path_factory, "refusals", run_every_mode)
    stdout, context = (folder / "stdout.txt").read_text(), (folder / "context.txt").read_text()
    assert context.startswith("exit 0\n"), context
    lines = {mode: "\n".join(line[len(mode) + 3:] for line in stdout.splitlines() if line.startswith(f"[{mode}] "))
             for mode in MODES}
    return {mode: (lines[mode], context, folder / f"store-{i}.zarr") for i, mode in enumerate(MODES)}


@pytest.mark.parametrize("mode", MODES)
def test_a_refusal_on_one_rank_stops_every_rank_before_the_step(refusals, mode):
    stdout, context, path = refusals[mode]
    raised = _raised(stdout)
    assert set(raised) == {0, 1}, context
    kinds = {error.split(":")[0] for error in raised.values()}
    expected = {"forgotten": ("RecorderError", "rank 1 of 2: this batch holds 1 sample(s) whose deletion was "
                                               "requested"),
                "no secret on rank 1": ("KeyMappingError", "rank 1 of 2: this rank's batch are keys, which need "
                                                           "the store's secret"),
                "wrong state on rank 1": ("ModelMismatchError", "rank 1 of 2: the model is not the one this "
                                                                "recorder state was saved with"),
                "other secret": ("RecorderError", "the ranks map keys with different secrets"),
                "store locked": ("StoreLockedError", "rank 0 of 2:")}[mode]
    assert kinds == {expected[0]}, raised
    assert all(expected[1] in error for error in raised.values()), raised
    if mode == "forgotten":  # raised at step 1, before it ran, on both ranks
        assert "rank 0 stepped 0" in stdout and "rank 1 stepped 0" in stdout
        assert "stepped 1" not in stdout
    else:  # rank 1's first batch or state, or as recording started
        assert "stepped" not in stdout
    if mode in ("forgotten", "no secret on rank 1", "wrong state on rank 1"):
        assert stdout.count("model unchanged by the refused step: True") == 2, stdout
    store = pu.UpdateStore.open(path, mode="r", secret=SECRET)
    assert store.steps == (2 if mode == "forgotten" else 1)  # the steps before it


# ----------------------------------------------------------------- Lightning, strategy="ddp"
# Each rank gets every other sample of a batch of 16 (DistributedSampler, shuffle off): the
# forgotten key, sample 5, is in rank 1's first batch.
_LIGHTNING_SCRIPT = r"""
import os, sys, torch, lightning
import pyunlearn as pu
from pyunlearn.integrations.lightning import RecordUpdates
from tests.support import tiny_data, tiny_lightning_module
from tests.support.distributed import say

class Module(tiny_lightning_module()):
    def train_dataloader(self):
        ids, x, y = tiny_data(32)
        keys = [f"user{i}" for i in range(32)]
        data = list(zip(keys, x, y))
        sampler = torch.utils.data.DistributedSampler(data, shuffle=False)
        return torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)

path = sys.argv[1]
module = Module()
module.load_state_dict(torch.load(path + ".model.pt", weights_only=True))  # the deletion's model
callback = RecordUpdates(path, create=dict(keep=1.0, value_dtype="float32"), secret=%(secret)r)
trainer = lightning.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            default_root_dir=sys.argv[2], callbacks=[callback], use_distributed_sampler=False)
try:
    trainer.fit(module)
    say(f"rank {trainer.global_rank} trained")
except Exception as exc:
    message = str(exc).replace(chr(10), " ")
    say(f"rank {trainer.global_rank} raised {type(exc).__name__}: {message}")
sys.stdout.flush()
os._exit(0)
""" % {"secret": SECRET}


def test_lightning_ddp_a_forgotten_sample_on_one_rank_stops_both(tmp_path):
    pytest.importorskip("lightning", reason="the Lightning integration is an optional extra")
    path = tmp_path / "lit.zarr"
    module = tiny_lightning_module()()
    _store_with_a_deletion(path, module, forgotten="user5")
    out = run_script(tmp_path / "lit_ddp.py", _LIGHTNING_SCRIPT, path, tmp_path, timeout=300, cwd=tmp_path)
    raised = _raised(out.stdout)
    assert set(raised) == {0, 1}, out.stdout[-2000:] + out.stderr[-4000:]
    for error in raised.values():
        assert error.startswith("RecorderError: rank 1 of 2: this batch holds 1 sample(s) whose deletion was "
                                "requested"), raised
    store = pu.UpdateStore.open(path, mode="r", secret=SECRET)
    assert store.steps == 1  # the refused step did not run (the store was reopened: exist_ok)


# ----------------------------------------------------------------- Hugging Face Trainer, torchrun
# Rank 1's rows hold the forgotten key ("user5") and rank 0's do not, so the refusal starts on
# the rank that holds no store.
_TORCHRUN_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist, transformers
from pyunlearn.integrations.transformers import RecordUpdates
from tests.support.distributed import leave, say

root, path = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16, num_labels=2)
model = transformers.BertForSequenceClassification(config)
model.load_state_dict(torch.load(path + ".model.pt", weights_only=True))  # the deletion's model
gen = torch.Generator().manual_seed(1)
rows = []
for i in range(16):
    tokens = torch.randint(1, 40, (8,), generator=gen)
    rows.append({"input_ids": tokens.tolist(), "attention_mask": [1] * 8, "labels": int(tokens[0] %% 2),
                 "user": "user5" if rank == 1 else f"user{100 + i}"})
callback = RecordUpdates(path, create=dict(keep=1.0, value_dtype="float32"), secret=%(secret)r)
args = transformers.TrainingArguments(output_dir=os.path.join(root, "out"), per_device_train_batch_size=4,
                                      num_train_epochs=1, use_cpu=True, report_to="none", disable_tqdm=True,
                                      logging_strategy="no", save_strategy="no", seed=0)
trainer = transformers.Trainer(model=model, args=args, train_dataset=callback.map_keys(rows, column="user"),
                               callbacks=[callback])
try:
    trainer.train()
    say(f"rank {rank} trained")
except Exception as exc:
    message = str(exc).replace(chr(10), " ")
    say(f"rank {rank} raised {type(exc).__name__}: {message}")
    callback.close()
leave()
""" % {"secret": SECRET}


def test_trainer_under_torchrun_a_forgotten_sample_on_rank_1_stops_both(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the Trainer integration needs transformers")
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    path = tmp_path / "hf.zarr"
    torch.manual_seed(0)
    _store_with_a_deletion(path, transformers.BertForSequenceClassification(config), forgotten="user5")
    out = run_script(tmp_path / "hf_ddp.py", _TORCHRUN_SCRIPT, tmp_path, path, torchrun=True, timeout=300,
                     cwd=tmp_path)
    raised = _raised(out.stdout)
    assert set(raised) == {0, 1}, out.stdout[-2000:] + out.stderr[-4000:]
    for error in raised.values():
        assert error.startswith("RecorderError: rank 1 of 2: this batch holds 4 sample(s) whose deletion was "
                                "requested"), raised  # rank 1's micro-batch of 4, all "user5"
    assert pu.UpdateStore.open(path, mode="r", secret=SECRET).steps == 1
