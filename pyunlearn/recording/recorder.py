"""UpdateRecorder: hooks an optimizer's step, prunes each step's update, hands it to the store.

    with UpdateRecorder(model, optimizer, store) as rec:
        for ids, x, y in loader:
            rec.batch(ids)
            ...; optimizer.step()
            if checkpoint_now:
                torch.save({"model": ..., "optimizer": ..., "recorder": rec.state_dict()}, path)

The pruning runs in the training thread right after each step (it is fast, and it must see
the parameters before the next step changes them); compression and I/O run in a background
writer fed through a bounded queue, so a slow disk slows training rather than filling memory.
For a model on a GPU the pruning is queued on the device and only the pruned row is copied to
the host, asynchronously: the writer thread waits for it, never the training thread
(DeviceUpdateRows, pyunlearn._transfer).
The writer flushes the store every `flush_every_s` seconds; `rec.flush()` (and
`rec.state_dict()`, which flushes) makes every recorded step durable at once.

Before every step the recorder re-checks, cheaply, that the optimizer still holds the recorded
parameters with their dtype, device and shape (and, for gradient attribution, settings its
family follows), and that a store which already had steps is continued from the model those
steps end with (resume rules: `load_state_dict`). A refused step has not run.

Parts: UpdateRecorder (the hooks and the IDs declared per step) delegates each step to a role:
_WritingRole (prunes a row, hands it to a BackgroundWriter) or, on a DDP rank that does not
write, FollowerRole (maps its batches and takes part in the gather of each step's IDs, which
runs before the step and carries every rank's refusal: pyunlearn.recording.distributed). A row
comes from UpdateRows (Δθ against a snapshot, on the CPU), DeviceUpdateRows (the same on a
device) or GradientRows (the optimizer family's vectors, pyunlearn.attribution).
"""
from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch

from .. import attribution, keys, ledger
from .._validate import positive_int
from ..errors import (KeyMappingError, ModelMismatchError, NonFiniteUpdateError, RecorderError, ResumeRefused,
                      TrainingChangedError)
from ..kernels import Fingerprints, same_model, supports
from ..kernels.backends import backend_for
from ..kernels.checks import one_device
from ..store import UpdateStore
from .continuation import refuse_forgotten
from .distributed import STATE_MISMATCH, Distributed, FollowerRole, Refusal
from .row_sources import DeviceUpdateRows, GradientRows, UpdateRows
from .sharded import ShardedModel
from .writer import BackgroundWriter

__all__ = ["UpdateRecorder", "unwrap_model", "unwrap_optimizer"]

STATE_FORMAT = "pyunlearn.recorder-state"
STATE_VERSION = 1


class UpdateRecorder:
    """Records every optimizer step of `model` into `store`.

    model: the module the store was created from, or the same module wrapped by DDP or
    torch.compile, or sharded by FSDP2's fully_shard (pyunlearn.recording.sharded); on the CPU or
    on one CUDA device (a model spread over devices is refused). optimizer: a torch optimizer, or
    one wrapped by Accelerate (AcceleratedOptimizer) or Lightning (its step hooks go on the
    wrapped one); it must update exactly the model's trainable parameters (those in the store's
    layer table), and may also hold frozen ones (requires_grad=False: not recorded, and refused if
    they start to train).
    allow_unlabeled_steps: record steps with no declared sample IDs instead of
    refusing them. rows_per_handoff: rows passed to the writer at once (default: ~1 MB of rows,
    at most 64; one thread wake-up per step would cost a small model more than the pruning).
    queue_size: hand-offs waiting for the writer before training blocks, so at most
    (queue_size + 2) · rows_per_handoff rows are held in memory. flush_every_s: the writer
    flushes the store when this many seconds passed since its last flush (and the training
    thread hands its rows over at least this often), so a crash loses about that much
    training; None: only full chunks, rec.flush() and close() write. state: a recorder state
    saved with the checkpoint training resumes from (load_state_dict). The recorder holds the
    store's writer lock while it records (a write session, released at close if it took it).

    Under torch.distributed (DDP, FSDP2) every rank creates a recorder with the same arguments,
    `store` on the writer rank (writer_rank) and None elsewhere. secret: the secret that maps a
    batch's keys on a rank that holds no store (default: PYUNLEARN_SECRET or
    PYUNLEARN_SECRET_FILE); on the writer rank the store maps keys with its own secret
    (UpdateStore.create/open(secret=)), and a different one here is refused. A refusal on any
    rank — a forgotten sample or an unmappable key in its batch, the writer's checks, a failed
    writer — is raised by every rank at the next optimizer.step(), before it runs
    (pyunlearn.recording.distributed).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, store: UpdateStore | None, *,
                 allow_unlabeled_steps: bool = False, rows_per_handoff: int | None = None, queue_size: int = 8,
                 writer_rank: int = 0, flush_every_s: float | None = 60.0, state: dict | None = None,
                 secret=None):
        flush_every_s = _seconds_or_none("flush_every_s", flush_every_s)
        optimizer = unwrap_optimizer(optimizer)  # Accelerate's and Lightning's wrappers: hook the torch optimizer
        model = unwrap_model(model)  # DDP, torch.compile: the store names the module's own parameters
        dist = Distributed.current(writer_rank)
        self._dist = dist
        self._allow_unlabeled = bool(allow_unlabeled_steps)
        self._pending: list[np.ndarray] = []
        self._failed: BaseException | None = None
        self._refused: BaseException | None = None  # under torch.distributed: a batch refused, raised at the step
        self._unreported: BaseException | None = None  # a failure after a step, not yet raised on every rank
        self._step_ids: np.ndarray | None = None  # under torch.distributed: the global batch, gathered before the step
        self._closed = False
        self._role = None
        error = None
        try:
            sharded = ShardedModel.detect(model, dist, names=_named_parameters(model))
            if sharded is not None:
                sharded.gather()  # every rank, before any may fail alone: the writer's copy to check and record
            if dist is not None and not dist.writes:
                self._role = FollowerRole(model, dist, secret=secret, sharded=sharded)
            else:
                self._role = _WritingRole(model, optimizer, store, dist, rows_per_handoff=rows_per_handoff,
                                          queue_size=queue_size, flush_every_s=flush_every_s, secret=secret,
                                          sharded=sharded)
            if state is not None:
                self._load_state(state, stacklevel=3)
        except BaseException as exc:
            error = exc
        try:
            if dist is not None:  # every rank starts, or every rank raises
                if self._role is None:
                    dist.agree_on_keys(None, None, error=error)
                else:
                    self._role.share_keys(dist, error)
            elif error is not None:
                raise error
        except BaseException:
            self._failed = RecorderError("recording could not start")
            if self._role is not None:
                self._closed = True
                with contextlib.suppress(Exception):
                    self._role.close(mark_final=False)
            raise
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step)]

    # ----------------------------------------------------------------- the training side
    def batch(self, ids) -> None:
        """Declares the sample IDs (or keys) used since the last step (several calls add up, as
        with gradient accumulation). A batch holding a forgotten sample, or keys that cannot be
        mapped, is refused: here in one process; under torch.distributed at the next
        optimizer.step(), on every rank at once (the batch is not declared either way)."""
        self._check_open()
        try:
            # A copy: the IDs may be a view of the caller's tensor or array, which a loop may refill
            # for the next micro-batch before the step (as_ids and the int64 fast path both return views).
            declared = self._role.ids_for(ids).copy()
        except Exception as exc:
            if self._dist is None:
                raise
            self._refused = self._refused or exc  # raised by every rank before the next step runs
            return
        self._pending.append(declared)

    def refuse_next_step(self, error: BaseException) -> None:
        """The coming step must not run, because of `error` (for a framework callback: a batch
        without IDs, say). Raised at the next optimizer.step(), before it runs; under
        torch.distributed by every rank."""
        self._check_open()
        self._refused = self._refused or error

    def loader(self, loader, *, key=None):
        """The batches of `loader` (a torch DataLoader, also one Accelerate prepared), unchanged,
        each declared to this recorder as it is yielded: `for x, y in rec.loader(loader, key=...)`.
        key: a function of a sample's index in the loader's dataset (through Subset wrappers)
        returning its int ID or its key (str, bytes, UUID); default: the index itself as the ID.
        See pyunlearn.recording.loader."""
        from .loader import DeclaredBatches

        return DeclaredBatches(self, loader, key=key)

    @property
    def steps(self) -> int:
        """The store's step count with every step recorded so far (those of a store this
        recorder continues included): handed to the writer, durable once flushed. On a DDP
        rank that does not write: the steps this recorder took part in (or the loaded state's)."""
        return self._role.steps

    @property
    def key_check(self) -> str | None:
        """The check value of the secret the store maps keys with (for keys.mapped: IDs mapped
        once, in a data set column, that this recorder takes as keys), or None for a store of
        integer IDs. On a rank that holds no store: the writer's store's, as recording started."""
        return self._role.key_check

    @property
    def closed(self) -> bool:
        """Whether close() (or remove()) was called."""
        return self._closed

    def _problem(self) -> tuple[BaseException | None, bool]:
        """What refuses the coming step, if anything, and whether recording stops with it."""
        if self._unreported is not None:  # under torch.distributed: raised on no rank yet, so as it was
            return self._unreported, True
        if self._failed is not None:
            stopped = RecorderError(f"recording stopped ({self._failed}); the store holds the steps before it. Reload "
                                    "a good checkpoint and start a new recorder with the recorder state saved with "
                                    "it (state=...), or truncate the store to its step")
            stopped.__cause__ = self._failed
            return stopped, True
        if self._refused is not None:
            return self._refused, False
        problem = self._role.before_step()
        if problem is not None:
            return problem, not isinstance(problem, ResumeRefused)
        if not self._pending and not self._allow_unlabeled:
            return RecorderError("optimizer.step() with no sample IDs declared since the last step: call "
                                 "rec.batch(ids) for each batch, or pass allow_unlabeled_steps=True"), False
        return None, False

    def _before_step(self, optimizer, args, kwargs):
        self._check_open()
        problem, stops = self._problem()
        if self._dist is None:
            if problem is not None:  # refused before the step runs, so the model is unchanged
                if problem is self._refused:
                    self._refused = None  # raised once
                if isinstance(problem, TrainingChangedError):
                    self._failed = problem  # the step has not run, but the recorder cannot go on
                raise problem
            return
        # One collective a step, before it runs: the global batch, and every rank's refusal.
        refusal = None if problem is None else Refusal.of(problem, self._dist.rank, stops=stops)
        self._step_ids, agreed = self._dist.gather(self._declared(), refusal)
        if agreed is None:
            return
        self._refused = self._unreported = None  # raised now, on every rank
        error = agreed.error(self._dist.world)
        if agreed.stops and self._failed is None:
            self._failed = error
        raise error from (problem if agreed.rank == self._dist.rank else None)

    def _declared(self) -> np.ndarray:
        pending = self._pending
        # batch() keeps its own copies, so a single batch's array is used as it is.
        return pending[0] if len(pending) == 1 else np.concatenate(pending) if pending else np.empty(0, np.int64)

    def _after_step(self, optimizer, args, kwargs):
        ids = self._declared() if self._dist is None else self._step_ids
        self._pending, self._step_ids = [], None  # the next step starts empty
        try:
            recorded = self._role.after_step(ids)
        except (NonFiniteUpdateError, RecorderError) as exc:
            self._failed = exc  # the snapshot no longer matches any recorded state: stop
            if self._dist is None:
                raise
            # One rank raising alone would leave the others in DDP's next all-reduce: every rank
            # raises it before the next step (close() raises it here if none comes).
            self._unreported = exc
            return
        self._role.steps += 1  # counted before the hand-off, which may block while the writer is behind
        self._role.hand_off(recorded)

    def _check_open(self) -> None:
        if self._closed:
            raise RecorderError("the recorder is closed")

    # ----------------------------------------------------------------- checkpoints
    def flush(self) -> int:
        """Makes every step recorded so far durable: hands over the rows the training thread
        holds, waits until the writer appended them, flushes the store and records the model as
        the store's resume point. Returns the committed step count (== rec.steps). Raises the
        writer's error if it failed. Call it from the training thread, between steps."""
        self._check_open()
        steps = self._role.flush(mark=self._failed is None)
        if self._failed is not None:
            raise RecorderError(f"recording stopped ({self._failed}): the {steps} steps before it are flushed, but "
                                "this model is not the one they end with") from self._failed
        return steps

    def state_dict(self) -> dict:
        """The recorder's part of a checkpoint (flushes first): the committed step count and
        the model's fingerprint at that step. Save it with the model and the optimizer, and
        give it to load_state_dict (or UpdateRecorder(..., state=...)) when resuming. The
        recorder can be registered as it is wherever a framework checkpoints objects with
        state_dict / load_state_dict (Accelerate's register_for_checkpointing)."""
        steps = self.flush()
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "steps": steps,
                "fingerprint": self._role.fingerprint_at(steps)}

    def load_state_dict(self, state: dict) -> int:
        """Continues from the checkpoint `state` was saved with (see state_dict); call it with
        that checkpoint's model loaded, before the first step. The model must be the one the
        state describes (ModelMismatchError otherwise). If the store holds more steps than the
        state (an abandoned run went on after the checkpoint) they are dropped, with a
        RuntimeWarning saying how many; returns that number. A store holding fewer steps than
        the state is refused (RecorderError): it lost steps the checkpoint had. Under
        torch.distributed call it on every rank; a refusal is then raised by every rank at the
        next optimizer.step(), before it runs (and this returns 0)."""
        try:
            return self._load_state(state, stacklevel=3)
        except Exception as exc:
            if self._dist is None:
                raise
            self._failed = self._failed or exc
            self._unreported = exc
            return 0

    def _load_state(self, state, *, stacklevel: int) -> int:
        self._check_open()
        if self._failed is not None:
            raise RecorderError(f"recording stopped ({self._failed}): start a new recorder to resume") from self._failed
        steps, model_fingerprint = _parse_state(state)
        dropped = self._role.load_state(steps, model_fingerprint)
        if dropped:
            warnings.warn(f"resuming from the checkpoint at step {steps}: dropped the store's {dropped} later "
                          f"steps (steps {steps}..{steps + dropped - 1}, recorded by a run that went on after "
                          "that checkpoint and was abandoned)", RuntimeWarning, stacklevel=stacklevel)
        return dropped

    # ----------------------------------------------------------------- closing
    def remove(self) -> None:
        """Stops recording: waits for the writer, removes the hooks, flushes the store and
        records the model as the store's final model (unless recording failed, or the model was
        never accepted as the one the store's steps end with). Raises the writer's error, if any.
        Under DDP it involves no collective: the other ranks just remove their hooks, and a
        failure while closing (or one after the last step) is raised on its rank only."""
        if self._closed:
            return
        for hook in self._hooks:
            hook.remove()
        self._closed = True
        self._role.close(mark_final=self._failed is None)
        unreported, self._unreported = self._unreported, None
        if unreported is not None:
            raise RecorderError(f"recording stopped after the last step ({unreported})") from unreported
        if self._refused is not None:
            refused, self._refused = self._refused, None
            raise RecorderError(f"a batch was refused after the last step ({refused}): no step followed, so it "
                                "was never raised on every rank") from refused

    close = remove

    def __enter__(self) -> "UpdateRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()



class _WritingRole:
    """The rank that records: checks the model, optimizer and store once, re-checks them
    cheaply before every step, prunes a row after it and hands it to the background writer."""

    def __init__(self, model, optimizer, store, dist, *, rows_per_handoff, queue_size, flush_every_s, secret=None,
                 sharded: ShardedModel | None = None):
        if not isinstance(store, UpdateStore):
            raise TypeError(f"store must be an UpdateStore, got {type(store).__name__}"
                            + ("" if dist is None else " (on the writer rank; other ranks may pass None)"))
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        queue_size = positive_int("queue_size", queue_size)
        if rows_per_handoff is not None:
            rows_per_handoff = positive_int("rows_per_handoff", rows_per_handoff)
        trained = store.check_model(model)  # the parameters the optimizer updates
        frozen = _check_optimizer(optimizer, store, model, trained)
        family = attribution.family_for(optimizer) if store.attribution == "gradient" else None
        if sharded is not None:
            if family is not None:
                raise RecorderError("gradient attribution reads each step's gradient and optimizer state, which a "
                                    "sharded model spreads over the ranks: record a sharded model with update "
                                    "attribution (UpdateStore.create(..., attribution=\"update\"))")
            model = sharded.view  # the gathered copy: what the store's rows and fingerprints are of
        params = store.check_model(model)
        # One device for the whole model (the snapshot and the pruning live there), one pyunlearn runs on.
        supports(one_device(_named_parameters(model), "model", "recording"))
        _check_secret(secret, store)
        # The write session is this recorder's until close(): forgetting, marking a final model or
        # another recorder through this handle is refused meanwhile.
        self._owner = f"recording (recorder {id(self):x})"
        self._session = contextlib.ExitStack()
        with self._session:
            self._session.enter_context(store.writing(self._owner))  # fail now, not after steps went unrecorded
            if store.steps == 0 and not same_model(params, store.initial_fingerprint):
                raise ModelMismatchError("the model differs from the one the store was created for: create the "
                                         "store from the model as training starts")
            if family is not None:
                store.set_optimizer_family(family.name)
            self._session = self._session.pop_all()  # the session stays open until close()
        self._model, self._optimizer, self._store, self._dist = model, optimizer, store, dist
        self._params, self._family, self._sharded = params, family, sharded
        self._trained = trained
        self._names = [layer.name for layer in store.layers]
        # What the per-step checks compare against (_changed): cheap to read back every step.
        self._param_ids = _optimizer_param_ids(optimizer)
        self._layout = [(p.dtype, p.device, p.shape) for p in trained]
        self._frozen = frozen  # (name, parameter): in the optimizer, not recorded, must stay frozen
        self.steps = store.steps
        self._records_lr = store.metadata.records_hyper and family is None  # update stores since format 4
        self._forgotten = store.forgotten_ids()  # no deletion can come while the recorder holds the lock
        # A store that already has steps continues only from the model they end with; checked
        # at the first step (or settled by load_state), when the checkpoint's model is loaded.
        self._resume_pending = store.steps > 0
        self._rows = self._make_rows()
        self._writer = BackgroundWriter(
            store, rows_per_handoff or max(1, min(64, (1 << 20) // max(1, store.row_length * 6))), queue_size,
            flush_every_s)

    def ids_for(self, values) -> np.ndarray:
        """A batch's IDs: keys mapped with the store's secret (the first keys make an empty store
        a store of keys: UpdateStore.register_keys), integers on a store of integers; refused if
        a deletion request asked for any of them (training on them again would undo the deletion)."""
        store = self._store
        if type(values) is torch.Tensor and values.dtype is torch.int64 and values.dim() == 1 and \
                values.device.type == "cpu" and values.numel() and not store.metadata.keyed:
            ids = values.detach().numpy()  # what as_ids makes of it, without ~20 µs of its checks every batch
        else:
            if not store.metadata.keyed and store.steps == 0 and keys.is_keys(values):
                store.register_keys()  # an explicit call: the store records the secret's check value
            ids = np.asarray(store.ids_for(values), dtype=np.int64)
        return refuse_forgotten(ids, self._forgotten)

    @property
    def key_check(self) -> str | None:
        return self._store.metadata.key_check

    def share_keys(self, dist: "Distributed", error: BaseException | None = None) -> None:
        meta, check = self._store.metadata, None
        try:
            check = meta.key_check or self._store.keys.check()
        except (OSError, TypeError, ValueError) as exc:  # a secret file that is missing, a secret too short
            error = error or exc
        dist.agree_on_keys(check, self._forgotten, store=(meta.key_check, meta.key_mapping, meta.committed_steps),
                           error=error)

    def _make_rows(self):
        if self._family is not None:
            return GradientRows(self._family(self._optimizer, self._params), self._store, self._names)
        if backend_for(self._params[0].device).device_path:
            return DeviceUpdateRows(self._params, self._store, self._names)
        return UpdateRows(self._params, self._store, self._names)

    # ----------------------------------------------------------------- per step
    def before_step(self) -> "RecorderError | None":
        """What refuses the coming step, if anything (the recorder raises it, under
        torch.distributed on every rank): the writer thread's failure, a change since recording
        started, a model the store's steps do not end with."""
        problem = self._writer.failure() or self._changed()
        if problem is None and self._resume_pending:
            problem = self._settle_resume()
        return problem

    def _changed(self) -> "TrainingChangedError | None":
        """What changed since recording started that would make the recorded steps wrong, or
        None. Runs before every step, so it compares only cheap facts."""
        if _optimizer_param_ids(self._optimizer) != self._param_ids:  # ~0.1 µs a parameter in all
            now = _optimizer_param_ids(self._optimizer)
            added, removed = len(set(now) - set(self._param_ids)), len(set(self._param_ids) - set(now))
            what = f"{added} added, {removed} removed" if added or removed else "the same ones, reordered"
            return TrainingChangedError(
                f"the optimizer's parameters changed since recording started ({what}; "
                "optimizer.add_param_group or an edit of param_groups): a parameter outside the store's layer table "
                "would change the model unrecorded, one left out would be recorded as unchanged. This step did not "
                "run; recording stopped and close() will not mark a final model (the model still holds the weights "
                "after the last recorded step: store.mark_final(model) if training ends here). A store records the "
                "parameters that were trainable when it was created: to train others too (an unfrozen layer), "
                "close the recorder before changing the optimizer and record the rest of training into a new store "
                "created from the model as it is then")
        for (dtype, device, shape), p, name in zip(self._layout, self._trained, self._names):
            if p.dtype is not dtype or p.device != device or p.shape != shape:
                return TrainingChangedError(
                    f"parameter {name} changed from {dtype} on {device}, shape {tuple(shape)}, to {p.dtype} on "
                    f"{p.device}, shape {tuple(p.shape)}, since recording started (model.half(), model.to(...) or "
                    "param.data = ...): the conversion changes the weights outside any recorded step, so the store "
                    "would no longer describe the model. This step did not run; recording stopped and close() will "
                    "not mark a final model. Convert the model before creating its store, or close the recorder "
                    "before converting and record the rest of training into a new store created from the converted "
                    "model")
        for name, p in self._frozen:
            if p.requires_grad or p.grad is not None:
                return TrainingChangedError(
                    f"parameter {name} was frozen (requires_grad=False) when recording started, so the store does "
                    f"not record it, but it now {'requires grad' if p.requires_grad else 'has a gradient'}: this "
                    "step would change it unrecorded. This step did not run; recording stopped and close() will "
                    "not mark a final model (the model still holds the weights after the last recorded step: "
                    "store.mark_final(model) if training ends here). To train it too, close the recorder before "
                    "unfreezing and record the rest of training into a new store created from the model as it is "
                    "then")
        if self._family is not None:
            try:
                self._family.check(self._optimizer)
            except ValueError as exc:
                return TrainingChangedError(
                    f"the optimizer's settings changed since recording started: {exc}. This step did not run; "
                    "recording stopped and close() will not mark a final model")
        return None

    def _settle_resume(self) -> "ResumeRefused | None":
        """For a store that had steps when recording started: accepts the model if the timeline
        lets training go on from it (pyunlearn.ledger.continue_training; then the recorder
        starts from it), or returns the refusal that says what to do."""
        store = self._store
        try:
            store.continue_training(Fingerprints(self._params))  # stored values may use an older algorithm
        except ResumeRefused as exc:
            return exc
        self._forgotten = store.forgotten_ids()
        self._resumed(store.steps)
        return None

    def _resumed(self, steps: int) -> None:
        """Recording continues from the model as it is now, after `steps` steps."""
        self._resume_pending = False
        self.steps = steps
        self._rows = self._make_rows()  # a fresh snapshot (and momentum carry-in) of the loaded model

    def after_step(self, ids: np.ndarray) -> tuple:
        """This step's (row, global batch IDs, hyper-parameters)."""
        if self._sharded is not None:
            self._sharded.gather()  # a collective: before anything here may fail
        row, hyper = self._rows(self.steps)
        if hyper is None and self._records_lr:
            hyper = (_learning_rate(self._optimizer),)
        return row, ids, hyper

    def hand_off(self, recorded: tuple) -> None:
        self._writer.put(recorded)

    # ----------------------------------------------------------------- checkpoints
    def flush(self, mark: bool) -> int:
        self._writer.drain()
        self._writer.raise_error()
        self._store.flush()
        if mark and self._resume_pending:
            refusal = self._settle_resume()
            if refusal is not None:
                raise refusal
        if mark:
            point = self._store.resume_point
            if point is None or point.steps != self.steps or not point.fingerprint:
                self._store.mark_resume_point(self._model, steps=self.steps)
        return self.steps

    def fingerprint_at(self, steps: int) -> str:
        point = self._store.resume_point  # flush() recorded it
        if point is None or point.steps != steps or not point.fingerprint:
            raise RecorderError(f"{self._store.path} changed while the recorder state was taken: its resume point is "
                                f"{point}, not the model after step {steps}")
        return point.fingerprint

    def load_state(self, steps: int, model_fingerprint: str) -> int:
        store = self._store
        self._writer.drain()
        self._writer.raise_error()
        store.flush()
        model = Fingerprints(self._params)  # one hash per algorithm for every comparison below
        if not model.matches(model_fingerprint):
            raise ModelMismatchError(STATE_MISMATCH)
        n = store.steps
        if n < steps:
            raise RecorderError(
                f"the checkpoint was saved after step {steps}, but {store.path} holds only {n} committed steps: the "
                "store lost steps the checkpoint had (it was not flushed before the checkpoint was saved, e.g. the "
                "checkpoint's recorder state did not come from rec.state_dict(), or the store was truncated or "
                f"restored from an older copy since). Resume from a checkpoint saved at step {n} or earlier, with "
                "its recorder state, or record into a new store")
        point = store.resume_point
        if n == steps:
            final = store.final_model
            known = point.fingerprint if point is not None and point.steps == n and point.fingerprint else \
                (final.fingerprint if point is None and final is not None else None)
            if known and not model.matches(known) and store.ledger.find_model(model, steps=n) is None:
                raise RecorderError(
                    f"{store.path} holds {n} steps, as the checkpoint does, but they end with another model: another "
                    "run went on from an earlier checkpoint and replaced the steps this one saw. Resume from a "
                    "checkpoint older than that branch point (with its recorder state), or record into a new store")
        else:
            after = ledger.truncation(store.ledger, point, steps)
            if after.allowed and after.point.fingerprint and not model.matches(after.point.fingerprint):
                raise RecorderError(
                    f"after step {steps} {store.path}'s timeline holds another model ({after.point.fingerprint}): a "
                    "deletion was applied to this checkpoint's model since it was saved, and training must go on "
                    "from the model it produced. Resume from that model's checkpoint, or bring this one up to date "
                    "first: pyunlearn.amnesiac_forget(model, store, [])")
            store.truncate(steps)
        store.continue_training(model)  # ResumeRefused where a deletion's steps are still in it
        self._forgotten = store.forgotten_ids()
        store.mark_resume_point(self._model, steps=steps)
        self._resumed(steps)
        return n - steps

    def close(self, mark_final: bool) -> None:
        with self._session:  # releases the writer lock at the end if the recorder took it
            self._writer.stop()
            self._writer.raise_error()
            self._store.flush()
            # A model holding an unrecorded update, or one never accepted as the one the
            # store's steps end with, is not the final model.
            if mark_final and (not self._resume_pending or self._settle_resume() is None):
                self._store.mark_final(self._model, owner=self._owner)


def _check_secret(secret, store) -> None:
    """The recorder's secret= on the writer rank must be the store's: the store maps the keys."""
    if secret is None:
        return
    given = keys.KeyHasher.resolve(secret).check
    have = store.metadata.key_check or store.keys.check()
    if have is None:
        raise KeyMappingError(f"secret= was given to the recorder, but {store.path} has no secret: give it to the store "
                              "(UpdateStore.create/open(..., secret=...)), which maps the keys on the writer rank; the "
                              "recorder's secret= maps them on ranks that hold no store")
    if have != given:
        raise KeyMappingError(f"the recorder's secret= is not the secret {store.path} maps keys with: give every rank, "
                              "and the store, the same secret")


def _learning_rate(optimizer) -> float:
    """The step's learning rate, if every parameter group uses the same one; NaN otherwise (or
    where reading it would wait for a GPU: a learning rate held in a device tensor)."""
    rates = {group.get("lr") for group in optimizer.param_groups}
    rate = rates.pop() if len(rates) == 1 else None
    if isinstance(rate, torch.Tensor):
        return float(rate) if rate.device.type == "cpu" and rate.numel() == 1 else math.nan
    return float(rate) if isinstance(rate, (int, float)) else math.nan


def _optimizer_param_ids(optimizer) -> list[int]:
    return [id(p) for group in optimizer.param_groups for p in group["params"]]


def _seconds_or_none(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, or None, got {value!r}")
    return float(value)


def _parse_state(state) -> tuple[int, str]:
    """(steps, fingerprint) of a recorder state (UpdateRecorder.state_dict), checked."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError("state must be a recorder state, as UpdateRecorder.state_dict() returns "
                         f"(a dict with format {STATE_FORMAT!r}); got {type(state).__name__}")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"recorder state version {state.get('version')!r}: this pyunlearn reads version {STATE_VERSION}")
    steps, model_fingerprint = state.get("steps"), state.get("fingerprint")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0 or not isinstance(model_fingerprint, str):
        raise ValueError(f"malformed recorder state: steps {steps!r}, fingerprint {model_fingerprint!r}")
    return steps, model_fingerprint


def _check_optimizer(optimizer, store, model, params) -> list[tuple[str, torch.nn.Parameter]]:
    """The optimizer must update exactly the recorded parameters: a parameter it skips would be
    recorded as unchanged, one it adds would change the model unrecorded. It may also hold the
    model's frozen parameters (requires_grad=False, so the optimizer leaves them alone): those
    are returned as (name, parameter), for the per-step check that they stay frozen."""
    in_optimizer = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    missing = [layer.name for layer, p in zip(store.layers, params) if id(p) not in in_optimizer]
    recorded = {id(p) for p in params}
    frozen_in_model = {id(p): name for name, p in _named_parameters(model) if not p.requires_grad}
    frozen = [(frozen_in_model[i], p) for i, p in in_optimizer.items() if i not in recorded and i in frozen_in_model]
    extra = len(in_optimizer) - len(recorded & in_optimizer.keys()) - len(frozen)
    if missing or extra:
        raise ValueError(f"the optimizer's parameters are not the model's trainable parameters: it lacks "
                         f"{missing[:5]} and has {extra} others (neither recorded parameters nor frozen ones of "
                         "the model); give it model.parameters()")
    return frozen


def _named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Names as the store writes them (_model.trainable_parameters): torch.compile's `_orig_mod`
    left out, also where a submodule was compiled."""
    return [(".".join(part for part in name.split(".") if part != "_orig_mod"), p)
            for name, p in model.named_parameters()]


def unwrap_optimizer(optimizer):
    """The torch optimizer inside Accelerate's AcceleratedOptimizer or Lightning's
    LightningOptimizer (wrappers that never ran torch.optim.Optimizer.__init__, so they have no
    step hooks of their own: their step() calls the wrapped optimizer's, which is hooked).
    Anything else is returned as it is."""
    for _ in range(8):  # wrappers of wrappers, never a cycle
        if "_optimizer_step_pre_hooks" in getattr(optimizer, "__dict__", {}):
            return optimizer  # a real torch optimizer (AcceleratedOptimizer subclasses one, uninitialised)
        inner = next((getattr(optimizer, a) for a in ("optimizer", "_optimizer")
                      if isinstance(getattr(optimizer, a, None), torch.optim.Optimizer)), None)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


def unwrap_model(model):
    """The module inside DistributedDataParallel (and DataParallel) or torch.compile's
    OptimizedModule: the one whose parameter names the store holds."""
    for _ in range(8):
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module) and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model
    return model
