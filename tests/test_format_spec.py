"""docs/format.md as a contract: its test vectors, recomputed from the page's rules with standard
libraries only (hashlib, hmac, json, numpy, xxhash) and with pyunlearn's own code; and a store
pyunlearn writes, checked by a reader written from the page alone."""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import unicodedata
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
import zarr

import pyunlearn as pu
from pyunlearn import keys
from pyunlearn.kernels import fingerprint
from pyunlearn.store import audit_log, deletion_data, digests

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"pyunlearn-test-secret-0123456789"
STORE_ID = bytes.fromhex("00112233445566778899aabbccddeeff")


def _vectors() -> dict[str, list[str]]:
    """The page's test-vector table: what → the backquoted texts of its input column, then of its
    value column (rows sharing a `what` are numbered: "key → ID 2")."""
    text = (ROOT / "docs" / "format.md").read_text()
    table = text[text.index("## Test vectors"):text.index("## The writer lock")]
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("what", "---"):
            continue
        name, n = cells[0], 2
        while name in out:
            name, n = f"{cells[0]} {n}", n + 1
        out[name] = re.findall(r"`([^`]*)`", cells[1]) + re.findall(r"`([^`]*)`", cells[2])
    return out


VECTORS = _vectors()


# ---------------------------------------------------------------------------------- a spec reader
def spec_id(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, key=SECRET, digest_size=8).digest(), "little") & 0x7FFFFFFFFFFFFFFF


def spec_canonical_key(key: str) -> bytes:
    m = re.fullmatch(r"(?:urn:uuid:)?(\{)?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
                     r"(?(1)\})", key, re.IGNORECASE)
    return m.group(2).lower().encode() if m else unicodedata.normalize("NFC", key).encode()


def spec_canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def spec_audit_key() -> bytes:
    return hashlib.blake2b(b"pyunlearn audit key", key=SECRET, digest_size=32).digest()


def spec_forgotten(ids) -> tuple[str, str]:
    ids = np.asarray(ids, "<i8")
    whole, chain = len(ids) // 8192 * 8192, b""
    for block in ids[:whole].reshape(-1, 8192):
        chain = hashlib.sha256(chain + block.tobytes()).digest()
    return chain.hex(), "sha256:" + hashlib.sha256(chain + ids[whole:].tobytes()).hexdigest()


def spec_xxh(*parts: bytes) -> str:
    h = xxhash.xxh3_128()
    for part in parts:
        h.update(part)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- the vectors
def test_every_vector_of_the_page_is_checked_here():
    assert len(VECTORS) == 17, sorted(VECTORS)


def test_fingerprint():
    layers = [np.array([1.0, -2.0, 0.5], "<f4"), np.array([3.0], "<f4")]
    expected = VECTORS["fingerprint"][-1]
    assert "xxh3:" + spec_xxh(*(a.tobytes() for a in layers)) == expected
    assert fingerprint([torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0])]) == expected
    assert fingerprint([torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16), torch.tensor([3.0])]) == expected


@pytest.mark.parametrize("row", ["key → ID", "key → ID 2", "key → ID 3"])
def test_keys_become_ids(row):
    *spellings, expected = VECTORS[row]
    if row == "key → ID 3":  # the page names the two spellings in words
        spellings = ["e\u0301", "\u00e9"]
    hasher = keys.KeyHasher(SECRET)
    for spelling in spellings:
        assert spec_id(spec_canonical_key(spelling)) == int(expected), spelling
        assert int(hasher.ids([spelling])[0]) == int(expected), spelling
    if row == "key → ID 2":
        assert int(hasher.ids([uuid.UUID(spellings[1].strip("{}"))])[0]) == int(expected)


def test_format_4_stores_keep_mapping_a_keys_bytes_as_given():
    hasher = keys.KeyHasher(SECRET, mapping=1)
    assert int(hasher.ids(["e\u0301"])[0]) == spec_id("e\u0301".encode()) != int(VECTORS["key → ID 3"][-1])


def test_check_values_and_digests():
    hasher = keys.KeyHasher(SECRET)
    (check,) = VECTORS["key_check"][-1:]
    assert "blake2b:" + hashlib.blake2b(b"pyunlearn secret check", key=SECRET, digest_size=16).hexdigest() == check
    assert hasher.check == check
    ids = np.array(sorted({int(VECTORS["key → ID"][-1]), int(VECTORS["key → ID 2"][-1])}), "<i8")
    expected = VECTORS["keys_digest"][-1]
    assert "blake2b-keyed:" + hashlib.blake2b(ids.tobytes(), key=SECRET, digest_size=32).hexdigest() == expected
    assert hasher.digest(ids) == expected
    assert keys.ids_digest(np.array([5, 3])) == VECTORS["keys_digest (integer IDs)"][-1] == \
        "sha256:" + hashlib.sha256(np.array([3, 5], "<i8").tobytes()).hexdigest()
    audit_check = VECTORS["audit_key_check"][-1]
    assert "blake2b:" + hashlib.blake2b(b"pyunlearn audit key check", key=spec_audit_key(),
                                        digest_size=16).hexdigest() == audit_check
    assert hasher.audit_key().check == audit_check


def test_canonical_json_and_records():
    value, expected = VECTORS["canonical JSON"]
    assert spec_canonical(json.loads(value)).decode() == expected
    body, digest = VECTORS["record hash"]
    assert "sha256:" + hashlib.sha256(body.encode()).hexdigest() == digest == audit_log.sha256(body.encode())
    assert spec_canonical(json.loads(body)) == body.encode() == audit_log.canonical(json.loads(body))
    (mac,) = VECTORS["record MAC"][-1:]
    assert "hmac-sha256:" + hmac.new(spec_audit_key(), body.encode(), hashlib.sha256).hexdigest() == mac
    assert keys.KeyHasher(SECRET).audit_key().mac(body.encode()) == mac
    with pytest.raises(TypeError, match="no floats"):
        audit_log.canonical({"keep": 0.01})


def test_forgotten_and_removed_digests():
    _, chain, digest = VECTORS["forgotten digest"]
    chain = chain.strip('"')  # the page writes the empty chain as ""
    assert spec_forgotten([5, 3, 9]) == (chain, digest)
    assert deletion_data.forgotten_of(np.array([5, 3, 9])) == pu.ledger.Forgotten(3, chain, digest)
    chain, digest = VECTORS["forgotten digest 2"][-2:]
    assert spec_forgotten(np.arange(8193)) == (chain, digest)
    assert deletion_data.forgotten_of(np.arange(8193)) == pu.ledger.Forgotten(8193, chain, digest)
    # appended request by request, the same digest
    step = deletion_data.forgotten_of(np.arange(8000))
    step = deletion_data.forgotten_after_append(step, np.arange(8000), np.arange(8000, 8193))
    assert (step.chain, step.digest) == (chain, digest)
    _, packed, digest = VECTORS["removed digest"]
    bits = np.zeros(10, dtype=bool)
    bits[[1, 3, 9]] = True
    assert np.packbits(bits).tobytes().hex() == packed.replace(" ", "")
    assert "sha256:" + hashlib.sha256(bytes.fromhex(packed.replace(" ", ""))).hexdigest() == digest
    assert deletion_data.removed_digest(bits) == (3, digest)


def test_place_bound_digests():
    index, values, scales = np.array([1, 2], "<u4"), np.array([0.5, -1.0], "<f2"), np.array([2.0], "<f4")
    row = spec_xxh(b"pyunlearn step row\x00", STORE_ID, (7).to_bytes(8, "little"), index.tobytes(), values.tobytes(),
                   scales.tobytes())
    assert row == VECTORS["row digest"][-1] == digests.row_digest(STORE_ID, 7, index, values, scales).hex()
    ids = np.array([4, 8], "<i8")
    got = spec_xxh(b"pyunlearn step ids\x00", STORE_ID, (7).to_bytes(8, "little"), ids.tobytes())
    assert got == VECTORS["IDs digest"][-1] == digests.ids_digest(STORE_ID, 7, ids).hex()
    pairs = np.array([[4, 7], [8, 7]], "<i8")
    got = spec_xxh(b"pyunlearn id index\x00", STORE_ID, b"r0-100\x00", (0).to_bytes(8, "little"), pairs.tobytes())
    assert got == VECTORS["run chunk digest"][-1] == digests.run_chunk_digest(STORE_ID, "r0-100", 0, pairs)


# ---------------------------------------------------------------------------------- a whole store
def test_a_reader_from_the_page_checks_a_store_pyunlearn_wrote(tmp_path):
    """Everything the page promises of a store, checked with zarr, json, hashlib, hmac and xxhash:
    the checksum, the log's chain and MACs, each state's digests, each step's digests."""
    from tests.support import TinyNet, tiny_data

    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.25, secret=SECRET, steps_per_chunk=4)
    ids, x, y = tiny_data(48)
    people = [f"person{i}@example.com" for i in range(48)]
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for batch in torch.arange(48).split(8):
            rec.batch([people[i] for i in batch.tolist()])
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    pu.amnesiac_forget(model, store, [people[3], people[30]], request_id="GDPR-1")
    report = pu.amnesiac_forget(model, store, [people[5]], request_id="GDPR-2")
    store.close()

    root = tmp_path / "s.zarr"
    attrs = dict(zarr.open_group(str(root), mode="r").attrs)
    assert attrs["format_version"] == 5
    assert attrs["checksum"] == "sha256:" + hashlib.sha256(
        spec_canonical({k: v for k, v in attrs.items() if k != "checksum"})).hexdigest()
    # the log: probe from timeline.log, chain, MACs, states
    n = attrs["timeline"]["log"]
    while (root / "log" / f"{n:010d}.json").exists():
        n += 1
    previous, records = "", []
    for i in range(n):
        body, proof, end = (root / "log" / f"{i:010d}.json").read_bytes().split(b"\n")
        proof = json.loads(proof)
        assert end == b"" and proof["hash"] == "sha256:" + hashlib.sha256(body).hexdigest()
        assert proof["mac"] == "hmac-sha256:" + hmac.new(spec_audit_key(), body, hashlib.sha256).hexdigest()
        record = json.loads(body)
        assert record["previous"] == previous and record["index"] == i and spec_canonical(record) == body
        previous = proof["hash"]
        records.append(record)
    assert f"{n}:{previous}" == report.head
    assert [r["kind"] for r in records] == ["segment", "deletion", "deletion"]
    # the IDs each request wrote, the forgotten digest, the removed steps' digest
    state = records[-1]["state"]
    forgotten = zarr.open_array(str(root / "forgotten"), mode="r")[: state["forgotten"]["end"]]
    for record in records[1:]:
        written = forgotten[record["ids_from"]:record["ids_from"] + record["keys"]].astype("<i8")
        assert record["ids_digest"] == "sha256:" + hashlib.sha256(written.tobytes()).hexdigest()
        expected_ids = sorted(spec_id(spec_canonical_key(k)) for k in
                              ([people[3], people[30]] if record["request"] == "GDPR-1" else [people[5]]))
        assert written.tolist() == expected_ids
    assert spec_forgotten(forgotten) == (state["forgotten"]["chain"], state["forgotten"]["digest"])
    removed = sorted(s for r in records[1:] for s in r["steps"])
    bits = np.zeros(removed[-1] + 1, dtype=bool)
    bits[removed] = True
    assert state["removed_digest"] == "sha256:" + hashlib.sha256(np.packbits(bits).tobytes()).hexdigest()
    # every step's digests
    group = zarr.open_group(str(root), mode="r")
    steps, store_id = attrs["committed_steps"], bytes.fromhex(attrs["store_id"])
    stored = group["step_digests"][:steps]
    offsets, sample_ids = group["offsets"][: steps + 1], group["sample_ids"][: attrs["committed_samples"]]
    rows = {name: group[name][:steps] for name in ("index", "values", "scales", "step_hyper")}
    for s in range(steps):
        row = spec_xxh(b"pyunlearn step row\x00", store_id, s.to_bytes(8, "little"),
                       *(rows[name][s].astype(rows[name].dtype.newbyteorder("<")).tobytes()
                         for name in ("index", "values", "scales", "step_hyper")))
        step_ids = sample_ids[offsets[s]:offsets[s + 1]].astype("<i8")
        assert step_ids.tolist() == sorted(spec_id(spec_canonical_key(people[i])) for i in range(8 * s, 8 * s + 8))
        got = spec_xxh(b"pyunlearn step ids\x00", store_id, s.to_bytes(8, "little"), step_ids.tobytes())
        assert stored[s].tobytes().hex() == row + got, s
