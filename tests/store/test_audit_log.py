"""The audit log as an auditor and a hostile store writer meet it (issue 24, cases 8 and 9):
records outside zarr.json, hash-chained and MAC'ed with a key the store does not hold, a head
kept outside the store that detects a rollback, and a cost per request that does not grow."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.cli import main
from pyunlearn.store.verify import verify
from tests.support import TinyNet, tiny_data, tiny_training

SECRET = "audit-log-tests-secret-0123456789"


def _keyed_store(path, samples: int = 64):
    """A store of keys (so its log is authenticated), trained one epoch; (model, store, keys)."""
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(path, model, keep=0.25, secret=SECRET, steps_per_chunk=4)
    _, x, y = tiny_data(samples)
    people = [f"person{i}@example.com" for i in range(samples)]
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for batch in torch.arange(samples).split(8):
            rec.batch([people[i] for i in batch.tolist()])
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model, store, people


def _record_path(store_path, index: int):
    return store_path / "log" / f"{index:010d}.json"


def _failed(findings) -> dict[str, str]:
    return {f.check: f.detail for f in findings if not f.ok}


def test_records_live_outside_zarr_json_and_verify_with_the_key(tmp_path):
    model, store, people = _keyed_store(tmp_path / "s.zarr")
    report = pu.amnesiac_forget(model, store, [people[3]], request_id="GDPR-1")
    store.close()
    attrs = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    assert "ledger" not in attrs and "GDPR-1" not in json.dumps(attrs)
    assert attrs["timeline"]["log"] == 2 and report.head.startswith("2:sha256:")
    findings = verify(pu.UpdateStore.open(tmp_path / "s.zarr", mode="r", secret=SECRET), head=report.head)
    assert not _failed(findings), findings
    assert "MACs checked with the audit key" in findings[0].detail


def test_an_edited_record_is_detected_even_when_its_hash_is_redone(tmp_path):
    """The store writer rewrites a deletion's request id and recomputes the body's SHA-256 and
    the next record's link: only the MAC, which needs the key, gives it away."""
    model, store, people = _keyed_store(tmp_path / "s.zarr")
    pu.amnesiac_forget(model, store, [people[3]], request_id="GDPR-1")
    store.close()
    path = _record_path(tmp_path / "s.zarr", 1)
    body, proof, _ = path.read_bytes().split(b"\n")
    forged = body.replace(b"GDPR-1", b"GDPR-X")
    import hashlib

    proof = json.loads(proof)
    proof["hash"] = "sha256:" + hashlib.sha256(forged).hexdigest()
    path.write_bytes(forged + b"\n" + json.dumps(proof).encode() + b"\n")
    failed = _failed(verify(pu.UpdateStore.open(tmp_path / "s.zarr", mode="r", secret=SECRET)))
    assert "MAC" in failed["log"], failed
    with pytest.raises(pu.CorruptStoreError, match="fails its MAC"):  # the library reads it the same way
        pu.UpdateStore.open(tmp_path / "s.zarr", mode="r", secret=SECRET).ledger.audit()


def test_a_deleted_record_and_a_rolled_back_log_are_detected(tmp_path):
    model, store, people = _keyed_store(tmp_path / "s.zarr")
    for i in range(3):
        report = pu.amnesiac_forget(model, store, [people[i]], request_id=f"R{i}")
    head = report.head  # kept outside the store by the service
    store.close()
    root = tmp_path / "s.zarr"
    backup = tmp_path / "backup"
    shutil.copytree(root, backup)

    _record_path(root, 2).unlink()  # a record from the middle of the chain
    failed = _failed(verify(pu.UpdateStore.open(root, mode="r", secret=SECRET), head=head))
    assert "log" in failed and ("missing" in failed["log"] or "does not follow" in failed["log"]), failed

    shutil.rmtree(root)
    shutil.copytree(backup, root)
    _record_path(root, 3).unlink()  # the last record: a rollback, invisible inside the log
    zarr_json = json.loads((root / "zarr.json").read_text())
    attrs = zarr_json["attributes"]
    attrs["timeline"]["log"] = 3  # the writer covers its tracks in the metadata too
    from pyunlearn.store.metadata import attrs_checksum

    attrs["checksum"] = attrs_checksum({k: v for k, v in attrs.items() if k != "checksum"})
    (root / "zarr.json").write_text(json.dumps(zarr_json))
    reader = pu.UpdateStore.open(root, mode="r", secret=SECRET)
    assert not _failed(verify(reader)), "without a head kept outside, a cut-off tail looks like a shorter log"
    failed = _failed(verify(reader, head=head))
    assert "rolled back" in failed["head"], failed


def test_a_rewritten_log_fails_a_kept_head_even_without_macs(tmp_path):
    """A store of integer IDs without an audit key has a hash chain only; a head kept outside
    still pins every record before it."""
    recorded = _int_store(tmp_path / "s.zarr")
    report = pu.amnesiac_forget(recorded.model, recorded.store, [1003], request_id="A")
    recorded.store.close()
    path = _record_path(tmp_path / "s.zarr", 1)
    body, proof, _ = path.read_bytes().split(b"\n")
    import hashlib

    forged = body.replace(b'"request":"A"', b'"request":"B"')
    path.write_bytes(forged + b"\n" + json.dumps({"hash": "sha256:" + hashlib.sha256(forged).hexdigest(),
                                                  "mac": None}).encode() + b"\n")
    reader = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    assert _failed(verify(reader, head=report.head))["head"].startswith("record 1 is not the one")


def _int_store(path):
    from tests.support import recorded_store

    return recorded_store(path, keep=0.25, steps_per_chunk=4)


def test_restoring_an_older_zarr_json_drops_no_deletion(tmp_path):
    """Error messages say "restore zarr.json from a copy": a copy older than the last deletion
    must not bring the deleted samples back (the log is not in zarr.json, and its length is
    probed, not read from it)."""
    recorded = _int_store(tmp_path / "s.zarr")
    store, model = recorded.store, recorded.model
    old = (tmp_path / "s.zarr" / "zarr.json").read_bytes()
    report = pu.amnesiac_forget(model, store, [1003])
    store.close()
    (tmp_path / "s.zarr" / "zarr.json").write_bytes(old)
    reopened = pu.UpdateStore.open(tmp_path / "s.zarr")
    assert [r["status"] for r in reopened.ledger.audit()] == ["applied"]
    assert 1003 in reopened.forgotten_ids()
    again = pu.amnesiac_forget(model, reopened, [1003, 1004])  # the same request's steps are not subtracted twice
    assert again.steps_applied == reopened.steps_for([1004]).steps.size - np.intersect1d(
        reopened.steps_for([1004]).steps, report.subtracted).size
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pu.UpdateRecorder(model, optimizer, reopened) as rec, pytest.raises(pu.RecorderError, match="deletion was "
                                                                                                   "requested"):
        rec.batch([1003])


def test_a_forget_reads_only_the_records_after_its_model(tmp_path):
    """The cost of a request does not grow with the log: with the oldest records gone, a
    forget from the newest model still works (it never reads them), while an audit fails."""
    recorded = _int_store(tmp_path / "s.zarr", )
    store, model = recorded.store, recorded.model
    for i in range(30):
        pu.amnesiac_forget(model, store, [1000 + i], not_found="record")
    store.close()
    size = (tmp_path / "s.zarr" / "zarr.json").stat().st_size
    for i in range(20):
        _record_path(tmp_path / "s.zarr", i).unlink()
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    report = pu.amnesiac_forget(model, store, [1040], not_found="record")
    assert report.record == 31 and report.status == "applied"  # record 0 is the training segment
    store.close()
    assert abs((tmp_path / "s.zarr" / "zarr.json").stat().st_size - size) <= 4  # only counters' digits change
    assert "missing" in _failed(verify(pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")))["log"]


def test_audit_verify_on_the_command_line(tmp_path, capsys):
    recorded = _int_store(tmp_path / "s.zarr")
    report = pu.amnesiac_forget(recorded.model, recorded.store, [1003])
    recorded.store.close()
    assert main(["audit", "verify", str(tmp_path / "s.zarr"), "--head", report.head]) == 0
    out = capsys.readouterr().out
    assert "sound" in out and "ok      head" in out
    other = report.head[:-1] + ("1" if report.head.endswith("0") else "0")  # another head (1 in 16 heads end in 0)
    assert main(["audit", "verify", str(tmp_path / "s.zarr"), "--head", other]) == 4
    assert "FAILED  head" in capsys.readouterr().out


AUDIT_KEY = "an-audit-key-held-by-the-service-01"


def _recorded_with_audit_key(path):
    """The model of a closed store of integer IDs created with AUDIT_KEY (its log MAC'ed)."""
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    store = pu.UpdateStore.create(path, model, keep=0.5, audit_key=AUDIT_KEY)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        tiny_training(model, optimizer, tiny_data(32), epochs=1, recorder=rec)
    store.close()
    return model


def test_an_auditor_without_the_key_does_not_get_a_pass(tmp_path, monkeypatch, capsys):
    """An authenticated log whose MACs cannot be checked fails `audit verify` (exit 4): the chain
    alone is what anyone who can write the store can rebuild. --chain-only accepts it, saying so."""
    monkeypatch.delenv("PYUNLEARN_AUDIT_KEY", raising=False)
    _recorded_with_audit_key(tmp_path / "s.zarr")
    assert main(["audit", "verify", str(tmp_path / "s.zarr")]) == 4
    assert "MACs were not checked" in capsys.readouterr().out
    assert main(["audit", "verify", str(tmp_path / "s.zarr"), "--chain-only"]) == 0
    assert "NOT checked (--chain-only)" in capsys.readouterr().out
    (tmp_path / "key").write_text(AUDIT_KEY)
    assert main(["audit", "verify", str(tmp_path / "s.zarr"), "--audit-key-file", str(tmp_path / "key")]) == 0
    assert "MACs checked with the audit key" in capsys.readouterr().out


def test_a_store_with_an_audit_key_refuses_a_writer_without_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PYUNLEARN_AUDIT_KEY", raising=False)
    model = _recorded_with_audit_key(tmp_path / "s.zarr")
    before = {p.name for p in (tmp_path / "s.zarr" / "log").iterdir()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pu.KeyMappingError, match="audit key"):
        pu.amnesiac_forget(model, pu.UpdateStore.open(tmp_path / "s.zarr"), [1003])
    assert {p.name for p in (tmp_path / "s.zarr" / "log").iterdir()} == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(pu.KeyMappingError, match="not the one"):
        pu.UpdateStore.open(tmp_path / "s.zarr", audit_key="another-key-of-thirty-two-bytes--")
    report = pu.amnesiac_forget(model, pu.UpdateStore.open(tmp_path / "s.zarr", audit_key=AUDIT_KEY), [1003])
    findings = verify(pu.UpdateStore.open(tmp_path / "s.zarr", mode="r", audit_key=AUDIT_KEY), head=report.head)
    assert not _failed(findings) and "MACs checked" in findings[0].detail
