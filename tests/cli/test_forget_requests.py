"""`pyunlearn forget` as an operator uses it (issue 24, case 1 and 10): key files in one
documented format (a key per line, UTF-8, a BOM dropped; or a JSON list), anything else refused
with its line number; a request nothing of which was recorded is exit 3 and changes nothing
unless --record-not-found; --ids on a store of keys, an empty file and a used request id are
refused; the audit head is printed; errors name the file and what to do."""
from __future__ import annotations

import errno
import json

import pytest
import torch

import pyunlearn as pu
from pyunlearn.cli import main
from tests.support import TinyNet, recorded_store, tiny_data

SECRET = "cli-forget-tests-secret-0123456789"
PEOPLE = [f"person{i}@example.com" for i in range(48)]


@pytest.fixture
def keyed(tmp_path, monkeypatch):
    """A store of keys, its checkpoint, and PYUNLEARN_SECRET set as an operator would."""
    monkeypatch.setenv("PYUNLEARN_SECRET", SECRET)
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.25, secret=SECRET)
    _, x, y = tiny_data(48)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for batch in torch.arange(48).split(8):
            rec.batch([PEOPLE[i] for i in batch.tolist()])
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    store.close()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    return tmp_path


def _forget(folder, *args):
    return main(["forget", "--store", str(folder / "s.zarr"), "--checkpoint", str(folder / "model.pt"),
                 "--out", str(folder / "out.pt"), *args])


def _records(folder) -> int:
    return len(pu.UpdateStore.open(folder / "s.zarr", mode="r", secret=SECRET).ledger)


@pytest.mark.parametrize("content", [
    "person3@example.com\nperson4@example.com\n",
    "\ufeffperson3@example.com\r\nperson4@example.com",  # a BOM and Windows line ends
    '["person3@example.com", "person4@example.com"]',
    "  person3@example.com  \n\n person4@example.com\n",
])
def test_key_files_in_the_documented_formats_find_their_keys(keyed, capsys, content):
    (keyed / "keys.txt").write_text(content, encoding="utf-8")
    assert _forget(keyed, "--keys", str(keyed / "keys.txt"), "--request-id", "GDPR-1") == 0
    out = capsys.readouterr().out
    assert "request GDPR-1 applied (2 of 2 keys found)" in out and "audit head 3:sha256:" in out
    (row,) = pu.UpdateStore.open(keyed / "s.zarr", mode="r", secret=SECRET).ledger.audit()
    assert (row["status"], row["keys"], row["missing"]) == ("applied", 2, 0)


@pytest.mark.parametrize("content, line, what", [
    ("person3@example.com, person4@example.com\n", 1, "holds ','"),
    ("person3@example.com\n\"person4@example.com\"\n", 2, "is quoted"),
    ("person3@example.com\tperson4@example.com\n", 1, "holds '\\t'"),
    ("person3@example.com\n{\"key\": 1}\n", 2, "starts with a bracket"),
])
def test_key_files_in_other_formats_are_refused_with_the_line(keyed, capsys, content, line, what):
    (keyed / "keys.txt").write_text(content)
    assert _forget(keyed, "--keys", str(keyed / "keys.txt")) == 1
    err = capsys.readouterr().err
    assert f"keys.txt, line {line}:" in err and what in err and "JSON list" in err
    assert _records(keyed) == 1 and not (keyed / "out.pt").exists()


def test_a_request_nothing_of_which_was_recorded_exits_3_and_changes_nothing(keyed, capsys):
    (keyed / "keys.txt").write_text("nobody@example.com\nPERSON3@EXAMPLE.COM\n")  # case is kept: not found
    assert _forget(keyed, "--keys", str(keyed / "keys.txt")) == 3
    assert "not found: none of the 2 keys" in capsys.readouterr().err
    assert _records(keyed) == 1 and not (keyed / "out.pt").exists()
    assert _forget(keyed, "--keys", str(keyed / "keys.txt"), "--record-not-found", "--request-id", "R-9") == 0
    assert "request R-9 not-found: recorded, nothing removed (0 of 2 keys found" in capsys.readouterr().out
    assert pu.UpdateStore.open(keyed / "s.zarr", mode="r", secret=SECRET).ledger.audit()[-1]["status"] == "not-found"


def test_ids_on_a_store_of_keys_and_an_empty_file_are_refused(keyed, capsys):
    store = pu.UpdateStore.open(keyed / "s.zarr", mode="r", secret=SECRET)
    (keyed / "ids.txt").write_text(f"{int(store.ids_for(['person3@example.com'])[0])}\n")  # even the key's own ID
    assert _forget(keyed, "--ids", str(keyed / "ids.txt")) == 1
    assert "maps keys to sample IDs with a secret" in capsys.readouterr().err
    (keyed / "empty.txt").write_text("\n")
    assert _forget(keyed, "--ids", str(keyed / "empty.txt")) == 1
    err = capsys.readouterr().err
    assert "holds no IDs" in err and "--catch-up" in err
    assert _forget(keyed, "--keys", str(keyed / "empty.txt")) == 1
    assert "holds no keys" in capsys.readouterr().err
    assert _records(keyed) == 1


def test_a_used_request_id_is_refused(keyed, capsys):
    (keyed / "keys.txt").write_text("person3@example.com\n")
    assert _forget(keyed, "--keys", str(keyed / "keys.txt"), "--request-id", "T-1") == 0
    (keyed / "more.txt").write_text("person5@example.com\n")
    main(["forget", "--store", str(keyed / "s.zarr"), "--checkpoint", str(keyed / "out.pt"),
          "--keys", str(keyed / "more.txt"), "--out", str(keyed / "out2.pt"), "--request-id", "T-1"])
    assert "'T-1' was already used by record 1" in capsys.readouterr().err
    assert not (keyed / "out2.pt").exists()


def test_catch_up_on_the_command_line_is_not_a_request(keyed, capsys):
    (keyed / "keys.txt").write_text("person3@example.com\n")
    assert _forget(keyed, "--keys", str(keyed / "keys.txt")) == 0
    capsys.readouterr()
    assert _forget(keyed, "--catch-up") == 0  # the input checkpoint predates the request
    assert capsys.readouterr().out.startswith("caught-up:")
    kinds = [r.kind for r in pu.UpdateStore.open(keyed / "s.zarr", mode="r", secret=SECRET).ledger.records]
    assert kinds == ["segment", "deletion", "confirm", "catch-up"]


def test_a_failed_save_names_the_file_and_undoes_the_pending_deletion(tmp_path, monkeypatch, capsys):
    """Disk full while writing --out: the message names the file and the cause, the pending
    deletion is undone, and the store is as it was for the next try."""
    recorded = recorded_store(tmp_path / "s.zarr", close=True)
    torch.save(recorded.model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "ids.txt").write_text("1003\n")
    from pyunlearn.integrations.checkpoints import Checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Checkpoint, "save", full)
    assert main(["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "model.pt"),
                 "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "out.pt")]) == 1
    assert "No space left on device" in capsys.readouterr().err
    store = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    assert [row["status"] for row in store.ledger.audit()] == ["undone"]
    assert store.forgotten_ids().size == 0


def test_the_ledger_table_lists_every_record_in_aligned_columns(keyed, capsys):
    (keyed / "keys.txt").write_text("person3@example.com\n")
    _forget(keyed, "--keys", str(keyed / "keys.txt"), "--request-id", "GDPR-1")
    capsys.readouterr()
    assert main(["inspect", str(keyed / "s.zarr"), "--ledger"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("") + 1:]
    assert [line.split()[0] for line in table] == ["#", "0", "1", "2"]  # every record, numbered in order
    starts = {line.index(line.split()[2]) for line in table[1:]}
    assert len(starts) == 1  # the kind column starts at one position on every line
    assert "request GDPR-1" in table[2] and "applied" in table[2]
    assert main(["inspect", str(keyed / "s.zarr"), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in exported["records"]] == ["segment", "deletion", "confirm"]
    assert exported["head"].startswith("3:sha256:")
