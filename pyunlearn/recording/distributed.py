"""Recording under DistributedDataParallel (and FSDP, pyunlearn.recording.sharded): what the
recorder needs of torch.distributed, and the role of a rank that does not write (the writer
rank is the recorder's _WritingRole).

Refusals are agreed on, never raised by one rank alone: a rank that raised while the others
went on would leave them waiting in DDP's next all-reduce (gloo fails, NCCL hangs). So under
torch.distributed a refusal (a forgotten sample in one rank's batch, a key it cannot map, the
writer's store or model check, the writer thread's failure) is held until the next step, and
the one collective each step makes anyway — the gather of the step's sample IDs, before the
step runs — carries it: every rank raises the same error there, and no rank's step runs.
"""
from __future__ import annotations

import builtins
from typing import NamedTuple

import numpy as np

from .. import errors, keys
from .._validate import int_in_range
from ..errors import ModelMismatchError, RecorderError
from ..kernels import fingerprint, same_model
from .continuation import refuse_forgotten

STATE_MISMATCH = ("the model is not the one this recorder state was saved with: the state belongs to another "
                   "checkpoint. Load the model (and the optimizer) from the checkpoint the state was saved in, "
                   "then the state")


class Refusal(NamedTuple):
    """A rank's refusal as it travels to the other ranks: the error's class name, its message,
    the rank it came from, and whether recording stops (a step may be retried after a refused
    batch or a ResumeRefused; not after the writer failed or training changed)."""

    kind: str
    message: str
    rank: int
    stops: bool

    @classmethod
    def of(cls, exc: BaseException, rank: int, *, stops: bool) -> "Refusal":
        return cls(type(exc).__name__, str(exc), rank, stops)

    def error(self, world: int, where: str = "every rank stops here; this step did not run") -> BaseException:
        """The error every rank raises: the original class where pyunlearn or Python defines it
        (so `except KeyMappingError` works on every rank), else RecorderError."""
        kind = getattr(errors, self.kind, None) or getattr(builtins, self.kind, None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RecorderError
        text = f"rank {self.rank} of {world}: {self.message} ({where})"
        try:
            return kind(text)
        except TypeError:  # an exception class whose constructor wants other arguments
            return RecorderError(f"{self.kind}: {text}")


class FollowerRole:
    """A DDP rank that does not write: under DDP every rank holds the same parameters after a
    step, so only the writer rank prunes and writes; this one maps its batches' keys, checks them
    against the forgotten samples, and takes part in the gather of each step's IDs (and, for a
    sharded model, in gathering its parameters for the writer)."""

    def __init__(self, model, dist: "Distributed", *, secret=None, sharded=None):
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._dist = dist
        self._sharded = sharded
        self.steps = 0
        self._forgotten = np.empty(0, np.int64)
        self._keys = keys.StoreKeys(secret)
        self._store = _KeysOf(None, None, 0)

    @property
    def key_check(self) -> str | None:
        return self._store.key_check

    def share_keys(self, dist: "Distributed", error: BaseException | None = None) -> None:
        try:
            check = self._keys.check()
        except (OSError, TypeError, ValueError) as exc:  # a secret file that is missing, a secret too short
            check, error = None, error or exc
        self._forgotten, store = dist.agree_on_keys(check, None, error=error)
        # The writer's store as far as mapping goes: whether it holds keys, how it maps them.
        key_check, mapping, steps = store
        self._store = _KeysOf(key_check, mapping, steps)

    def ids_for(self, values) -> np.ndarray:
        """A batch's IDs by the writer's store's rules: keys mapped with this rank's secret
        (secret=, or the environment; share_keys checked that every rank has the same), IDs the
        store's secret mapped (keys.MappedIds), integers on a store of integers."""
        ids = self._keys.ids(values, self._store, "the store", "this rank's batch", first_keys=True)
        return refuse_forgotten(np.asarray(ids, dtype=np.int64), self._forgotten)

    def before_step(self) -> BaseException | None:
        return None  # the writer's checks reach this rank through the gather

    def after_step(self, ids: np.ndarray):
        if self._sharded is not None:
            self._sharded.gather()  # the writer's copy of the parameters: every rank takes part
        return None

    def hand_off(self, recorded: None) -> None:
        pass

    def flush(self, mark: bool) -> int:
        return self.steps

    def fingerprint_at(self, steps: int) -> str:
        if self._sharded is not None:  # this rank holds a shard: only the writer sees the whole model
            return fingerprint([p.to_local() for p in self._params])
        return fingerprint(self._params)

    def load_state(self, steps: int, model_fingerprint: str) -> int:
        # A sharded model is checked on the writer rank, which holds all of it.
        if self._sharded is None and not same_model(self._params, model_fingerprint):
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
    """What the recorder needs of torch.distributed: whether this rank writes, the start-up
    agreement on keys (and on whether every rank could start), and the per-step gather of every
    rank's batch IDs, which carries each rank's refusal so that all of them raise it together."""

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

    def gather(self, ids: np.ndarray, refusal: Refusal | None) -> tuple[np.ndarray, Refusal | None]:
        """Before a step: every rank's IDs, concatenated in rank order (the global batch), and
        the first rank's refusal if any rank refused the step (then every rank must raise
        `refusal.error(world)`; its `stops` is true if any rank's refusal stops recording)."""
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (ids, refusal))
        refusals = [r for _, r in gathered if r is not None]
        if refusals:
            return None, refusals[0]._replace(stops=any(r.stops for r in refusals))
        return np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in gathered]), None

    def agree_on_keys(self, key_check: str | None, forgotten: np.ndarray | None, store=None, *,
                      error: BaseException | None = None) -> tuple:
        """Once, as recording starts: every rank's secret (its check value) must be the same, and
        every rank must have started (the writer's store opened and checked, a recorder state
        loaded), or every rank raises together; returns the writer's forgotten IDs, which each
        rank checks its own batches against, and the writer store's (key_check, key_mapping,
        steps)."""
        import torch.distributed as dist

        gathered: list = [None] * self.world
        failure = None if error is None else Refusal.of(error, self.rank, stops=True)
        dist.all_gather_object(gathered, (key_check, forgotten, store, failure))
        failed = [f for *_, f in gathered if f is not None]
        if failed:  # the same error on every rank (on a failed one, raised from its own)
            raise failed[0].error(self.world, "recording could not start there; every rank stops") from error
        checks = {check for check, *_ in gathered if check is not None}
        if len(checks) > 1:
            raise RecorderError(
                "the ranks map keys with different secrets: their samples would be recorded under IDs no lookup "
                "finds. Give every rank the store's secret (secret=, or PYUNLEARN_SECRET / PYUNLEARN_SECRET_FILE)")
        _, forgotten, store, _ = gathered[self.writer_rank]
        return forgotten, store
