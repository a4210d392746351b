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
write, FollowerRole (only takes part in gathering the IDs). A row comes from UpdateRows (Δθ
against a snapshot, on the CPU), DeviceUpdateRows (the same on a device) or GradientRows (the
optimizer family's vectors, pyunlearn.attribution).
"""
from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch

from .. import attribution, keys, ledger
from .._validate import positive_int
from ..errors import ModelMismatchError, NonFiniteUpdateError, RecorderError, ResumeRefused, TrainingChangedError
from ..kernels import Fingerprints, same_model, supports
from ..kernels.backends import backend_for
from ..kernels.checks import one_device
from ..store import UpdateStore
from .continuation import refuse_forgotten
from .distributed import STATE_MISMATCH, Distributed, FollowerRole
from .row_sources import DeviceUpdateRows, GradientRows, UpdateRows
from .writer import BackgroundWriter

__all__ = ["UpdateRecorder", "unwrap_model", "unwrap_optimizer"]

STATE_FORMAT = "pyunlearn.recorder-state"
STATE_VERSION = 1


class UpdateRecorder:
    """Records every optimizer step of `model` into `store`.

    model: the module the store was created from, or the same module wrapped by DDP or
    torch.compile; on the CPU or on one CUDA device (a model spread over devices is refused). optimizer: a torch optimizer, or one wrapped by Accelerate
    (AcceleratedOptimizer) or Lightning (its step hooks go on the wrapped one); it must update
    exactly the model's trainable parameters (those in the store's layer table), and may also
    hold frozen ones (requires_grad=False: not recorded, and refused if they start to train).
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
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, store: UpdateStore | None, *,
                 allow_unlabeled_steps: bool = False, rows_per_handoff: int | None = None, queue_size: int = 8,
                 writer_rank: int = 0, flush_every_s: float | None = 60.0, state: dict | None = None):
        flush_every_s = _seconds_or_none("flush_every_s", flush_every_s)
        optimizer = unwrap_optimizer(optimizer)  # Accelerate's and Lightning's wrappers: hook the torch optimizer
        model = unwrap_model(model)  # DDP, torch.compile: the store names the module's own parameters
        dist = Distributed.current(writer_rank)
        if dist is not None and not dist.writes:
            self._role = FollowerRole(model, dist)
        else:
            self._role = _WritingRole(model, optimizer, store, dist, rows_per_handoff=rows_per_handoff,
                                      queue_size=queue_size, flush_every_s=flush_every_s)
        self._allow_unlabeled = bool(allow_unlabeled_steps)
        self._pending: list[np.ndarray] = []
        self._failed: BaseException | None = None
        self._closed = False
        if dist is not None:
            self._role.share_keys(dist)
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step)]
        if state is not None:
            try:
                self._load_state(state, stacklevel=3)
            except BaseException:
                self._failed = RecorderError("the recorder state could not be loaded")
                with contextlib.suppress(Exception):
                    self.remove()
                raise

    # ----------------------------------------------------------------- the training side
    def batch(self, ids) -> None:
        """Declares the sample IDs used since the last step (several calls add up, as with
        gradient accumulation)."""
        self._check_open()
        # A copy: the IDs may be a view of the caller's tensor or array, which a loop may refill
        # for the next micro-batch before the step (as_ids and the int64 fast path both return views).
        self._pending.append(self._role.ids_for(ids).copy())

    @property
    def steps(self) -> int:
        """The store's step count with every step recorded so far (those of a store this
        recorder continues included): handed to the writer, durable once flushed. On a DDP
        rank that does not write: the steps this recorder took part in (or the loaded state's)."""
        return self._role.steps

    @property
    def closed(self) -> bool:
        """Whether close() (or remove()) was called."""
        return self._closed

    def _before_step(self, optimizer, args, kwargs):
        self._check_open()
        if self._failed is not None:
            raise RecorderError(f"recording stopped ({self._failed}); the store holds the steps before it. Reload "
                                "a good checkpoint and start a new recorder with the recorder state saved with it "
                                "(state=...), or truncate the store to its step") from self._failed
        try:
            self._role.before_step()
        except TrainingChangedError as exc:  # the step has not run, but the recorder cannot go on
            self._failed = exc
            raise
        if not self._pending and not self._allow_unlabeled:
            # Refused before the step runs, so the model is unchanged.
            raise RecorderError("optimizer.step() with no sample IDs declared since the last step: call "
                                "rec.batch(ids) for each batch, or pass allow_unlabeled_steps=True")

    def _after_step(self, optimizer, args, kwargs):
        pending, self._pending = self._pending, []  # this step's IDs; the next step starts empty
        # batch() keeps its own copies, so a single batch's array is used as it is.
        ids = pending[0] if len(pending) == 1 else np.concatenate(pending) if pending else np.empty(0, np.int64)
        try:
            recorded = self._role.after_step(ids)
        except (NonFiniteUpdateError, RecorderError) as exc:
            self._failed = exc  # the snapshot no longer matches any recorded state: stop
            raise
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
        give it to load_state_dict (or UpdateRecorder(..., state=...)) when resuming."""
        steps = self.flush()
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "steps": steps,
                "fingerprint": self._role.fingerprint_at(steps)}

    def load_state_dict(self, state: dict) -> int:
        """Continues from the checkpoint `state` was saved with (see state_dict); call it with
        that checkpoint's model loaded, before the first step. The model must be the one the
        state describes (ModelMismatchError otherwise). If the store holds more steps than the
        state (an abandoned run went on after the checkpoint) they are dropped, with a
        RuntimeWarning saying how many; returns that number. A store holding fewer steps than
        the state is refused (RecorderError): it lost steps the checkpoint had."""
        return self._load_state(state, stacklevel=3)

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



class _WritingRole:
    """The rank that records: checks the model, optimizer and store once, re-checks them
    cheaply before every step, prunes a row after it and hands it to the background writer."""

    def __init__(self, model, optimizer, store, dist, *, rows_per_handoff, queue_size, flush_every_s):
        if not isinstance(store, UpdateStore):
            raise TypeError(f"store must be an UpdateStore, got {type(store).__name__}"
                            + ("" if dist is None else " (on the writer rank; other ranks may pass None)"))
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        queue_size = positive_int("queue_size", queue_size)
        if rows_per_handoff is not None:
            rows_per_handoff = positive_int("rows_per_handoff", rows_per_handoff)
        params = store.check_model(model)
        frozen = _check_optimizer(optimizer, store, model, params)
        family = attribution.family_for(optimizer) if store.attribution == "gradient" else None
        # One device for the whole model (the snapshot and the pruning live there), one pyunlearn runs on.
        supports(one_device(_named_parameters(model), "model", "recording"))
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
        self._params, self._family = params, family
        self._names = [layer.name for layer in store.layers]
        # What the per-step checks compare against (_changed): cheap to read back every step.
        self._param_ids = _optimizer_param_ids(optimizer)
        self._layout = [(p.dtype, p.device, p.shape) for p in params]
        self._frozen = frozen  # (name, parameter): in the optimizer, not recorded, must stay frozen
        self.steps = store.steps
        self._records_lr = store.metadata.records_hyper and family is None  # update stores since format 4
        self._forgotten = store.forgotten_ids()  # no deletion can come while the recorder holds the lock
        # A store that already has steps continues only from the model they end with; checked
        # at the first step (or settled by load_state), when the checkpoint's model is loaded.
        self._resume_pending = store.steps > 0
        self._deferred: RecorderError | None = None  # under DDP: a refusal raised through the gather
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

    def share_keys(self, dist: "Distributed") -> None:
        meta = self._store.metadata
        dist.agree_on_keys(meta.key_check or self._store.keys.check(), self._forgotten,
                           store=(meta.key_check, meta.key_mapping, meta.committed_steps))

    def _make_rows(self):
        if self._family is not None:
            return GradientRows(self._family(self._optimizer, self._params), self._store, self._names)
        if backend_for(self._params[0].device).device_path:
            return DeviceUpdateRows(self._params, self._store, self._names)
        return UpdateRows(self._params, self._store, self._names)

    # ----------------------------------------------------------------- per step
    def before_step(self) -> None:
        if self._dist is None:  # under DDP the writer's error reaches every rank through the gather
            self._writer.raise_error()
        problem = self._changed()
        if problem is None and self._resume_pending:
            problem = self._settle_resume()
        if problem is not None:
            if self._dist is None:
                raise problem  # before the step: the model and the store are unchanged
            self._deferred = problem  # every rank must reach the gather, where all of them raise it

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
        for (dtype, device, shape), p, name in zip(self._layout, self._params, self._names):
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
        row, hyper, failure = None, None, self._deferred
        self._deferred = None
        if failure is None:
            try:
                row, hyper = self._rows(self.steps)
            except NonFiniteUpdateError as exc:
                failure = exc
            if hyper is None and self._records_lr:
                hyper = (_learning_rate(self._optimizer),)
        if self._dist is not None:  # the global batch: every rank's IDs; a failure stops all ranks
            ids = self._dist.gather(ids, failure or self._writer.error)
        if failure is not None:
            raise failure
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
