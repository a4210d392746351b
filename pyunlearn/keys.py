"""Sample keys (an e-mail, a UUID, an account number) as the int64 sample IDs a store holds.

A key is mapped to an ID by a keyed hash (BLAKE2b with a secret of at least 16 bytes, 63 bits
kept so IDs stay non-negative int64). The secret is held outside the store: pass it as
`secret=` to UpdateStore.create/open, or set PYUNLEARN_SECRET (the secret itself) or
PYUNLEARN_SECRET_FILE (a file holding it). The store keeps only a check value of the secret,
so that a wrong secret is refused instead of silently matching nothing.

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
import uuid
from pathlib import Path

import numpy as np
import numpy.ma  # noqa: F401  numpy's unique imports it at its first call (6-9 ms): a store's first lookup paid that
import torch

from .errors import KeyMappingError

SECRET_ENV = "PYUNLEARN_SECRET"
SECRET_FILE_ENV = "PYUNLEARN_SECRET_FILE"
MIN_SECRET_BYTES = 16
_ID_MASK = (1 << 63) - 1


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

    def __init__(self, secret):
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
        """The int64 IDs of `keys` (one key or a sequence of str / bytes / UUID); a UUID and its
        canonical string give the same ID, as do a str and its UTF-8 bytes."""
        keys = [keys] if isinstance(keys, (str, bytes, uuid.UUID)) else list(keys)
        out = np.empty(len(keys), dtype=np.int64)
        blake2b, secret = hashlib.blake2b, self._secret
        for i, key in enumerate(keys):
            digest = blake2b(_key_bytes(key, arg), key=secret, digest_size=8).digest()
            out[i] = int.from_bytes(digest, "little") & _ID_MASK
        _refuse_collisions(keys, out, arg)
        return out

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
    """A store's way from keys to IDs: its secret (given, or from the environment when first
    needed) checked against the check value in its metadata."""

    def __init__(self, secret=None):
        self._secret = secret if secret is None or isinstance(secret, KeyHasher) else KeyHasher(secret)

    def check(self) -> str | None:
        """The check value of the secret in use (given or from the environment), None if none is set."""
        hasher = KeyHasher.resolve(self._secret)
        return None if hasher is None else hasher.check

    def ids(self, values, key_check: str | None, steps: int, where: str, arg: str = "ids", *,
            allow_empty: bool = False) -> tuple[np.ndarray, str | None]:
        """(the IDs, the check value to record if these are the store's first keys, else None)."""
        hasher = KeyHasher.resolve(self._secret) if is_keys(values) else None
        if hasher is not None and key_check is None and steps:
            raise TypeError(f"{arg}: {where} recorded its samples by integer ID; keys cannot be matched to them")
        ids = to_ids(values, hasher, key_check, where, arg, allow_empty=allow_empty)
        return ids, (hasher.check if hasher is not None and key_check is None else None)

    def digest(self, ids: np.ndarray, key_check: str | None) -> str:
        """The audit trail's digest of a request's IDs: keyed with the secret on a store of keys."""
        return ids_digest(ids) if key_check is None else KeyHasher.resolve(self._secret).digest(ids)


def to_ids(values, hasher: KeyHasher | None, key_check: str | None, where: str, arg: str = "ids",
           *, allow_empty: bool = False) -> np.ndarray:
    """`values` (integer IDs — on a store of keys, the IDs the keys map to — or keys) as the
    store's int64 IDs; clear errors for keys without the secret or with the wrong one."""
    if not is_keys(values):
        try:
            return as_ids(values, arg, allow_empty=allow_empty)
        except TypeError:
            if isinstance(values, (list, tuple)) and any(isinstance(v, (str, bytes, uuid.UUID)) for v in values):
                raise TypeError(f"{arg} mixes integer IDs with keys: give all as keys (str, bytes or UUID) or all "
                                "as integer IDs") from None
            raise
    if hasher is None:
        raise KeyMappingError(f"{arg} are keys, which need the store's secret to be mapped to sample IDs: pass secret= to "
                        f"UpdateStore.create/open, or set {SECRET_ENV} or {SECRET_FILE_ENV}. If the secret is lost, "
                        "deletions by key are impossible (see pyunlearn.keys)")
    if key_check is not None and key_check != hasher.check:
        raise KeyMappingError(f"the secret given is not the one {where}'s keys were mapped with: no key would be found. "
                        "Use the store's secret (a lost secret cannot be recovered from the store)")
    ids = hasher.ids(values, arg)
    if not allow_empty and ids.size == 0:
        raise ValueError(f"{arg} is empty: pass at least one key")
    return ids


def _key_bytes(key, arg: str) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, bytes):
        return key
    if isinstance(key, uuid.UUID):
        return str(key).encode()
    raise TypeError(f"{arg} mixes keys with a {type(key).__name__}: give all keys as str, bytes or UUID, "
                    "or all as integer IDs")


def _refuse_collisions(keys: list, ids: np.ndarray, arg: str) -> None:
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    for j in same:
        a, b = keys[order[j]], keys[order[j + 1]]
        if _key_bytes(a, arg) != _key_bytes(b, arg):
            raise KeyMappingError(f"{arg}: the keys {a!r} and {b!r} map to the same sample ID (a hash collision, about "
                            "one in 2^63 per pair): rename one of them; nothing was recorded or forgotten")
