"""Digests that bind stored data to its place (docs/format.md: place-bound digests).

Every chunk already carries a crc32c, which says its bytes are the bytes written, not that they
are the bytes written *there*: a shard swapped with another of the same array (a botched rsync
or restore), moved, or copied from another store passes every crc32c, and a forget would then
subtract the wrong rows. So each step's data is hashed together with the store's identity
(store_id, random, in its metadata) and the step's number:

    row digest   XXH3-128 of b"pyunlearn step row\\0" ‖ store_id (16 bytes) ‖ step (uint64 LE) ‖
                 index ‖ values ‖ scales ‖ step_hyper (where the store keeps it), each row as
                 its little-endian bytes
    IDs digest   XXH3-128 of b"pyunlearn step ids\\0" ‖ store_id ‖ step ‖ the step's sample IDs
                 (int64 LE, as stored)

kept per step in the array step_digests (steps, 32) uint8: the row digest, then the IDs digest,
each as XXH3-128's canonical (big-endian) 16 bytes. A run of the ID index keeps one digest per
inner chunk of pairs in its attributes (`digests`): XXH3-128 of b"pyunlearn id index\\0" ‖ store_id
‖ the run's name (UTF-8) ‖ b"\\0" ‖ chunk number (uint64 LE) ‖ the chunk's pairs (int64 LE). A reader
checks the digests of exactly what it reads; a forget so never reads the whole store.
"""
from __future__ import annotations

import numpy as np
import xxhash

ROW_TAG = b"pyunlearn step row\x00"
IDS_TAG = b"pyunlearn step ids\x00"
RUN_TAG = b"pyunlearn id index\x00"


def _little(a: np.ndarray) -> memoryview:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a).cast("B")


def _digest(tag: bytes, store_id: bytes, number: int, *parts) -> bytes:
    h = xxhash.xxh3_128()
    h.update(tag)
    h.update(store_id)
    h.update(int(number).to_bytes(8, "little"))
    for part in parts:
        h.update(part if isinstance(part, bytes) else _little(part))
    return h.digest()


def store_id_bytes(store_id: str) -> bytes:
    return bytes.fromhex(store_id)


def row_digest(store_id: bytes, step: int, index, values, scales, hyper=None) -> bytes:
    """The row digest of one step (1-D fields as the store keeps them)."""
    parts = (index, values, scales) if hyper is None else (index, values, scales, hyper)
    return _digest(ROW_TAG, store_id, step, *parts)


def ids_digest(store_id: bytes, step: int, ids: np.ndarray) -> bytes:
    return _digest(IDS_TAG, store_id, step, np.asarray(ids, dtype=np.int64))


def check_steps(store_id: bytes, steps: np.ndarray, stored: np.ndarray, fields: dict[str, np.ndarray] | None,
                ids: list[np.ndarray] | None) -> int | None:
    """The first of `steps` whose stored digests (`stored`, one 32-byte row per step) do not
    match its row (`fields`: index, values, scales and step_hyper where kept, one row per step)
    or its IDs; None when all match. Either may be None (not checked)."""
    hyper = None if fields is None else fields.get("step_hyper")
    for i, step in enumerate(steps.tolist()):
        if fields is not None:
            digest = row_digest(store_id, step, fields["index"][i], fields["values"][i], fields["scales"][i],
                                None if hyper is None else hyper[i])
            if digest != stored[i, :16].tobytes():
                return step
        if ids is not None and ids_digest(store_id, step, ids[i]) != stored[i, 16:].tobytes():
            return step
    return None


def run_chunk_digest(store_id: bytes, run: str, chunk: int, pairs: np.ndarray) -> str:
    """The hex digest of inner chunk `chunk` of the ID-index run named `run`."""
    h = xxhash.xxh3_128()
    for part in (RUN_TAG, store_id, run.encode() + b"\x00", int(chunk).to_bytes(8, "little")):
        h.update(part)
    h.update(_little(np.asarray(pairs, dtype=np.int64)))
    return h.hexdigest()
