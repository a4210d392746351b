"""UpdateRecorder: hooks an optimizer's step, prunes each step's update, hands it to the store.

    with UpdateRecorder(model, optimizer, store) as rec:
        for ids, x, y in loader:
            rec.batch(ids)
            ...; optimizer.step()

The pruning runs in the training thread right after each step (it is fast, and it must see
the parameters before the next step changes them); compression and I/O run in a background
writer fed through a bounded queue, so a slow disk slows training rather than filling memory.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from . import ops
from ._ids import as_ids
from ._model import as_float32_work, fingerprint, kernel_ready
from .errors import ModelMismatchError, NonFiniteUpdateError, PyunlearnError
from .store import UpdateStore


class RecorderError(PyunlearnError, RuntimeError):
    """Recording cannot go on (the writer failed, or a step had no sample IDs)."""


_STOP = object()


class UpdateRecorder:
    """Records every optimizer step of `model` into `store`.

    optimizer: must update exactly the model's trainable parameters (those in the store's
    layer table). allow_unlabeled_steps: record steps with no declared sample IDs instead of
    refusing them. rows_per_handoff: rows passed to the writer at once (default: ~1 MB of rows,
    at most 64; one thread wake-up per step would cost a small model more than the pruning).
    queue_size: hand-offs waiting for the writer before training blocks, so at most
    (queue_size + 2) · rows_per_handoff rows are held in memory.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, store: UpdateStore | None, *,
                 allow_unlabeled_steps: bool = False, rows_per_handoff: int | None = None, queue_size: int = 8,
                 writer_rank: int = 0):
        self._dist = _Distributed.current(writer_rank)
        if self._dist is not None and not self._dist.writes:
            # Under DDP every rank holds the same parameters after a step: only the writer rank
            # prunes and writes; the others take part in gathering the batch IDs.
            self._init_follower(model, optimizer, allow_unlabeled_steps)
            return
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # the store records the wrapped module's parameter names
        if not isinstance(store, UpdateStore):
            raise TypeError(f"store must be an UpdateStore, got {type(store).__name__}"
                            + ("" if self._dist is None else " (on the writer rank; other ranks may pass None)"))
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for arg, value in (("queue_size", queue_size), ("rows_per_handoff", rows_per_handoff)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        self._params = store.check_model(model)
        self._check_optimizer(optimizer, store)
        store._require_writer()  # fail now, not after training steps went unrecorded
        store._refuse_if_ledger("record more steps into")
        for layer, p in zip(store.layers, self._params):
            if p.device.type != "cpu":
                raise ValueError(f"parameter {layer.name} is on {p.device}: this build records CPU models only "
                                 "(the CUDA kernels are not built yet)")
        if store.steps == 0 and fingerprint(self._params) != store.initial_fingerprint:
            raise ModelMismatchError("the model differs from the one the store was created for: create the store "
                                     "from the model as training starts")
        self._model = model
        self._store = store
        self._names = [layer.name for layer in store.layers]
        self._allow_unlabeled = bool(allow_unlabeled_steps)
        self._optimizer = optimizer
        self._family = _attribution_family(optimizer) if store.attribution == "gradient" else None
        self._pruner = None
        if self._family is not None:  # gradient attribution: no snapshot, the gradients are the rows
            store._set_optimizer(self._family)
            self._zeros = [torch.zeros(p.numel(), dtype=torch.float32) for p in self._params]
            # Momentum carried in from steps recorded before this recorder exists only if the
            # optimizer's state came with it (e.g. loaded with the checkpoint).
            self._carry_in = any(len(optimizer.state.get(p, {})) for p in self._params)
        else:
            self._snapshot = [p.detach().to(torch.float32).contiguous().clone() for p in self._params]
            # Parameters the kernel can read in place get a prepared pruner, over the parameters
            # themselves (not detached views: `param.data = ...` then moves their storage
            # address, which the pruner notices). Others (half precision, channels_last) are
            # copied to float32 each step and go through the checked call.
            if all(kernel_ready(p) for p in self._params):
                self._pruner = ops.Pruner(self._snapshot, self._params, store.k, store.value_dtype, names=self._names)
        self._handoff_rows = rows_per_handoff or max(1, min(64, (1 << 20) // max(1, store.row_length * 6)))
        self._outgoing: list[tuple] = []
        self._pending: list[np.ndarray] = []
        self._steps = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._writer_error: BaseException | None = None
        self._failed: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="pyunlearn-writer", daemon=True)
        self._writer.start()
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step)]
        self._closed = False

    def _init_follower(self, model, optimizer, allow_unlabeled_steps) -> None:
        self._store = None
        self._allow_unlabeled = bool(allow_unlabeled_steps)
        self._pending: list[np.ndarray] = []
        self._steps = 0
        self._failed = None
        self._writer_error = None
        self._closed = False
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step_follower)]

    def _after_step_follower(self, optimizer, args, kwargs):
        self._gather(self._take_pending(), None)
        self._steps += 1

    def _take_pending(self) -> np.ndarray:
        """The IDs declared since the last step, as one array; the next step starts empty."""
        pending, self._pending = self._pending, []
        return np.concatenate(pending) if pending else np.empty(0, np.int64)

    def _gather(self, ids: np.ndarray, failure: BaseException | None) -> np.ndarray:
        """Every rank's IDs (the global batch); raises on every rank if any rank reported a
        failure, and stops recording here too."""
        try:
            return self._dist.gather(ids, failure)
        except RecorderError as exc:
            self._failed = exc
            raise

    def _check_optimizer(self, optimizer, store) -> None:
        """The optimizer must update exactly the recorded parameters: a parameter it skips would
        be recorded as unchanged, one it adds would change the model unrecorded."""
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        in_store = {id(p) for p in self._params}
        missing = [layer.name for layer, p in zip(store.layers, self._params) if id(p) not in in_optimizer]
        extra = len(in_optimizer - in_store)
        if missing or extra:
            raise ValueError(f"the optimizer's parameters are not the model's trainable parameters: it lacks "
                             f"{missing[:5]} and has {extra} others; give it model.parameters() (trainable only)")

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
        if self._dist is None:  # under DDP the writer's error reaches every rank through the gather
            self._raise_writer_error()
        if not self._pending and not self._allow_unlabeled:
            # Refused before the step runs, so the model is unchanged.
            raise RecorderError("optimizer.step() with no sample IDs declared since the last step: call "
                                "rec.batch(ids) for each batch, or pass allow_unlabeled_steps=True")

    def _after_step(self, optimizer, args, kwargs):
        ids = self._take_pending()  # this step's IDs, whatever happens next
        hyper, failure = None, None
        try:
            if self._family is not None:
                row, hyper = self._gradient_row()
            elif self._pruner is not None:
                row = self._pruner(refresh=True)
            else:
                live = [as_float32_work(p) for p in self._params]
                row = ops.prune_topk(self._snapshot, live, self._store.k, self._store.value_dtype, refresh=True,
                                     names=self._names)
        except NonFiniteUpdateError as exc:
            self._failed = failure = exc  # the snapshot no longer matches any recorded state: stop
        if self._dist is not None:  # the global batch: every rank's IDs; a failure stops all ranks
            ids = self._gather(ids, failure or self._writer_error)
        if failure is not None:
            raise failure
        self._steps += 1
        self._outgoing.append((row, ids, hyper))
        if len(self._outgoing) >= self._handoff_rows:
            self._hand_off()

    def _gradient_row(self):
        """Gradient attribution: the pruned gradient this step used (for Adam divided by
        √v̂ + ε, the state after the step) and the step's (lr, momentum or β1, Adam step)."""
        group = self._optimizer.param_groups[0]
        vectors, adam_step = [], 0.0
        for p in self._params:
            if p.grad is None:  # untouched this step: contributes nothing
                vectors.append(torch.zeros(p.numel()))
                continue
            g = p.grad.detach().to(device="cpu", dtype=torch.float32)
            if self._family == "adam":
                state = self._optimizer.state[p]
                step = float(state["step"])  # this parameter's own count: it may have skipped steps
                adam_step = max(adam_step, step)
                v_hat = state["exp_avg_sq"].detach().to(device="cpu", dtype=torch.float32) / (1.0 - group["betas"][1] ** step)
                g = g / (v_hat.sqrt() + group["eps"])
            vectors.append(g.reshape(-1).contiguous())
        row = ops.prune_topk(self._zeros, vectors, self._store.k, self._store.value_dtype, refresh=False,
                             names=self._names)
        beta1 = float(group["betas"][0]) if self._family == "adam" else 0.0
        carry = beta1 if self._family == "adam" else float(group.get("momentum", 0.0))
        if not self._carry_in:  # the first step of a fresh optimizer keeps nothing of earlier steps
            carry, self._carry_in = 0.0, True
        # Adam's bias correction uses the largest step count among the layers (they differ only
        # if some layer skipped steps).
        return row, (float(group["lr"]), carry, adam_step, beta1)

    def _hand_off(self) -> None:
        if self._outgoing:
            self._queue.put(self._outgoing)  # blocks while the writer is behind: back-pressure
            self._outgoing = []

    # ----------------------------------------------------------------- the writer side
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._writer_error is not None:
                continue  # keep draining so the training thread never blocks on a dead writer
            try:
                for row, ids, hyper in item:
                    self._store.append(row, ids, hyper)
            except BaseException as exc:  # re-raised in the training thread
                self._writer_error = exc

    def _raise_writer_error(self) -> None:
        if self._writer_error is not None:
            raise RecorderError(f"writing to {self._store.path} failed: {self._writer_error!r}; "
                                "steps since the last flush are lost") from self._writer_error

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
        if self._store is None:  # a follower rank
            for hook in self._hooks:
                hook.remove()
            self._closed = True
            return
        for hook in self._hooks:
            hook.remove()
        try:
            self._hand_off()
        finally:
            self._queue.put(_STOP)  # the writer drains everything, even after an error
            self._writer.join()
            self._closed = True
        self._raise_writer_error()
        self._store.flush()
        if self._failed is None:  # a model holding an unrecorded update is not the final model
            self._store.mark_final(self._model)

    close = remove

    def __enter__(self) -> "UpdateRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()


def _attribution_family(optimizer) -> str:
    """'sgd' or 'adam' when gradient attribution can follow the optimizer's arithmetic; a clear
    error otherwise."""
    groups = optimizer.param_groups
    if any(g.get("maximize") for g in groups):
        raise ValueError("gradient attribution does not support maximize=True; record with attribution='update'")
    if isinstance(optimizer, torch.optim.SGD):
        family, keys = "sgd", ("lr", "momentum", "dampening", "nesterov")
        for g in groups:
            if g.get("nesterov") or g.get("dampening", 0) != 0:
                raise ValueError("gradient attribution follows plain SGD with momentum: nesterov and dampening "
                                 "are not supported; record with attribution='update'")
    elif type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        family, keys = "adam", ("lr", "betas", "eps")
        if any(g.get("amsgrad") for g in groups):
            raise ValueError("gradient attribution does not support amsgrad; record with attribution='update'")
    else:
        raise ValueError(f"gradient attribution supports SGD, Adam and AdamW, not {type(optimizer).__name__}; "
                         "record with attribution='update'")
    if any(any(g[k] != groups[0][k] for k in keys) for g in groups[1:]):
        raise ValueError("gradient attribution needs one learning rate and momentum for all parameter groups")
    return family


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
        if isinstance(writer_rank, bool) or not isinstance(writer_rank, int) or not 0 <= writer_rank < world:
            raise ValueError(f"writer_rank must be a rank in [0, {world}), got {writer_rank!r}")
        return cls(dist.get_rank(), world, writer_rank)

    def gather(self, ids: np.ndarray, failure: BaseException | None) -> np.ndarray:
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (ids, None if failure is None else repr(failure)))
        failures = [f for _, f in gathered if f is not None]
        if failures:
            raise RecorderError(f"recording stopped on the writer rank ({failures[0]}); every rank stops with it")
        return np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in gathered])
