"""Where features cross, end to end as a user following docs/guide.md and docs/integrations.md
would combine them: a store of string keys recorded by a framework callback, forgotten from by
the command line on the framework's own checkpoint, then resumed from the command's output; a
plain loop's rec.loader killed and resumed, with keys in other spellings; a request that
matches nothing; and IdDataset's UUID keys through the default collate (they come out as their
canonical text)."""
from __future__ import annotations

import hashlib
import json
import unicodedata
import uuid
import warnings
from pathlib import Path

import pytest
import torch

import pyunlearn as pu
from pyunlearn.cli import main
from tests.support import TinyNet, tiny_data, tiny_lightning_module

SECRET = "cross-paths-secret-0123456789abcdef"
N = 64
USERS = [f"user{i}@example.com" for i in range(N)]


def _cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path, as a SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------- 1. Lightning + CLI + keys
def _keyed_loader(users):
    _, x, y = tiny_data(N)
    index = [USERS.index(u) for u in users]
    return torch.utils.data.DataLoader(list(zip(users, x[index], y[index])), batch_size=16)


def _guard_files(tmp_path, keys: list[str], forgotten: list[int], x, y, model: str) -> list:
    """The guarded command line's arguments, and its samples as it reads them, named by their
    keys: all as the probe, all but rows `forgotten` as retained data (a replay finds them by the
    IDs the keys map to), `forgotten` as the forgotten samples."""
    rows = range(len(y))
    for name, chosen in (("probe", list(rows)), ("retain", [i for i in rows if i not in forgotten]),
                         ("forget", forgotten)):
        torch.save({"keys": [keys[i] for i in chosen], "x": x[chosen], "y": y[chosen]}, tmp_path / f"{name}.pt")
    # A probe of 64 samples: one sample is 1.6 points, past the default overall tolerance (1 point).
    return ["--probe", tmp_path / "probe.pt", "--model", model, "--retain", tmp_path / "retain.pt",
            "--forget-data", tmp_path / "forget.pt", "--budget", "1", "--tolerance-overall", "0.05"]


def _replayable(request: dict) -> int:
    """Of the subtracted steps' retained samples, how many the --retain file held (found by the
    IDs its keys map to): the record's guard says."""
    return int(request["guard"]["request"].split("replayable=")[1].split()[0])


@pytest.mark.parametrize("guarded", [False, True], ids=["plain", "guarded"])
def test_lightning_keys_cli_forget_on_its_ckpt_then_fit_resumes_and_refuses_the_key(tmp_path, capsys, monkeypatch,
                                                                                     guarded):
    lightning = pytest.importorskip("lightning", reason="the Lightning integration is an optional extra")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pyunlearn.integrations.lightning import RecordUpdates

    monkeypatch.setenv("PYUNLEARN_SECRET", SECRET)  # the command line's secret, as an operator sets it
    path = tmp_path / "lit.zarr"
    Module = tiny_lightning_module()

    def trainer(epochs, *callbacks):
        return lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                                 enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                                 callbacks=[RecordUpdates(path, create=dict(keep=0.3), secret=SECRET), *callbacks])

    saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer(2, saving).fit(Module(), _keyed_loader(USERS))  # 2 epochs x 4 batches
    checkpoint = tmp_path / "ckpt" / "epoch=1.ckpt"
    assert torch.load(checkpoint, weights_only=True)["callbacks"]["RecordUpdates"]["recorder"]["steps"] == 8
    store = pu.UpdateStore.open(path, mode="r", secret=SECRET)
    assert store.metadata.keyed and store.steps == 8
    assert store.steps_for([USERS[3]]).steps.tolist() == [0, 4]
    store.close()

    (tmp_path / "keys.txt").write_text(USERS[3] + "\n", encoding="utf-8")
    _, x, y = tiny_data(N)
    guard = _guard_files(tmp_path, USERS, [3], x, y, "tests.support:tiny_lightning_model") if guarded else []
    code, out, err = _cli(capsys, "forget", "--store", path, "--checkpoint", checkpoint, "--keys",
                          tmp_path / "keys.txt", "--request-id", "GDPR-LIT-1", "--out", tmp_path / "forgotten.ckpt",
                          *guard)
    assert code == 0, err
    assert "request GDPR-LIT-1 applied (1 of 1 keys found)" in out and "1 recorder state updated" in out
    assert ("guard: subtracted 2 steps" in out) == guarded == ("dampened" in out), out
    forgotten = torch.load(tmp_path / "forgotten.ckpt", weights_only=True)
    assert set(forgotten) == set(torch.load(checkpoint, weights_only=True))  # a Lightning checkpoint still

    # Training goes on from the command's output, on the same store, without the forgotten key.
    kept = [u for u in USERS if u != USERS[3]]
    module = Module()
    trainer(3).fit(module, _keyed_loader(kept), ckpt_path=tmp_path / "forgotten.ckpt")
    store = pu.UpdateStore.open(path, mode="r", secret=SECRET)
    assert store.steps == 8 + 4
    (request,) = store.ledger.audit()
    assert request["request"] == "GDPR-LIT-1" and request["status"] == "applied"
    assert request["steps"] == [0, 4] and request["keys"] == 1 and request["missing"] == 0
    assert request["method"] == ("amnesiac+guard" if guarded else "amnesiac")
    assert not guarded or _replayable(request) > 0
    assert len(store.steps_for([USERS[5]]).steps) == 3
    assert [r.kind for r in store.ledger.records][-1] == "segment"
    store.close()

    code, out, err = _cli(capsys, "audit", "verify", path)
    assert code == 0, out + err
    code, out, err = _cli(capsys, "inspect", path, "--ledger")
    assert code == 0, err
    assert "GDPR-LIT-1" in out and "applied" in out

    # The checkpoint from before the deletion may not go on training: refused before any step,
    # and the resumed run's steps stay (its recorder state is at step 8 of the 12).
    with pytest.raises(pu.RecorderError, match="a deletion was applied to this checkpoint's model"):
        trainer(4).fit(Module(), _keyed_loader(kept), ckpt_path=checkpoint)
    assert pu.UpdateStore.open(path, mode="r").steps == 12

    # The forgotten key in a later batch is refused, before the step runs.
    steps_before = pu.UpdateStore.open(path, mode="r").steps
    with pytest.raises(pu.RecorderError, match="deletion was requested"):
        trainer(1).fit(module, _keyed_loader(USERS))  # the module the resumed run ended with
    assert pu.UpdateStore.open(path, mode="r").steps == steps_before


# ----------------------------------------------------------------- 2. the Trainer + CLI + keys
@pytest.fixture
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons: each Trainer starts from none."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    def reset():
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()

    reset()
    yield reset
    reset()


def _keyed_rows(users):
    """tests.support.huggingface's rows, with a "user" key column instead of its int IDs."""
    from tests.support import huggingface as hf

    rows = {f"hf-user{i}@example.com": row for i, row in enumerate(hf.dataset())}
    return [{**{k: v for k, v in rows[u].items() if k != "ids"}, "user": u} for u in users]


@pytest.mark.parametrize("guarded", [False, True], ids=["plain", "guarded"])
def test_trainer_keys_cli_forget_on_its_checkpoint_folder_then_resume_and_refuse(tmp_path, capsys, monkeypatch,
                                                                                   _fresh_accelerate_state, guarded):
    """Guarded: the command builds the Trainer's model (--model), measures its probe and
    dampens it (repairing if the probe fell): a transformers model's output is a ModelOutput,
    read by its .logits; the --retain file's keys find the steps' retained samples."""
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
    transformers = pytest.importorskip("transformers", reason="the Trainer integration needs transformers")
    datasets = pytest.importorskip("datasets", reason="the key column is a datasets.Dataset's")
    from pyunlearn.integrations.transformers import RecordUpdates
    from tests.support import huggingface as hf

    monkeypatch.setenv("PYUNLEARN_SECRET", SECRET)
    users = [f"hf-user{i}@example.com" for i in range(hf.N)]
    path = tmp_path / "hf.zarr"

    def trainer(model, rows, **options):
        _fresh_accelerate_state()
        callback = RecordUpdates(path, create=dict(keep=0.5, value_dtype="float32"), secret=SECRET)
        train = callback.map_keys(datasets.Dataset.from_list(rows), column="user")
        args = hf.args(tmp_path / "run", **{"save_strategy": "steps", "save_steps": 6, **options})
        return transformers.Trainer(model=model, args=args, train_dataset=train, callbacks=[callback]), callback

    first, _ = trainer(hf.model(), _keyed_rows(users))
    first.train()  # 6 optimizer steps, a checkpoint after the last
    checkpoint = tmp_path / "run" / "checkpoint-6"
    assert (checkpoint / "model.safetensors").is_file()
    store = pu.UpdateStore.open(path, mode="r", secret=SECRET)
    assert store.metadata.keyed and store.steps == hf.STEPS
    # A key of the first step: a later run from seed 0 meets it in its first step again.
    forgotten = next(u for u in users if store.steps_for([u]).steps.tolist()[0] == 0)
    forgotten_steps = store.steps_for([forgotten]).steps.tolist()
    assert len(forgotten_steps) == hf.EPOCHS
    store.close()

    (tmp_path / "keys.json").write_text(json.dumps([forgotten]), encoding="utf-8")
    out_folder = tmp_path / "run" / "checkpoint-6-forgotten"
    rows = _keyed_rows(users)  # token IDs as the samples' x
    guard = _guard_files(tmp_path, users, [users.index(forgotten)], torch.tensor([r["input_ids"] for r in rows]),
                         torch.tensor([r["labels"] for r in rows]), "tests.support.huggingface:model") if guarded else []
    code, out, err = _cli(capsys, "forget", "--store", path, "--checkpoint", checkpoint, "--keys",
                          tmp_path / "keys.json", "--request-id", "GDPR-HF-1", "--out", out_folder, *guard)
    assert code == 0, err
    assert "request GDPR-HF-1 applied (1 of 1 keys found)" in out and "1 recorder state updated" in out
    assert ("guard: subtracted 2 steps" in out) == guarded == ("dampened" in out), out
    assert sorted(p.name for p in out_folder.iterdir()) == sorted(p.name for p in checkpoint.iterdir())

    # Training resumes from the command's output folder, on the same store, without the key.
    kept = [u for u in users if u != forgotten]
    resumed, callback = trainer(hf.model(), _keyed_rows(kept), num_train_epochs=hf.EPOCHS + 1, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(out_folder))
    store = pu.UpdateStore.open(path, mode="r", secret=SECRET)
    assert store.steps > hf.STEPS, "the resumed run recorded nothing"
    (request,) = store.ledger.audit()
    assert request["request"] == "GDPR-HF-1" and request["status"] == "applied"
    assert request["steps"] == forgotten_steps and request["keys"] == 1 and request["missing"] == 0
    assert request["method"] == ("amnesiac+guard" if guarded else "amnesiac")
    assert not guarded or _replayable(request) > 0
    assert [r.kind for r in store.ledger.records][-1] == "segment"
    steps = store.steps
    store.close()

    code, out, err = _cli(capsys, "audit", "verify", path)
    assert code == 0, out + err
    code, out, err = _cli(capsys, "inspect", path, "--ledger")
    assert code == 0, err
    assert "GDPR-HF-1" in out and "applied" in out

    # The forgotten key back in the data: refused before the step runs.
    again, callback = trainer(resumed.model, _keyed_rows(users), num_train_epochs=1, save_strategy="no")
    try:
        with pytest.raises(pu.RecorderError, match="deletion was requested"):
            again.train()
    finally:
        callback.close()
    assert pu.UpdateStore.open(path, mode="r").steps == steps


# ----------------------------------------------------------------- 3. rec.loader, a kill, spellings
def _key(i: int):
    """Sample i's key: a UUID (even i), else a text key with an accent, recorded precomposed
    (NFC, i % 4 == 1) or decomposed (NFD, i % 4 == 3)."""
    if i % 2 == 0:
        return uuid.UUID(bytes=hashlib.sha256(f"sample {i}".encode()).digest()[:16])
    return unicodedata.normalize("NFC" if i % 4 == 1 else "NFD", f"José Müller #{i}")


KEYS = [_key(i) for i in range(N)]


def _plain_setup():
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    _, x, y = tiny_data(N)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    return model, optimizer, loader


def _plain_loop(model, optimizer, rec, loader, steps, after_step=None):
    """The documented rec.loader loop, `steps` optimizer steps (across epochs)."""
    done = 0
    while done < steps:
        for x, y in rec.loader(loader, key=lambda index: KEYS[index]):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
            if after_step is not None:
                after_step(done)
            if done == steps:
                break


def _killed_run(folder: str) -> None:
    """The victim: records 6 steps, checkpoints after 4 (recorder state included), makes every
    step durable, then SIGKILLs itself."""
    import os
    import signal

    model, optimizer, loader = _plain_setup()
    store = pu.UpdateStore.create(Path(folder) / "plain.zarr", model, keep=0.5, secret=SECRET)
    rec = pu.UpdateRecorder(model, optimizer, store)

    def checkpoint(step):
        if step == 4:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "recorder": rec.state_dict()}, Path(folder) / "step4.pt")

    _plain_loop(model, optimizer, rec, loader, 6, after_step=checkpoint)
    rec.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def test_loader_keys_killed_and_resumed_then_forget_by_other_spellings(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    victim = subprocess.run([sys.executable, "-c", "import sys; from tests.integrations.test_cross_paths import "
                             "_killed_run; _killed_run(sys.argv[1])", str(tmp_path)], cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert victim.returncode == -9, victim.stderr

    model, optimizer, loader = _plain_setup()
    saved = torch.load(tmp_path / "step4.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    store = pu.UpdateStore.open(tmp_path / "plain.zarr", secret=SECRET)
    assert store.steps == 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = pu.UpdateRecorder(model, optimizer, store, state=saved["recorder"])
    messages = [str(w.message) for w in caught]
    assert any("dropped the store's 2 later steps" in m for m in messages), messages
    assert any("no longer runs" in m for m in messages), messages  # the killed writer's lock, taken over
    _plain_loop(model, optimizer, rec, loader, 4)  # a fresh epoch of 4 batches
    rec.close()
    assert store.steps == 8

    # Each spelling finds what the recorded key did.
    uuid_key, nfc_key, nfd_key = KEYS[2], KEYS[5], KEYS[7]
    assert unicodedata.is_normalized("NFC", nfc_key) and not unicodedata.is_normalized("NFC", nfd_key)
    spelled = ["{" + str(uuid_key).upper() + "}", "urn:uuid:" + str(KEYS[4]).upper(),
               unicodedata.normalize("NFD", nfc_key), unicodedata.normalize("NFC", nfd_key)]
    recorded = [uuid_key, KEYS[4], nfc_key, nfd_key]
    for given, key in zip(spelled, recorded):
        assert given != str(key)
        assert store.steps_for([given]).steps.tolist() == store.steps_for([key]).steps.tolist() != []
    expected_steps = sorted(set(store.steps_for(recorded).steps.tolist()))

    # One request: the four spellings, one of them twice (one key), and a key never seen.
    given = spelled + [str(uuid_key), "never-seen@example.com"]
    report = pu.amnesiac_forget(model, store, given, request_id="SPELLINGS-1")
    assert report.status == "applied" and report.matched == 4 and len(report.missing_ids) == 1
    assert report.subtracted.tolist() == expected_steps
    (request,) = store.ledger.audit()
    assert request["request"] == "SPELLINGS-1" and request["keys"] == 5 and request["missing"] == 1
    assert request["steps"] == expected_steps

    # Training goes on from the forgotten model; a batch holding a forgotten key, as recorded,
    # through a Subset (rec.loader's key gets the underlying index), is refused.
    _, x, y = tiny_data(N)
    subset = torch.utils.data.Subset(torch.utils.data.TensorDataset(x, y), [1, 3, 5, 9])
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        with pytest.raises(pu.RecorderError, match="deletion was requested"):
            _plain_loop(model, optimizer, rec, torch.utils.data.DataLoader(subset, batch_size=4), 1)
    assert store.steps == 8
    store.close()


# ----------------------------------------------------------------- 4. a request that matches nothing
def _recorded_keyed_checkpoint(folder: Path):
    """A store of keys recorded through rec.loader (8 steps), and the final checkpoint as a plain
    dict with the recorder state, as the guide's resume example saves it."""
    model, optimizer, loader = _plain_setup()
    store = pu.UpdateStore.create(folder / "s.zarr", model, keep=0.5, secret=SECRET)
    rec = pu.UpdateRecorder(model, optimizer, store)
    _plain_loop(model, optimizer, rec, loader, 8)
    state = rec.state_dict()
    rec.close()
    store.close()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "recorder": state},
               folder / "final.pt")


def test_cli_request_matching_nothing_exits_3_changes_nothing_and_records_not_found(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYUNLEARN_SECRET", SECRET)
    _recorded_keyed_checkpoint(tmp_path)
    path = tmp_path / "s.zarr"

    # A first request, applied: the store then holds a deletion, and final.pt predates it.
    (tmp_path / "first.txt").write_text(KEYS[5] + "\n", encoding="utf-8")
    code, out, err = _cli(capsys, "forget", "--store", path, "--checkpoint", tmp_path / "final.pt", "--keys",
                          tmp_path / "first.txt", "--request-id", "R-1", "--out", tmp_path / "after-r1.pt")
    assert code == 0, err

    (tmp_path / "nobody.txt").write_text("nobody@example.com\n" + str(uuid.UUID(int=7)).upper() + "\n",
                                         encoding="utf-8")
    for checkpoint in ("after-r1.pt", "final.pt"):  # the latest model, and one from before R-1
        before = _snapshot(path)
        code, out, err = _cli(capsys, "forget", "--store", path, "--checkpoint", tmp_path / checkpoint, "--keys",
                              tmp_path / "nobody.txt", "--request-id", "R-NONE", "--out", tmp_path / "none.pt")
        assert code == 3, (checkpoint, out, err)
        assert "not found" in err
        assert not (tmp_path / "none.pt").exists()
        assert _snapshot(path) == before, checkpoint  # not a byte changed

    # Recorded as not-found: from the model before R-1, which the output brings up to date.
    code, out, err = _cli(capsys, "forget", "--store", path, "--checkpoint", tmp_path / "final.pt", "--keys",
                          tmp_path / "nobody.txt", "--request-id", "R-NONE", "--record-not-found",
                          "--out", tmp_path / "none.pt")
    assert code == 0, err
    assert "request R-NONE not-found" in out and "0 of 2 keys found" in out
    store = pu.UpdateStore.open(path, mode="r", secret=SECRET)
    requests = {r["request"]: r for r in store.ledger.audit()}
    assert requests["R-1"]["status"] == "applied"
    assert requests["R-NONE"]["status"] == "not-found"
    assert requests["R-NONE"]["keys"] == 2 and requests["R-NONE"]["missing"] == 2
    assert requests["R-NONE"]["steps"] == []
    # The output is the model R-1 made (it was brought up to date, nothing else removed).
    r1 = torch.load(tmp_path / "after-r1.pt", weights_only=True)
    none = torch.load(tmp_path / "none.pt", weights_only=True)
    for name, value in r1["model"].items():
        torch.testing.assert_close(none["model"][name], value)
    assert none["recorder"]["fingerprint"] == r1["recorder"]["fingerprint"]
    store.close()
    code, out, err = _cli(capsys, "audit", "verify", path)
    assert code == 0, out + err

    # Training resumes from the not-found request's output.
    model, optimizer, loader = _plain_setup()
    model.load_state_dict(none["model"])
    optimizer.load_state_dict(none["optimizer"])
    store = pu.UpdateStore.open(path, secret=SECRET)
    kept = torch.utils.data.Subset(loader.dataset, [i for i in range(N) if i != 5])
    with pu.UpdateRecorder(model, optimizer, store, state=none["recorder"]) as rec:
        _plain_loop(model, optimizer, rec, torch.utils.data.DataLoader(kept, batch_size=16), 2)
    assert store.steps == 10
    store.close()


# ----------------------------------------------------------------- 5. IdDataset's UUID keys, collated
def test_id_dataset_with_uuid_keys_through_the_default_collate(tmp_path):
    """Found by this file: IdDataset returned UUID objects, which the default collate refuses."""
    from pyunlearn.data import IdDataset

    _, x, y = tiny_data(N)
    data = IdDataset(torch.utils.data.TensorDataset(x, y), key=lambda index: KEYS[2 * (index // 2)])  # UUIDs
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    store = pu.UpdateStore.create(tmp_path / "uuid.zarr", model, keep=0.5, secret=SECRET)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for keys, xb, yb in torch.utils.data.DataLoader(data, batch_size=16):
            rec.batch(keys)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    assert store.steps_for([str(KEYS[2]).upper()]).steps.tolist() == [0]
    store.close()


# ----------------------------------------------------------------- 5. keys + guarded CLI + dampening + resume
def test_keys_guarded_cli_with_forget_data_dampens_records_and_training_resumes(tmp_path, capsys, monkeypatch):
    """A store of keys, forgotten from by the guarded command line with --forget-data (the
    dampening at its end), verified by `audit verify`; training resumes from the output and
    refuses the forgotten key."""
    monkeypatch.setenv("PYUNLEARN_SECRET", SECRET)
    _recorded_keyed_checkpoint(tmp_path)
    path = tmp_path / "s.zarr"
    _, x, y = tiny_data(N)
    gone = [3, 17, 40]
    kept = [i for i in range(N) if i not in gone]
    as_file = lambda name, rows: torch.save(  # noqa: E731 - samples as the CLI reads them (IDs are positions here)
        {"ids": torch.tensor(rows), "x": x[rows], "y": y[rows]}, tmp_path / f"{name}.pt")
    as_file("probe", kept), as_file("retain", kept), as_file("forget", gone)
    (tmp_path / "keys.txt").write_text("".join(f"{KEYS[i]}\n" for i in gone), encoding="utf-8")
    code, out, err = _cli(capsys, "forget", "--store", path, "--checkpoint", tmp_path / "final.pt", "--keys",
                          tmp_path / "keys.txt", "--request-id", "R-D", "--out", tmp_path / "after.pt",
                          "--probe", tmp_path / "probe.pt", "--model", "tests.support:TinyNet",
                          "--retain", tmp_path / "retain.pt", "--forget-data", tmp_path / "forget.pt",
                          "--budget", "1")
    assert code == 0, err
    assert "request R-D applied" in out and "dampened 0 of 195 parameters" in out  # the frozen one not counted
    store = pu.UpdateStore.open(path, mode="r", secret=SECRET)
    (record,) = [r for r in store.ledger.audit() if r["request"] == "R-D"]
    assert record["method"] == "amnesiac+guard" and record["keys"] == 3
    # nothing only the 3 keys rely on
    assert record["params"]["dampening"].startswith("after the subtraction, dampened 0 of 195")
    assert record["params"]["dampening"] in record["guard"]["actions"]
    store.close()
    assert _cli(capsys, "audit", "verify", path)[0] == 0

    saved = torch.load(tmp_path / "after.pt", weights_only=True)
    model, optimizer, loader = _plain_setup()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    store = pu.UpdateStore.open(path, secret=SECRET)
    rec = pu.UpdateRecorder(model, optimizer, store, state=saved["recorder"])
    with pytest.raises(pu.RecorderError, match="deletion was requested"):
        rec.batch([KEYS[1], KEYS[gone[0]]])
    rec.batch([KEYS[1], KEYS[2]])  # training goes on from the deletion's model
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x[[1, 2]]), y[[1, 2]]).backward()
    optimizer.step()
    rec.close()
    store.close()
