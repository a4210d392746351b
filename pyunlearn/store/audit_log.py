"""The audit log on disk: the timeline's records (pyunlearn.ledger), one object each, written
once and never changed, hash-chained and authenticated with a key the store does not hold.

    log/0000000000.json     record 0
    log/0000000001.json     record 1, ...

Each object is two lines. The first, the *body*, is the record as canonical JSON (keys sorted,
separators "," and ":", ASCII with \\uXXXX escapes, integers and strings only: no floats) of
{"index", "kind", "time", "previous", the kind's fields, "state"}, where "previous" is the hash
of the record before ("" for record 0). The second is its proof: {"hash": "sha256:" + the hex
SHA-256 of the body's bytes, "mac": "hmac-sha256:" + the hex HMAC-SHA256 of the body's bytes under
the store's audit key, or null where the store has none}. A verifier hashes the first line's
bytes as they are: it never re-encodes JSON.

Appending is the commit of every timeline change: the object is created only if absent (an
atomic exclusive create: a hard link locally, a conditional PUT on S3), then read back. The
log's length is found by probing from the length the store's metadata last saw, so restoring
an older zarr.json loses no record. A record is read at most once per handle and checked as it
is read: its body parses to a valid record, its hash is its body's, its MAC verifies where the
key is known, and it links to its neighbours read so far. Records are read newest first in
batches, so every record read is chained to the head.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from typing import Sequence

from ..errors import CorruptStoreError, KeyMappingError, StoreError
from ..ledger import Record, State
from . import zarr_io
from .location import create_if_absent

PREFIX = "log/"
_BATCH = 256  # records fetched in one concurrent round trip


def record_key(index: int) -> str:
    return f"{PREFIX}{index:010d}.json"


def canonical(document: dict) -> bytes:
    """The canonical JSON of a document (docs/format.md): the bytes a record's hash covers."""
    _refuse_floats(document)
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _refuse_floats(value) -> None:
    if isinstance(value, float):
        raise TypeError(f"a log record holds no floats (their JSON spelling is not canonical): {value!r}")
    if isinstance(value, dict):
        for v in value.values():
            _refuse_floats(v)
    elif isinstance(value, list):
        for v in value:
            _refuse_floats(v)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class AuditKey:
    """The key that authenticates a store's log records (HMAC-SHA256), derived from the store's
    key secret or from an audit key of its own (stores of integer IDs): BLAKE2b-256 of
    b"pyunlearn audit key" keyed with the secret's key bytes (pyunlearn.keys). The store keeps
    only `check`, so a wrong key is refused instead of writing records no one can verify."""

    def __init__(self, secret_key: bytes):
        self._key = hashlib.blake2b(b"pyunlearn audit key", key=bytes(secret_key), digest_size=32).digest()
        self.check = "blake2b:" + hashlib.blake2b(b"pyunlearn audit key check", key=self._key,
                                                 digest_size=16).hexdigest()

    def mac(self, body: bytes) -> str:
        return "hmac-sha256:" + hmac.new(self._key, body, hashlib.sha256).hexdigest()

    def verifies(self, body: bytes, mac: str | None) -> bool:
        return mac is not None and hmac.compare_digest(self.mac(body), mac)


class RecordLog(Sequence[Record]):
    """The records of one store's log, read lazily and checked as they are read (see the module
    docstring). `key`: the AuditKey, if known (records are then MAC-checked); `authenticated`:
    whether the store's log carries MACs (its metadata holds an audit key check)."""

    def __init__(self, zstore, where: str, *, length_hint: int = 0, key: AuditKey | None = None,
                 authenticated: bool = False):
        self._zstore, self._where, self._key, self._authenticated = zstore, where, key, authenticated
        self._records: dict[int, Record] = {}
        self._proofs: dict[int, tuple[str, str | None, str]] = {}  # index → (hash, mac, previous)
        self._length = self._probe(length_hint)

    # ------------------------------------------------------------------ the sequence
    def __len__(self) -> int:
        return self._length

    def __getitem__(self, item):
        if isinstance(item, slice):
            indices = range(*item.indices(self._length))
            self._fetch([i for i in indices if i not in self._records])
            return [self._records[i] for i in indices]
        index = item + self._length if item < 0 else item
        if not 0 <= index < self._length:
            raise IndexError(f"record {item} of {self._length}")
        if index not in self._records:
            self._fetch([index])
        return self._records[index]

    def hash_of(self, index: int) -> str:
        self[index]
        return self._proofs[index][0]

    @property
    def head(self) -> str:
        """"<records>:<hash of the last record>" ("0:" for an empty log): keep it outside the
        store; `pyunlearn audit verify --head` then detects a rolled-back or rewritten log."""
        return f"{self._length}:{self.hash_of(self._length - 1) if self._length else ''}"

    @property
    def checks_macs(self) -> bool:
        """Whether records are MAC-checked as they are read (the log is authenticated and the
        key is at hand)."""
        return self._key is not None and self._authenticated

    def proof(self, index: int) -> tuple[str, str | None]:
        self[index]
        return self._proofs[index][:2]

    # ------------------------------------------------------------------ appending
    def check_writable(self) -> None:
        """KeyMappingError if the store's log is authenticated and this handle lacks the key:
        asked before a change starts, so that nothing is changed."""
        if self._authenticated and self._key is None:
            raise KeyMappingError(f"{self._where}'s audit log is authenticated with a key this handle does not hold: "
                                  "open the store with its secret (secret=, PYUNLEARN_SECRET) or its audit key "
                                  "(audit_key=, PYUNLEARN_AUDIT_KEY); nothing was changed")

    def append(self, kind: str, fields: dict, time: str | None, state: State) -> Record:
        """Writes the next record (the caller holds the writer lock and computed `state`);
        StoreError if the object is there already (another writer), KeyMappingError if the
        store's log is authenticated and no key was given."""
        self.check_writable()
        index = self._length
        previous = self.hash_of(index - 1) if index else ""
        document = {"index": index, "kind": kind, "time": time, "previous": previous, **fields,
                    "state": state.to_json()}
        body = canonical(document)
        record = Record.parse({k: v for k, v in document.items() if k != "previous"}, index)
        digest = sha256(body)
        mac = self._key.mac(body) if self._key is not None else None
        data = body + b"\n" + canonical({"hash": digest, "mac": mac}) + b"\n"
        key = record_key(index)
        zarr_io.run(create_if_absent(self._zstore, key, data))
        if zarr_io.get(self._zstore, key) != data:
            raise StoreError(f"{self._where}: log record {index} was written by another writer at the same time "
                             f"({key}); nothing of this change was committed. Check that one writer at a time holds "
                             "the store's lock")
        self._records[index], self._proofs[index] = record, (digest, mac, previous)
        self._length = index + 1
        return record

    # ------------------------------------------------------------------ reading
    def _probe(self, hint: int) -> int:
        """The log's length: the first index from `hint` on with no record (exponential, then
        binary search); CorruptStoreError if record hint − 1 is gone (the log was cut back)."""
        exists = lambda i: zarr_io.exists(self._zstore, record_key(i))  # noqa: E731
        if hint and not exists(hint - 1):
            raise CorruptStoreError(
                f"{self._where}: audit log record {hint - 1} ({record_key(hint - 1)}) is missing, though the store's "
                "metadata counted it: records were deleted from the log. Restore the log/ folder from a copy; "
                "`pyunlearn audit verify` with the head you kept says which records are gone")
        if not exists(hint):
            return hint
        low, step = hint + 1, 1
        while exists(hint + step):
            low, step = hint + step + 1, step * 2
        high = hint + step  # absent
        while low < high:  # the first absent index in [low, high]
            mid = (low + high) // 2
            if exists(mid):
                low = mid + 1
            else:
                high = mid
        return low

    def _fetch(self, indices: list[int]) -> None:
        if not indices:
            return
        for start in range(0, len(indices), _BATCH):
            batch = indices[start:start + _BATCH]
            for index, data in zip(batch, zarr_io.get_many(self._zstore, [(record_key(i), None) for i in batch])):
                if data is None:
                    raise CorruptStoreError(
                        f"{self._where}: audit log record {index} ({record_key(index)}) is missing, though later "
                        "records exist: the log was edited. Restore the log/ folder from a copy")
                self._parse(index, data)
        for index in sorted(indices):  # each link to the records on either side read so far
            for earlier, later in ((index - 1, index), (index, index + 1)):
                if earlier in self._proofs and later in self._proofs and \
                        self._proofs[later][2] != self._proofs[earlier][0]:
                    raise CorruptStoreError(
                        f"{self._where}: audit log record {later} does not follow record {earlier} (its 'previous' is "
                        "not that record's hash): a record was replaced, removed or reordered")

    def _parse(self, index: int, data: bytes) -> None:
        lines = data.split(b"\n")
        where = f"{self._where}: audit log record {index} ({record_key(index)})"
        try:
            if len(lines) != 3 or lines[2] != b"":
                raise ValueError("not two lines")
            body, proof = lines[0], json.loads(lines[1])
            document = json.loads(body)
            if not isinstance(document, dict) or not isinstance(proof, dict) or set(proof) != {"hash", "mac"}:
                raise ValueError("not a record")
            previous = document.pop("previous")
            if not isinstance(previous, str) or (index == 0) != (previous == ""):
                raise ValueError("its 'previous' is malformed")
            record = Record.parse(document, index)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptStoreError(f"{where} is malformed ({exc}): the log was damaged or edited. Restore it from a "
                                    "copy") from None
        if proof["hash"] != sha256(body):
            raise CorruptStoreError(f"{where} fails its hash: its body was edited or damaged. Restore the log from "
                                    "a copy")
        if self._key is not None and self._authenticated and not self._key.verifies(body, proof["mac"]):
            raise CorruptStoreError(f"{where} fails its MAC under the store's audit key: it was written or edited "
                                    "by someone without the key")
        self._records[index], self._proofs[index] = record, (proof["hash"], proof["mac"], previous)

    def raw(self, index: int) -> bytes:
        """A record's object as stored (for `pyunlearn audit verify`)."""
        data = zarr_io.get(self._zstore, record_key(index))
        if data is None:
            raise CorruptStoreError(f"{self._where}: audit log record {index} ({record_key(index)}) is missing")
        return data


class MemoryLog(list):
    """Records held in memory (a store of an older format, read without converting it)."""

    @property
    def head(self) -> str:
        return f"{len(self)}:"
