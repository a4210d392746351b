"""Sample keys (an e-mail, a UUID, an account number) as the int64 sample IDs a store holds.

A key is mapped to an ID by a keyed hash (BLAKE2b with a secret of at least 16 bytes, 63 bits
kept so IDs stay non-negative int64). The secret is held outside the store: pass it as
`secret=` to UpdateStore.create/open, or set PYUNLEARN_SECRET (the secret itself) or
PYUNLEARN_SECRET_FILE (a file holding it). The store keeps only a check value of the secret,
so that a wrong secret is refused instead of silently matching nothing.

Canonical keys (stores created since format 5, `key_mapping` 2): a key that spells a UUID —
8-4-4-4-12 hex digits in any case, optionally in braces, optionally after "urn:uuid:" — and a
uuid.UUID are the UUID's lower-case hyphenated text; any other text is NFC-normalised (its case
kept); bytes are taken as they are. So "E3B0C442-…", "{e3b0c442-…}", "urn:uuid:e3b0c442-…" and
UUID("e3b0c442-…") are one key, as are "é" typed precomposed and decomposed. Stores of format 4
(`key_mapping` 1) keep mapping a key's UTF-8 bytes as given. docs/format.md gives the algorithm
and test vectors.

A store of keys takes keys; integer IDs given to it are refused (they would match nothing: the
store's IDs are the keys' hashes), except the IDs store.ids_for(keys) returns (MappedIds, which
carry the secret's check value). A store of integer IDs refuses keys.

Threat model: someone holding the store but not the secret cannot test whether a given key
(say, an e-mail address) was trained on — the IDs, the index and the audit records' keyed
digests are pseudorandom to them. Someone holding the secret can, as can anyone with the
training data. A lost secret cannot be recovered from the store: deletions by key are then
impossible (deletions by the int64 IDs, if you kept them, still work). Keep it in your secret
manager beside the model's signing keys.

Collisions: two distinct keys given together (one batch, one request) that map to one ID are
refused. Across a store, two keys collide with probability about n²/2⁶⁴ for n keys (5·10⁻⁸ at
10⁶ keys, 5·10⁻⁴ at 10⁸); a collision makes a deletion of either key remove both keys' steps
(over-deletion, never under-deletion).
"""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
import uuid
from pathlib import Path

import numpy as np
import numpy.ma  # noqa: F401  numpy's unique imports it at its first call (6-9 ms): a store's first lookup paid that
import torch

from .errors import KeyMappingError

SECRET_ENV = "PYUNLEARN_SECRET"
SECRET_FILE_ENV = "PYUNLEARN_SECRET_FILE"
AUDIT_KEY_ENV = "PYUNLEARN_AUDIT_KEY"
AUDIT_KEY_FILE_ENV = "PYUNLEARN_AUDIT_KEY_FILE"
MIN_SECRET_BYTES = 16
CANONICAL = 2  # the key mapping of stores created since format 5 (1: the key's bytes as given)
_ID_MASK = (1 << 63) - 1
_UUID = re.compile(r"(?:urn:uuid:)?(\{)?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?(1)\})",
                   re.IGNORECASE)


def canonical_key(key, mapping: int = CANONICAL, arg: str = "keys") -> bytes:
    """The bytes a key is hashed as: see the module docstring (mapping 2) or the key's bytes as
    given (mapping 1, stores of format 4)."""
    if isinstance(key, uuid.UUID):
        return str(key).encode()
    if isinstance(key, bytes):
        return key
    if not isinstance(key, str):
        raise TypeError(f"{arg} mixes keys with a {type(key).__name__}: give all keys as str, bytes or UUID, "
                        "or all as integer IDs")
    if mapping == 1:
        return key.encode("utf-8")
    spelled = _UUID.fullmatch(key)
    if spelled:
        return spelled.group(2).lower().encode()
    return unicodedata.normalize("NFC", key).encode("utf-8")


class MappedIds(np.ndarray):
    """Sample IDs mapped from keys with a store's secret (store.ids_for(keys)): a store of keys
    accepts them where it takes keys, for loops that map a batch's keys once (a data set column,
    a collator) and hand the IDs on. `key_check` names the secret they were mapped with."""

    key_check: str | None = None

    def __array_finalize__(self, obj):
        self.key_check = getattr(obj, "key_check", None)


def mapped(ids: np.ndarray, key_check: str) -> MappedIds:
    out = np.asarray(ids, dtype=np.int64).view(MappedIds)
    out.key_check = key_check
    return out


def as_ids(ids, arg: str = "ids", *, allow_empty: bool = False) -> np.ndarray:
    """ints, a sequence of ints, an integer numpy array or tensor → 1-D int64 numpy array."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{arg} must hold integers, got a {ids.dtype} tensor")
        ids = ids.detach().cpu().numpy()
    elif isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = np.array([ids])
    else:
        try:
            ids = np.asarray(ids)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{arg} must be integer sample IDs: {exc}") from None
    if ids.size == 0:  # [] comes out of numpy as float64
        ids = ids.astype(np.int64)
    if ids.dtype == object or ids.dtype.kind not in "iu":
        raise TypeError(f"{arg} must hold integers (int64 sample IDs), got dtype {ids.dtype}")
    if ids.ndim > 1:
        raise ValueError(f"{arg} must be 1-D, got shape {ids.shape}")
    if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{arg} holds values beyond int64")
    ids = ids.reshape(-1).astype(np.int64, copy=False)
    if not allow_empty and ids.size == 0:
        raise ValueError(f"{arg} is empty: pass at least one sample ID")
    return ids


def is_keys(values) -> bool:
    """Whether `values` are keys (str, bytes or UUID, or a sequence of them) rather than integer IDs."""
    if isinstance(values, (str, bytes, uuid.UUID)):
        return True
    if isinstance(values, np.ndarray) and values.dtype.kind in "US":  # numpy strings
        return True
    if isinstance(values, (torch.Tensor, np.ndarray)) and values.dtype != object:
        return False
    try:
        first = next(iter(values), None)
    except TypeError:
        return False
    return isinstance(first, (str, bytes, uuid.UUID))


class KeyHasher:
    """Maps keys to int64 sample IDs with a secret (see the module docstring)."""

    def __init__(self, secret, mapping: int = CANONICAL):
        self.mapping = mapping
        if isinstance(secret, str):
            secret = secret.encode()
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError(f"secret must be bytes or str, got {type(secret).__name__}")
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"secret must hold at least {MIN_SECRET_BYTES} bytes (got {len(secret)}): "
                             "use e.g. secrets.token_hex(32)")
        if len(secret) > 64:  # BLAKE2b's key limit: longer secrets are hashed down first
            secret = hashlib.blake2b(bytes(secret)).digest()
        self._secret = bytes(secret)
        self.check = "blake2b:" + hashlib.blake2b(b"pyunlearn secret check", key=self._secret,
                                                 digest_size=16).hexdigest()

    @classmethod
    def resolve(cls, secret=None) -> "KeyHasher | None":
        """From `secret`, else PYUNLEARN_SECRET, else the file PYUNLEARN_SECRET_FILE names; None if none is set."""
        if secret is not None:
            return secret if isinstance(secret, KeyHasher) else cls(secret)
        if os.environ.get(SECRET_ENV):
            return cls(os.environ[SECRET_ENV])
        if os.environ.get(SECRET_FILE_ENV):
            path = Path(os.environ[SECRET_FILE_ENV])
            if not path.is_file():
                raise FileNotFoundError(f"{SECRET_FILE_ENV}={path}: no such file (it should hold the store's secret)")
            return cls(path.read_bytes().strip())
        return None

    def ids(self, keys, arg: str = "keys") -> np.ndarray:
        """The int64 IDs of `keys` (one key or a sequence of str / bytes / UUID), each key in its
        canonical form (see the module docstring)."""
        keys = [keys] if isinstance(keys, (str, bytes, uuid.UUID)) else list(keys)
        out = np.empty(len(keys), dtype=np.int64)
        blake2b, secret, mapping = hashlib.blake2b, self._secret, self.mapping
        for i, key in enumerate(keys):
            digest = blake2b(canonical_key(key, mapping, arg), key=secret, digest_size=8).digest()
            out[i] = int.from_bytes(digest, "little") & _ID_MASK
        _refuse_collisions(keys, out, arg, mapping)
        return out

    def with_mapping(self, mapping: int) -> "KeyHasher":
        """This secret under another key mapping (a store of format 4 maps keys as given)."""
        if mapping == self.mapping:
            return self
        other = object.__new__(KeyHasher)
        other.__dict__.update(self.__dict__, mapping=mapping)
        return other

    def audit_key(self):
        """The key that authenticates the audit log of a store of these keys."""
        from .store.audit_log import AuditKey

        return AuditKey(self._secret)

    def digest(self, ids: np.ndarray) -> str:
        """A keyed digest of a request's IDs (sorted, unique): the audit trail's record of which
        keys were asked for, checkable by whoever holds the keys and the secret."""
        data = np.unique(np.asarray(ids, dtype=np.int64)).astype("<i8").tobytes()
        return "blake2b-keyed:" + hashlib.blake2b(data, key=self._secret, digest_size=32).hexdigest()


def ids_digest(ids: np.ndarray) -> str:
    """The unkeyed digest of a request's integer IDs (sorted, unique)."""
    data = np.unique(np.asarray(ids, dtype=np.int64)).astype("<i8").tobytes()
    return "sha256:" + hashlib.sha256(data).hexdigest()


class StoreKeys:
    """A store's way from what callers give to its int64 IDs: its secret (given, or from the
    environment when first needed) checked against the check value in its metadata, and the
    rule that a store of keys takes keys and a store of integer IDs takes integers. Pure: it
    never writes; registering a store's first keys is the recorder's explicit call
    (UpdateStore.register_keys)."""

    def __init__(self, secret=None, audit_key=None):
        self._secret = secret if secret is None or isinstance(secret, KeyHasher) else KeyHasher(secret)
        self._audit = audit_key

    def hasher(self, mapping: int = CANONICAL) -> KeyHasher | None:
        """The secret in use (given or from the environment) under `mapping`, None if none is set."""
        hasher = KeyHasher.resolve(self._secret)
        return None if hasher is None else hasher.with_mapping(mapping)

    def check(self) -> str | None:
        """The check value of the secret in use (given or from the environment), None if none is set."""
        hasher = self.hasher()
        return None if hasher is None else hasher.check

    def ids(self, values, meta, where: str, arg: str = "ids", *, allow_empty: bool = False,
            first_keys: bool = False) -> np.ndarray:
        """`values` as the store's int64 IDs (`meta`: its StoreMetadata). Keys need the store's
        secret; integers on a store of keys, and keys on a store of integers, are refused before
        anything changes. first_keys: the caller will register the secret if these are the
        store's first keys (the recorder, on an empty store)."""
        if isinstance(values, MappedIds):
            if not meta.keyed or values.key_check != meta.key_check:
                raise TypeError(f"{arg} were mapped from keys with {'another' if meta.keyed else 'a'} secret, but "
                                f"{where} {'maps its keys with another' if meta.keyed else 'records integer IDs'}: "
                                "map the keys with this store (store.ids_for(keys))")
            return as_ids(np.asarray(values), arg, allow_empty=allow_empty)
        if not is_keys(values):
            ids = to_ids(values, None, None, where, arg, allow_empty=allow_empty)
            if meta.keyed and ids.size:
                raise TypeError(
                    f"{arg}: {where} maps keys to sample IDs with a secret, so integer IDs would match nothing. Give "
                    "the keys themselves (str, bytes or UUID; an account number 12345 is the key \"12345\"), or IDs "
                    "that store.ids_for(keys) returned")
            return ids
        if not meta.keyed and not (first_keys and meta.committed_steps == 0):
            why = "recorded its samples by integer ID" if meta.committed_steps else "has recorded no keys"
            raise TypeError(f"{arg}: {where} {why}; keys cannot be matched to them (give the integer sample IDs)")
        hasher = self.hasher(meta.key_mapping or CANONICAL)
        return to_ids(values, hasher, meta.key_check, where, arg, allow_empty=allow_empty)

    def digest(self, ids: np.ndarray, meta) -> str:
        """The audit trail's digest of a request's IDs: keyed with the secret on a store of keys."""
        if not meta.keyed:
            return ids_digest(ids)
        hasher = self.hasher(meta.key_mapping)
        if hasher is None or hasher.check != meta.key_check:
            raise KeyMappingError("the store's secret is needed to record a request on a store of keys: pass secret= "
                                  f"to UpdateStore.open, or set {SECRET_ENV} or {SECRET_FILE_ENV}")
        return hasher.digest(ids)

    def audit_key(self, meta):
        """The AuditKey of the store's log: from its secret (a store of keys), else the audit key
        given (audit_key=, PYUNLEARN_AUDIT_KEY[_FILE]); None if neither is at hand."""
        if meta.keyed:
            hasher = self.hasher(meta.key_mapping)
            return None if hasher is None or hasher.check != meta.key_check else hasher.audit_key()
        raw = resolve_audit_key(self._audit)
        if raw is None:
            return None
        from .store.audit_log import AuditKey

        return AuditKey(raw)


def resolve_audit_key(audit_key=None) -> bytes | None:
    """The audit key of a store of integer IDs: `audit_key`, else PYUNLEARN_AUDIT_KEY, else the
    file PYUNLEARN_AUDIT_KEY_FILE names; None if none is set. At least 16 bytes."""
    if audit_key is None and os.environ.get(AUDIT_KEY_ENV):
        audit_key = os.environ[AUDIT_KEY_ENV]
    if audit_key is None and os.environ.get(AUDIT_KEY_FILE_ENV):
        path = Path(os.environ[AUDIT_KEY_FILE_ENV])
        if not path.is_file():
            raise FileNotFoundError(f"{AUDIT_KEY_FILE_ENV}={path}: no such file (it should hold the store's audit key)")
        audit_key = path.read_bytes().strip()
    if audit_key is None:
        return None
    raw = audit_key.encode() if isinstance(audit_key, str) else audit_key
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < MIN_SECRET_BYTES:
        raise ValueError(f"audit_key must be bytes or str of at least {MIN_SECRET_BYTES} bytes: use e.g. "
                         "secrets.token_hex(32)")
    return hashlib.blake2b(bytes(raw)).digest() if len(raw) > 64 else bytes(raw)


def to_ids(values, hasher: KeyHasher | None, key_check: str | None, where: str, arg: str = "ids",
           *, allow_empty: bool = False) -> np.ndarray:
    """`values` (integer IDs, or keys mapped with `hasher`) as int64 IDs; clear errors for keys
    without the secret or with the wrong one."""
    if not is_keys(values):
        try:
            return as_ids(values, arg, allow_empty=allow_empty)
        except TypeError:
            if isinstance(values, (list, tuple)) and any(isinstance(v, (str, bytes, uuid.UUID)) for v in values):
                raise TypeError(f"{arg} mixes integer IDs with keys: give all as keys (str, bytes or UUID) or all "
                                "as integer IDs") from None
            raise
    if hasher is None:
        raise KeyMappingError(f"{arg} are keys, which need the store's secret to be mapped to sample IDs: pass secret= "
                              f"to UpdateStore.create/open, or set {SECRET_ENV} or {SECRET_FILE_ENV}. If the secret is "
                              "lost, deletions by key are impossible (see pyunlearn.keys)")
    if key_check is not None and key_check != hasher.check:
        raise KeyMappingError(f"the secret given is not the one {where}'s keys were mapped with: no key would be found. "
                              "Use the store's secret (a lost secret cannot be recovered from the store)")
    ids = hasher.ids(values, arg)
    if not allow_empty and ids.size == 0:
        raise ValueError(f"{arg} is empty: pass at least one key")
    return ids


def _refuse_collisions(keys: list, ids: np.ndarray, arg: str, mapping: int = CANONICAL) -> None:
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    for j in same:
        a, b = keys[order[j]], keys[order[j + 1]]
        if canonical_key(a, mapping, arg) != canonical_key(b, mapping, arg):
            raise KeyMappingError(f"{arg}: the keys {a!r} and {b!r} map to the same sample ID (a hash collision, about "
                            "one in 2^63 per pair): rename one of them; nothing was recorded or forgotten")
