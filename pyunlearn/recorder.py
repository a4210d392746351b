"""UpdateRecorder: hooks an optimizer's step, prunes each step's update, hands it to the store.

    with UpdateRecorder(model, optimizer, store) as rec:
        for ids, x, y in loader:
            rec.batch(ids)
            ...; optimizer.step()

The pruning runs in the training thread right after each step (it is fast, and it must see
the parameters before the next step changes them); compression and I/O run in a background
writer fed through a bounded queue, so a slow disk slows training rather than filling memory.

Parts: UpdateRecorder (the hooks and the IDs declared per step) delegates each step to a role:
_WritingRole (prunes a row, hands it to a _BackgroundWriter) or, on a DDP rank that does not
write, _FollowerRole (only takes part in gathering the IDs). A row comes from _UpdateRows (Δθ
against a snapshot) or _GradientRows (the optimizer family's vectors, pyunlearn.attribution).
"""
from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np
import torch

from . import attribution, ops
from ._ids import as_ids
from ._model import as_float32_work, fingerprint, kernel_ready
from ._validate import int_in_range, positive_int
from .errors import ModelMismatchError, NonFiniteUpdateError, RecorderError
from .store import UpdateStore

__all__ = ["UpdateRecorder", "RecorderError"]


class UpdateRecorder:
    """Records every optimizer step of `model` into `store`.

    optimizer: must update exactly the model's trainable parameters (those in the store's
    layer table). allow_unlabeled_steps: record steps with no declared sample IDs instead of
    refusing them. rows_per_handoff: rows passed to the writer at once (default: ~1 MB of rows,
    at most 64; one thread wake-up per step would cost a small model more than the pruning).
    queue_size: hand-offs waiting for the writer before training blocks, so at most
    (queue_size + 2) · rows_per_handoff rows are held in memory. The recorder holds the store's
    writer lock while it records (a write session, released at close if it took it).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, store: UpdateStore | None, *,
                 allow_unlabeled_steps: bool = False, rows_per_handoff: int | None = None, queue_size: int = 8,
                 writer_rank: int = 0):
        dist = _Distributed.current(writer_rank)
        if dist is not None and not dist.writes:
            self._role = _FollowerRole(dist)
        else:
            self._role = _WritingRole(model, optimizer, store, dist, rows_per_handoff=rows_per_handoff,
                                      queue_size=queue_size)
        self._allow_unlabeled = bool(allow_unlabeled_steps)
        self._pending: list[np.ndarray] = []
        self._steps = 0
        self._failed: BaseException | None = None
        self._closed = False
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step)]

    # ----------------------------------------------------------------- the training side
    def batch(self, ids) -> None:
        """Declares the sample IDs used since the last step (several calls add up, as with
        gradient accumulation)."""
        self._check_open()
        self._pending.append(as_ids(ids))

    @property
    def steps(self) -> int:
        """Steps recorded so far (handed to the writer; durable once flushed)."""
        return self._steps

    def _before_step(self, optimizer, args, kwargs):
        self._check_open()
        if self._failed is not None:
            raise RecorderError(f"recording stopped ({self._failed}); the store holds the steps before it. Reload "
                                "a good checkpoint, truncate the store to its step and start a new recorder") from self._failed
        self._role.before_step()
        if not self._pending and not self._allow_unlabeled:
            # Refused before the step runs, so the model is unchanged.
            raise RecorderError("optimizer.step() with no sample IDs declared since the last step: call "
                                "rec.batch(ids) for each batch, or pass allow_unlabeled_steps=True")

    def _after_step(self, optimizer, args, kwargs):
        pending, self._pending = self._pending, []  # this step's IDs; the next step starts empty
        ids = np.concatenate(pending) if pending else np.empty(0, np.int64)
        try:
            recorded = self._role.after_step(ids)
        except (NonFiniteUpdateError, RecorderError) as exc:
            self._failed = exc  # the snapshot no longer matches any recorded state: stop
            raise
        self._steps += 1  # counted before the hand-off, which may block while the writer is behind
        self._role.hand_off(recorded)

    def _check_open(self) -> None:
        if self._closed:
            raise RecorderError("the recorder is closed")

    # ----------------------------------------------------------------- closing
    def remove(self) -> None:
        """Stops recording: waits for the writer, removes the hooks, flushes the store and
        records the model as the store's final model. Raises the writer's error, if any.
        Under DDP it involves no collective: the other ranks just remove their hooks, and a
        failure while closing is raised on the writer rank only."""
        if self._closed:
            return
        for hook in self._hooks:
            hook.remove()
        self._closed = True
        self._role.close(mark_final=self._failed is None)

    close = remove

    def __enter__(self) -> "UpdateRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()


class _FollowerRole:
    """A DDP rank that does not write: under DDP every rank holds the same parameters after a
    step, so only the writer rank prunes and writes; this one takes part in gathering the
    batch IDs, and raises with every other rank when the writer reports a failure."""

    def __init__(self, dist: "_Distributed"):
        self._dist = dist

    def before_step(self) -> None:
        pass  # the writer's error reaches this rank through the gather

    def after_step(self, ids: np.ndarray) -> None:
        self._dist.gather(ids, None)

    def hand_off(self, recorded: None) -> None:
        pass

    def close(self, mark_final: bool) -> None:
        pass


class _WritingRole:
    """The rank that records: checks the model, optimizer and store once, then per step
    prunes a row and hands it to the background writer."""

    def __init__(self, model, optimizer, store, dist, *, rows_per_handoff, queue_size):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # the store records the wrapped module's parameter names
        if not isinstance(store, UpdateStore):
            raise TypeError(f"store must be an UpdateStore, got {type(store).__name__}"
                            + ("" if dist is None else " (on the writer rank; other ranks may pass None)"))
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        queue_size = positive_int("queue_size", queue_size)
        if rows_per_handoff is not None:
            rows_per_handoff = positive_int("rows_per_handoff", rows_per_handoff)
        params = store.check_model(model)
        _check_optimizer(optimizer, store, params)
        family = attribution.family_for(optimizer) if store.attribution == "gradient" else None
        for layer, p in zip(store.layers, params):
            if p.device.type != "cpu":
                raise ValueError(f"parameter {layer.name} is on {p.device}: this build records CPU models only "
                                 "(the CUDA kernels are not built yet)")
        self._session = contextlib.ExitStack()
        with self._session:
            self._session.enter_context(store.writing())  # fail now, not after training steps went unrecorded
            store.ledger.refuse_more_training(store.path, "record more steps into")
            if store.steps == 0 and fingerprint(params) != store.initial_fingerprint:
                raise ModelMismatchError("the model differs from the one the store was created for: create the "
                                         "store from the model as training starts")
            if family is not None:
                store.set_optimizer_family(family.name)
            self._session = self._session.pop_all()  # the session stays open until close()
        names = [layer.name for layer in store.layers]
        self._rows = _GradientRows(family(optimizer, params), store, names) if family is not None else \
            _UpdateRows(params, store, names)
        self._model, self._store, self._dist = model, store, dist
        self._writer = _BackgroundWriter(
            store, rows_per_handoff or max(1, min(64, (1 << 20) // max(1, store.row_length * 6))), queue_size)

    def before_step(self) -> None:
        if self._dist is None:  # under DDP the writer's error reaches every rank through the gather
            self._writer.raise_error()

    def after_step(self, ids: np.ndarray) -> tuple:
        """This step's (row, global batch IDs, hyper-parameters)."""
        row, hyper, failure = None, None, None
        try:
            row, hyper = self._rows()
        except NonFiniteUpdateError as exc:
            failure = exc
        if self._dist is not None:  # the global batch: every rank's IDs; a failure stops all ranks
            ids = self._dist.gather(ids, failure or self._writer.error)
        if failure is not None:
            raise failure
        return row, ids, hyper

    def hand_off(self, recorded: tuple) -> None:
        self._writer.put(recorded)

    def close(self, mark_final: bool) -> None:
        with self._session:  # releases the writer lock at the end if the recorder took it
            self._writer.stop()
            self._writer.raise_error()
            self._store.flush()
            if mark_final:  # a model holding an unrecorded update is not the final model
                self._store.mark_final(self._model)


class _UpdateRows:
    """Update attribution: each step's Δθ against a float32 snapshot, pruned (refreshing the
    snapshot)."""

    def __init__(self, params, store, names):
        self._params, self._k, self._dtype, self._names = params, store.k, store.value_dtype, names
        self._snapshot = [p.detach().to(torch.float32).contiguous().clone() for p in params]
        # Parameters the kernel can read in place get a prepared pruner, over the parameters
        # themselves (not detached views: `param.data = ...` then moves their storage address,
        # which the pruner notices). Others (half precision, channels_last) are copied to
        # float32 each step and go through the checked call.
        self._pruner = ops.Pruner(self._snapshot, params, self._k, self._dtype, names=names) \
            if all(kernel_ready(p) for p in params) else None

    def __call__(self):
        if self._pruner is not None:
            return self._pruner(refresh=True), None
        live = [as_float32_work(p) for p in self._params]
        return ops.prune_topk(self._snapshot, live, self._k, self._dtype, refresh=True, names=self._names), None


class _GradientRows:
    """Gradient attribution: the optimizer family's vectors for this step, pruned, and the
    step's hyper-parameters (pyunlearn.attribution)."""

    def __init__(self, family: attribution.OptimizerFamily, store, names):
        self._family, self._k, self._dtype, self._names = family, store.k, store.value_dtype, names
        self._zeros = [torch.zeros(layer.numel, dtype=torch.float32) for layer in store.layers]

    def __call__(self):
        vectors = self._family.vectors()
        row = ops.prune_topk(self._zeros, vectors, self._k, self._dtype, refresh=False, names=self._names)
        return row, self._family.hyper()


_STOP = object()


class _BackgroundWriter:
    """A thread that appends rows to the store. Rows arrive in hand-offs of several rows
    through a bounded queue (back-pressure: a slow disk slows training). After an error it keeps
    draining, so the training thread never blocks on a dead writer; the error is re-raised in
    the training thread by raise_error()."""

    def __init__(self, store: UpdateStore, handoff_rows: int, queue_size: int):
        self._store, self._handoff_rows = store, handoff_rows
        self._outgoing: list[tuple] = []
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pyunlearn-writer", daemon=True)
        self._thread.start()

    def put(self, item: tuple) -> None:
        self._outgoing.append(item)
        if len(self._outgoing) >= self._handoff_rows:
            self._hand_off()

    def _hand_off(self) -> None:
        if self._outgoing:
            self._queue.put(self._outgoing)  # blocks while the writer is behind
            self._outgoing = []

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self.error is not None:
                continue
            try:
                for row, ids, hyper in item:
                    self._store.append(row, ids, hyper)
            except BaseException as exc:  # re-raised in the training thread
                self.error = exc

    def stop(self) -> None:
        """Hands off what is left and waits until everything was written (or failed)."""
        try:
            self._hand_off()
        finally:
            self._queue.put(_STOP)
            self._thread.join()

    def raise_error(self) -> None:
        if self.error is not None:
            raise RecorderError(f"writing to {self._store.path} failed: {self.error!r}; "
                                "steps since the last flush are lost") from self.error


def _check_optimizer(optimizer, store, params) -> None:
    """The optimizer must update exactly the recorded parameters: a parameter it skips would be
    recorded as unchanged, one it adds would change the model unrecorded."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [layer.name for layer, p in zip(store.layers, params) if id(p) not in in_optimizer]
    extra = len(in_optimizer - {id(p) for p in params})
    if missing or extra:
        raise ValueError(f"the optimizer's parameters are not the model's trainable parameters: it lacks "
                         f"{missing[:5]} and has {extra} others; give it model.parameters() (trainable only)")


class _Distributed:
    """What the recorder needs of torch.distributed: whether this rank writes, and a gather of
    each rank's batch IDs that also carries the writer's failure to every rank, so that no rank
    waits in a collective for a writer that has stopped."""

    def __init__(self, rank: int, world: int, writer_rank: int):
        self.rank, self.world, self.writer_rank = rank, world, writer_rank
        self.writes = rank == writer_rank

    @classmethod
    def current(cls, writer_rank: int) -> "_Distributed | None":
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
