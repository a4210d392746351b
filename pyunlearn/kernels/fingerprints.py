"""A model's identity: a fingerprint of its parameters' values, the timeline's way to tell
models apart (pyunlearn.ledger)."""
from __future__ import annotations

import hashlib

import torch
import xxhash

from . import reference
from .backends import native_cpu_module

__all__ = ["fingerprint", "same_model", "Fingerprints", "fingerprint_algorithm", "FINGERPRINT_ALGORITHM"]


#: The algorithm of new fingerprints: XXH3-128, a standard hash any reader has (the xxhash
#: library). Stores keep whichever algorithm wrote each value, so a comparison with a stored
#: value hashes with that value's algorithm (see same_model): "xh128" (pyunlearn's own, stores of
#: format 4) and "sha256" (before it) are still computed for them.
FINGERPRINT_ALGORITHM = "xxh3"
_ALGORITHMS = ("xxh3", "xh128", "sha256")


def fingerprint_algorithm(value: str) -> str:
    """The algorithm a fingerprint names by its prefix: 'xxh3', 'xh128' or 'sha256' (stores keep
    values of each); ValueError for anything else."""
    algorithm, sep, _ = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not sep or algorithm not in _ALGORITHMS:
        raise ValueError(f"not a fingerprint this pyunlearn can compute: {value!r} "
                         "(expected 'xxh3:', 'xh128:' or 'sha256:' and 32 hex digits)")
    return algorithm


def fingerprint(params, like: str | None = None) -> str:
    """A model's identity: "<algorithm>:<32 hex digits>" over its parameters' float32 values in
    logical (row-major) order, layer after layer, little-endian (a bfloat16 model and its float32
    copy agree).

    The algorithm is XXH3-128 (seed 0; the 16 digest bytes in canonical big-endian order, as
    hex), or that of `like`, a stored fingerprint: the result then equals `like` exactly when
    the values are the ones it was computed from. A fingerprint identifies models; it is not a
    security measure (whoever chooses the values can forge a collision; the audit log's MACs
    and the metadata's checksum protect the store, not this)."""
    algorithm = FINGERPRINT_ALGORITHM if like is None else fingerprint_algorithm(like)
    values = [p.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy() for p in params]  # no copy
    if algorithm == "xxh3":
        digest = xxhash.xxh3_128()
        for v in values:
            digest.update(memoryview(v.astype("<f4", copy=False)).cast("B"))
        return "xxh3:" + digest.hexdigest()
    if algorithm == "sha256":
        digest = hashlib.sha256()
        for v in values:
            digest.update(v)
        return "sha256:" + digest.hexdigest()[:32]
    native = native_cpu_module()
    raw = native.fingerprint(values) if native is not None else reference.xh128(values)
    return "xh128:" + raw.hex()


def same_model(params, stored_fingerprint: str | None) -> bool:
    """Whether `params` hold the values a stored fingerprint was computed from, hashing with
    that fingerprint's algorithm (so sha256 values of older stores still match). None or ""
    (no model known) never matches."""
    if not stored_fingerprint:
        return False
    return fingerprint(params, like=stored_fingerprint) == stored_fingerprint


class Fingerprints:
    """One model's fingerprints, each algorithm hashed at most once: for a caller comparing the
    model with several stored values that may use different algorithms (a store recorded
    before the switch to xh128 and forgotten from after it). Valid while the values do not
    change."""

    def __init__(self, params):
        self._params = list(params)
        self._by_algorithm: dict[str, str] = {}

    def get(self, like: str | None = None) -> str:
        """fingerprint(params, like), computed once per algorithm."""
        algorithm = FINGERPRINT_ALGORITHM if like is None else fingerprint_algorithm(like)
        if algorithm not in self._by_algorithm:
            self._by_algorithm[algorithm] = fingerprint(self._params, like=None if like is None else like)
        return self._by_algorithm[algorithm]

    def matches(self, stored_fingerprint: str | None) -> bool:
        """same_model(params, stored_fingerprint), computed once per algorithm."""
        return bool(stored_fingerprint) and self.get(like=stored_fingerprint) == stored_fingerprint
