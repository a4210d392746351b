"""What the framework callbacks share: the store argument (an UpdateStore, or a path that the
writer rank creates or opens, so every rank can be given the same arguments), and a check that
every DDP rank got its recorder before any rank trains."""
from __future__ import annotations

import logging
import os
from typing import Any

from ..errors import ModelMismatchError, RecorderError, StoreError, StoreFormatError, StoreNotFoundError
from ..keys import KeyHasher
from ..store import UpdateStore

logger = logging.getLogger("pyunlearn.integrations")


class StoreSpec:
    """RecordUpdates' `store`, `create`, `storage_options`, `secret` and `exist_ok` arguments, checked."""

    def __init__(self, store, create: dict[str, Any] | None, storage_options, *, secret=None, exist_ok: bool = True):
        if not isinstance(store, (UpdateStore, str, os.PathLike)):
            raise TypeError(f"store must be an UpdateStore or a path (str or os.PathLike) to create or open on the "
                            f"writer rank, got {type(store).__name__}")
        if create is not None and not isinstance(create, dict):
            raise TypeError(f"create must be a dict of UpdateStore.create options (keep=..., value_dtype=...), "
                            f"got {type(create).__name__}")
        if isinstance(store, UpdateStore) and (create is not None or storage_options is not None):
            raise TypeError("create= and storage_options= go with a store path, not an UpdateStore")
        if create is not None and {"path", "model", "storage_options", "secret"} & create.keys():
            raise TypeError("create= holds UpdateStore.create's options only (keep, value_dtype, attribution, "
                            "overwrite, ...): the path is `store`, the model is the trained one, and "
                            "storage_options and secret are arguments of their own")
        if not isinstance(exist_ok, bool):
            raise TypeError(f"exist_ok must be True or False, got {exist_ok!r}")
        if secret is not None:
            KeyHasher.resolve(secret)  # a secret too short or of the wrong type: say so now, not on the writer rank
        self.store, self.create, self.storage_options = store, create, storage_options
        self.secret, self.exist_ok = secret, exist_ok

    def resolve(self, model, *, writes: bool, resuming: bool, keyed: bool = False) -> UpdateStore | None:
        """The store the recorder writes: on the writer rank the given UpdateStore, or the path
        created from `model` (with `create`) or opened (without it, when resuming from a
        checkpoint, whose store must go on, or when it exists and exist_ok: then it must record
        this model's layer table with the options `create` asks for); None on the other ranks of a
        DDP run. keyed: make a new store a store of keys from the start (the batches carry IDs
        mapped from keys, keys.MappedIds), with `secret` or the one in the environment."""
        if isinstance(self.store, UpdateStore):
            return self.store if writes else None
        if not writes:
            return None
        secret = self.secret
        if self.create is not None and not resuming:
            if keyed and secret is None:
                secret = KeyHasher.resolve(None)  # the environment's: the store must map keys from its first step
            try:
                store = UpdateStore.create(self.store, model, storage_options=self.storage_options, secret=secret,
                                           **self.create)
            except FileExistsError as exc:
                if not self.exist_ok:
                    raise
                store = self._reopen(model, exc)
            else:
                logger.info("recording into a new store %s (%d layers, keep %s)", store.path, len(store.layers),
                            store.keep)
                return store
        else:
            store = UpdateStore.open(self.store, storage_options=self.storage_options, secret=secret)
        logger.info("recording into %s, which holds %d steps%s", store.path, store.steps,
                    " (resuming from a checkpoint)" if resuming else "")
        return store

    def _reopen(self, model, exists: FileExistsError) -> UpdateStore:
        """The existing store at the path, if it records `model`'s layer table as `create` asks;
        else the refusal says what differs."""
        try:
            store = UpdateStore.open(self.store, storage_options=self.storage_options, secret=self.secret)
        except (StoreNotFoundError, StoreFormatError):
            raise exists from None  # the path holds something that is not an update store: never touch it
        try:
            try:
                store.check_model(model)
            except ModelMismatchError as exc:
                raise ModelMismatchError(
                    f"{store.path} already holds an update store, of another model ({exc}): record into another "
                    "path, or replace it with create=dict(..., overwrite=True)") from None
            differ = [f"{name} {getattr(store, name)!r} (create= asks for {self.create[name]!r})"
                      for name in ("keep", "value_dtype", "attribution")
                      if name in self.create and getattr(store, name) != self.create[name]]
            if differ:
                raise StoreError(f"{store.path} already holds an update store of this model, recorded with "
                                 f"{', '.join(differ)}: record into another path, replace it with "
                                 "create=dict(..., overwrite=True), or ask for its options")
        except BaseException:
            store.close()
            raise
        logger.info("%s exists: reopened it (exist_ok=True)", store.path)
        return store

    @property
    def owned(self) -> bool:
        """Whether the callback opened the store (and so closes it at the end of training)."""
        return not isinstance(self.store, UpdateStore)

    def close(self, recorder, store) -> None:
        """Closes the recorder (flushing the store and marking the final model) and the store if
        the callback opened it from a path."""
        try:
            if recorder is not None:
                recorder.close()
        finally:
            if self.owned and store is not None:
                store.close()


def distributed_rank() -> tuple[int, int] | None:
    """(rank, world size) when torch.distributed runs more than one process, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def all_ranks_ready(error: BaseException | None) -> None:
    """Under DDP, one collective at the start: if any rank failed to set up recording (the
    writer rank's store could not be created or opened, say), every rank raises, instead of the
    others training into a collective the failed rank never reaches. The failing rank re-raises
    its own error."""
    if distributed_rank() is None:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else f"rank {dist.get_rank()}: {error!r}")
    if error is not None:
        raise error
    failed = [f for f in failures if f is not None]
    if failed:
        raise RecorderError(f"recording could not start on every rank ({'; '.join(failed)}); every rank stops")
