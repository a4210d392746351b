"""Declaring a DataLoader's batches to the recorder without touching the loop body:

    for x, y in rec.loader(loader, key=lambda index: users[index]):
        optimizer.zero_grad(); loss(model(x), y).backward(); optimizer.step()

How: the loader's batch sampler decides which dataset indices make each batch, so the helper
iterates a shallow copy of the loader whose batch sampler is wrapped: it passes every index list
on unchanged and queues it. Each batch the copy yields is the next queued list's (a DataLoader
yields batches in the order it sampled them, also with worker processes; `in_order=False` is
refused), so as a batch reaches the loop its samples' keys are declared (rec.batch), then the
batch is handed over as it is. The loader given is left as it is, and the batches are the ones
it would yield: the same sampler, generator and random draws (a shuffled loader gives the same
order under the same seed with or without the helper).

Accelerate's prepared loaders (DataLoaderShard, with its one-batch read-ahead and skipped
batches after a resume) are copied the same way, through the DataLoader they wrap; a
DataLoaderDispatcher (dispatch_batches=True) is refused: its main process samples the whole
global batch and slices it after collation, so which samples reach each rank is not the index
list. Iterable-style datasets have no indices: declare their batches with rec.batch.
"""
from __future__ import annotations

import collections
from typing import Any, Callable

import numpy as np
import torch

from ..data import root_index

__all__ = ["DeclaredBatches"]


class DeclaredBatches:
    """The batches of `loader`, each declared to `recorder` as it is yielded (see the module
    docstring). key: a function of a sample's index in the loader's dataset (through Subset
    wrappers, as pyunlearn.data.IdDataset) returning its int ID or key; None: the index is the ID.
    `len()` and other attributes are the loader's; set_epoch() reaches the copy being iterated."""

    def __init__(self, recorder, loader, *, key: Callable[[int], Any] | None = None):
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of a sample's index in the dataset, got {type(key).__name__}")
        self._recorder, self._key = recorder, key
        self._queue: collections.deque = collections.deque()
        self._loader = _with_batch_sampler(loader, self._wrap, skip=0)
        self._dataset = self._loader.dataset

    def _wrap(self, batch_sampler, skip: int):
        return _QueueingBatchSampler(batch_sampler, self._queue, skip)

    def __iter__(self):
        for batch in self._loader:
            if not self._queue:
                raise RuntimeError("the loader yielded a batch its batch sampler never sampled: pyunlearn cannot tell "
                                   "which samples it holds (a loader that reorders or makes batches itself); declare "
                                   "them with rec.batch")
            self._recorder.batch(self._keys(self._queue.popleft()))
            yield batch

    def _keys(self, indices):
        dataset, key = self._dataset, self._key
        if key is None:
            return np.fromiter((root_index(dataset, i) for i in indices), dtype=np.int64, count=len(indices))
        values = [key(root_index(dataset, i)) for i in indices]
        if values and isinstance(values[0], torch.Tensor):  # a key function returning 0-d ID tensors
            values = [int(v) for v in values]
        return values

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the copy's sampler (Accelerate's loaders; DistributedSampler.set_epoch)."""
        if hasattr(self._loader, "set_epoch"):
            self._loader.set_epoch(epoch)
        elif hasattr(self._loader.sampler, "set_epoch"):
            self._loader.sampler.set_epoch(epoch)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._loader, name)


class _QueueingBatchSampler:
    """A batch sampler passing its inner one's index lists on, and queueing each (after the
    first `skip`, which the loader drops unseen); other attributes are the inner one's (so
    Accelerate and DistributedSampler's set_epoch reach the sampler inside)."""

    def __init__(self, inner, queue: collections.deque, skip: int):
        self.inner, self._queue, self._skip = inner, queue, skip

    def __iter__(self):
        self._queue.clear()  # a new pass over the data (a persistent-workers loader restarts its sampler too)
        skip = self._skip
        for indices in self.inner:
            if skip:
                skip -= 1
            else:
                self._queue.append(list(indices))
            yield indices

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):
        if name in ("inner", "_queue", "_skip"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def _with_batch_sampler(loader, wrap, *, skip: int):
    """A shallow copy of `loader` whose batch sampler is wrap(its batch sampler, skip): the loader
    given is not changed (a DataLoader refuses a new batch sampler once built, so the copy's is
    set in its __dict__). Accelerate's adapters hold the DataLoader they iterate in
    `base_dataloader`: that one is copied the same way."""
    state = vars(loader) if hasattr(loader, "__dict__") else {}
    kind = type(loader)  # the real class: Accelerate's adapters report the wrapped loader's as __class__
    if kind.__name__ == "DataLoaderDispatcher":
        raise ValueError("rec.loader cannot follow a loader that dispatches batches (Accelerate's "
                         "dispatch_batches=True, the default for iterable datasets): the main process samples the "
                         "global batch and slices it after collation, so each rank's samples are not an index list. "
                         "Declare each batch's IDs with rec.batch (e.g. from an ID column)")
    if "base_dataloader" not in state and not isinstance(loader, torch.utils.data.DataLoader):
        raise TypeError(f"rec.loader needs a torch.utils.data.DataLoader (or one Accelerate prepared), got "
                        f"{kind.__name__}: declare each batch's IDs with rec.batch")
    clone = object.__new__(kind)
    clone.__dict__.update(state)
    if "base_dataloader" in state:
        skip += int(state.get("skip_batches", 0) or 0)  # Accelerate drops these after sampling them
        clone.__dict__["base_dataloader"] = _with_batch_sampler(state["base_dataloader"], wrap, skip=skip)
        return clone
    if isinstance(loader.dataset, torch.utils.data.IterableDataset) or loader.batch_sampler is None:
        raise ValueError("rec.loader follows the loader's batch sampler, which "
                         + ("an iterable-style dataset does not index" if isinstance(
                             loader.dataset, torch.utils.data.IterableDataset) else
                            "a loader without automatic batching (batch_size=None) does not have")
                         + ": declare each batch's IDs with rec.batch")
    if getattr(loader, "in_order", True) is False:
        raise ValueError("rec.loader needs the batches in the order they were sampled: build the DataLoader with "
                         "in_order=True (the default)")
    clone.__dict__["batch_sampler"] = wrap(loader.batch_sampler, skip)
    clone.__dict__["_iterator"] = None  # a persistent-workers iterator holds the old sampler
    return clone
