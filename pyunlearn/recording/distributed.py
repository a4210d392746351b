"""Recording under DistributedDataParallel: what the recorder needs of torch.distributed, and
the role of a rank that does not write (the writer rank is the recorder's _WritingRole)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import keys
from .._validate import int_in_range
from ..errors import ModelMismatchError, RecorderError
from ..kernels import fingerprint, same_model
from .continuation import refuse_forgotten

STATE_MISMATCH = ("the model is not the one this recorder state was saved with: the state belongs to another "
                   "checkpoint. Load the model (and the optimizer) from the checkpoint the state was saved in, "
                   "then the state")


class FollowerRole:
    """A DDP rank that does not write: under DDP every rank holds the same parameters after a
    step, so only the writer rank prunes and writes; this one takes part in gathering the
    batch IDs, and raises with every other rank when the writer reports a failure."""

    def __init__(self, model, dist: "Distributed"):
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._dist = dist
        self.steps = 0
        self._forgotten = np.empty(0, np.int64)
        self._keys = keys.StoreKeys()
        self._store = _KeysOf(None, None, 0)

    def share_keys(self, dist: "Distributed") -> None:
        hasher = keys.KeyHasher.resolve()
        self._forgotten, store = dist.agree_on_keys(None if hasher is None else hasher.check, None)
        # The writer's store as far as mapping goes: whether it holds keys, how it maps them.
        key_check, mapping, steps = store
        self._store = _KeysOf(key_check, mapping, steps)

    def ids_for(self, values) -> np.ndarray:
        """A batch's IDs by the writer's store's rules: keys mapped with the secret from the
        environment (every rank needs the same; share_keys checked that as recording started),
        integers on a store of integers."""
        ids = self._keys.ids(values, self._store, "the store", "this rank's batch", first_keys=True)
        return refuse_forgotten(np.asarray(ids, dtype=np.int64), self._forgotten)

    def before_step(self) -> None:
        pass  # the writer's error reaches this rank through the gather

    def after_step(self, ids: np.ndarray) -> None:
        self._dist.gather(ids, None)

    def hand_off(self, recorded: None) -> None:
        pass

    def flush(self, mark: bool) -> int:
        return self.steps

    def fingerprint_at(self, steps: int) -> str:
        return fingerprint(self._params)

    def load_state(self, steps: int, model_fingerprint: str) -> int:
        if not same_model(self._params, model_fingerprint):
            raise ModelMismatchError(STATE_MISMATCH)
        self.steps = steps
        return 0  # the writer rank truncates the store

    def close(self, mark_final: bool) -> None:
        pass


class _KeysOf(NamedTuple):
    """What a rank that holds no store needs of the writer's to map a batch (keys.StoreKeys.ids)."""

    key_check: str | None
    key_mapping: int | None
    committed_steps: int

    @property
    def keyed(self) -> bool:
        return self.key_check is not None


class Distributed:
    """What the recorder needs of torch.distributed: whether this rank writes, and a gather of
    each rank's batch IDs that also carries the writer's failure to every rank, so that no rank
    waits in a collective for a writer that has stopped."""

    def __init__(self, rank: int, world: int, writer_rank: int):
        self.rank, self.world, self.writer_rank = rank, world, writer_rank
        self.writes = rank == writer_rank

    @classmethod
    def current(cls, writer_rank: int) -> "Distributed | None":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        world = dist.get_world_size()
        return cls(dist.get_rank(), world, int_in_range("writer_rank", writer_rank, 0, world - 1))

    def gather(self, ids: np.ndarray, failure: BaseException | None) -> np.ndarray:
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (ids, None if failure is None else repr(failure)))
        failures = [f for _, f in gathered if f is not None]
        if failures:
            raise RecorderError(f"recording stopped on the writer rank ({failures[0]}); every rank stops with it")
        return np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in gathered])

    def agree_on_keys(self, key_check: str | None, forgotten: np.ndarray | None, store=None) -> tuple:
        """Once, as recording starts: every rank's secret (its check value) must be the same, or
        every rank raises together; returns the writer's forgotten IDs, which each rank checks
        its own batches against, and the writer store's (key_check, key_mapping, steps)."""
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (key_check, forgotten, store))
        checks = {check for check, _, _ in gathered if check is not None}
        if len(checks) > 1:
            raise RecorderError("the DDP ranks map keys with different secrets: their samples would be recorded under "
                                "IDs no lookup finds. Give every rank the store's secret (PYUNLEARN_SECRET or "
                                "PYUNLEARN_SECRET_FILE)")
        _, forgotten, store = gathered[self.writer_rank]
        return forgotten, store
