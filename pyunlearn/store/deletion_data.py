"""What deletions keep beside the log, bound to it by digests in each record's state
(docs/format.md): the IDs every request in effect asked for, and the steps they removed.

- forgotten_ids (a Zarr array): the IDs of the deletions in effect are forgotten_ids[0:end], a
  request's at [ids_from, ids_from + keys). Its digest: the IDs in blocks of 8192 (little-endian
  int64), chain_0 = b"", chain_b = SHA-256(chain_{b−1} ‖ block_b) over the whole blocks, and
  digest = "sha256:" + hex SHA-256(chain_B ‖ the last, partial block). A request appends a block
  at most plus the partial one, so the digest costs the same at the millionth request as at the
  first; undoing the last request cuts `end` back.
- log/removed-steps (an object of packed bits, step s is bit 7 − s mod 8 of byte s // 8, up to
  the byte holding the last removed step): which steps deletions in effect (pending included)
  removed, so that a forget finds its new steps without reading the log. Digest: "sha256:" + hex
  SHA-256 of those bytes. A bitmap that does not match the head's digest (a crash between the
  record and the bitmap, a restored copy) is rebuilt from the log.
"""
from __future__ import annotations

import hashlib

import numpy as np
from ..ledger import Forgotten, Timeline
from . import zarr_io

BLOCK_IDS = 8192
REMOVED_KEY = "log/removed-steps"


# ---------------------------------------------------------------------------------- forgotten IDs
def _chain(chain: bytes, blocks: np.ndarray) -> bytes:
    for block in blocks.reshape(-1, BLOCK_IDS):
        chain = hashlib.sha256(chain + block.astype("<i8").tobytes()).digest()
    return chain


def _digest(chain: bytes, tail: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(chain + np.asarray(tail, dtype="<i8").tobytes()).hexdigest()


def forgotten_of(ids: np.ndarray) -> Forgotten:
    """The digest of forgotten_ids[0:len(ids)] == ids, computed whole."""
    ids = np.asarray(ids, dtype=np.int64)
    whole = len(ids) // BLOCK_IDS * BLOCK_IDS
    chain = _chain(b"", ids[:whole])
    return Forgotten(len(ids), chain.hex(), _digest(chain, ids[whole:]))


def forgotten_after_append(before: Forgotten, tail: np.ndarray, new: np.ndarray) -> Forgotten:
    """The digest once `new` IDs are appended; `tail`: the IDs already in the last, partial
    block (forgotten_ids[end // 8192 * 8192 : end])."""
    pending = np.concatenate([np.asarray(tail, dtype=np.int64), np.asarray(new, dtype=np.int64)])
    whole = len(pending) // BLOCK_IDS * BLOCK_IDS
    chain = _chain(bytes.fromhex(before.chain), pending[:whole])
    return Forgotten(before.end + len(new), chain.hex(), _digest(chain, pending[whole:]))


def forgotten_after_cut(before: Forgotten, end: int, read) -> Forgotten:
    """The digest once forgotten_ids is cut back to `end` (the last request undone); `read(a,
    b)` reads forgotten_ids[a:b]. Within the last block only the tail is read again."""
    if end // BLOCK_IDS == before.end // BLOCK_IDS:
        start = end // BLOCK_IDS * BLOCK_IDS
        return Forgotten(end, before.chain, _digest(bytes.fromhex(before.chain), read(start, end)))
    return forgotten_of(read(0, end))


# ---------------------------------------------------------------------------------- removed steps
def removed_digest(bitmap: np.ndarray) -> tuple[int, str]:
    """(how many steps are set, the digest) of a bool bitmap over steps."""
    set_steps = np.flatnonzero(bitmap)
    packed = np.packbits(bitmap[: set_steps[-1] + 1] if set_steps.size else bitmap[:0])
    return int(set_steps.size), "sha256:" + hashlib.sha256(packed.tobytes()).hexdigest()


class RemovedSteps:
    """The removed-steps bitmap of one store: read once, checked against the head state,
    rebuilt from the log where it does not match; changed in memory, written after the record
    that changes it."""

    def __init__(self, zstore, read_only: bool):
        self._zstore, self._read_only = zstore, read_only
        self._bitmap: np.ndarray | None = None
        self._for: int = -1  # the log length the bitmap was checked against

    def bitmap(self, timeline: Timeline) -> np.ndarray:
        """The bitmap as the head of `timeline` says it is (a bool array, at least as long as
        the last removed step)."""
        n = len(timeline)
        if self._bitmap is not None and self._for == n:
            return self._bitmap
        state = timeline.state
        bitmap = self._read()
        if removed_digest(bitmap) != (state.removed, state.removed_digest):
            bitmap = np.zeros(0, dtype=bool)
            steps = timeline.steps_removed(pending=True)
            if steps.size:
                bitmap = np.zeros(int(steps[-1]) + 1, dtype=bool)
                bitmap[steps] = True
            if removed_digest(bitmap) != (state.removed, state.removed_digest):
                from ..errors import CorruptStoreError

                raise CorruptStoreError(f"the removed steps the audit log's records list do not match the digest in "
                                        f"their last state (record {n - 1}): the log was edited")
            if not self._read_only:
                self._write(bitmap)
        self._bitmap, self._for = bitmap, n
        return bitmap

    def mask(self, timeline: Timeline, steps: np.ndarray) -> np.ndarray:
        bitmap = self.bitmap(timeline)
        steps = np.asarray(steps, dtype=np.int64)
        inside = steps < bitmap.size
        out = np.zeros(steps.shape, dtype=bool)
        out[inside] = bitmap[steps[inside]]
        return out

    def changed(self, timeline: Timeline, *, add=(), remove=()) -> np.ndarray:
        """A new bitmap: this one with the steps `add` set and `remove` cleared."""
        bitmap = self.bitmap(timeline)
        add, remove = np.asarray(add, dtype=np.int64), np.asarray(remove, dtype=np.int64)
        size = max(bitmap.size, int(add.max()) + 1 if add.size else 0)
        new = np.zeros(size, dtype=bool)
        new[: bitmap.size] = bitmap
        new[add] = True
        new[remove[remove < size]] = False
        return new

    def commit(self, bitmap: np.ndarray, records: int) -> None:
        """Records `bitmap` as the one after the log's first `records` records (written once
        those records are)."""
        self._write(bitmap)
        self._bitmap, self._for = bitmap, records

    def _read(self) -> np.ndarray:
        data = zarr_io.get(self._zstore, REMOVED_KEY)
        if data is None:
            return np.zeros(0, dtype=bool)
        return np.unpackbits(np.frombuffer(data, dtype=np.uint8)).astype(bool)

    def _write(self, bitmap: np.ndarray) -> None:
        set_steps = np.flatnonzero(bitmap)
        packed = np.packbits(bitmap[: set_steps[-1] + 1] if set_steps.size else bitmap[:0])
        zarr_io.put(self._zstore, REMOVED_KEY, packed.tobytes())
