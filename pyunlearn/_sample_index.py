"""Which committed steps used which sample IDs: the store's lookup from IDs to steps."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class StepLookup(NamedTuple):
    steps: np.ndarray  # int64, sorted, unique: the steps whose batches held any of the IDs
    missing: np.ndarray  # int64, sorted, unique: IDs no committed step used


class SampleIndex:
    """Every (ID, step) pair of a range of steps sorted by ID, built from the store's CSR arrays
    (sample_ids, offsets): how steps outside the persistent index's runs are searched."""

    def __init__(self, sample_ids: np.ndarray, offsets: np.ndarray, *, first_step: int = 0):
        """offsets[s] − offsets[0] .. is where step first_step + s starts in sample_ids."""
        step_of = np.repeat(np.arange(first_step, first_step + len(offsets) - 1, dtype=np.int64), np.diff(offsets))
        order = np.argsort(sample_ids, kind="stable")
        self._ids, self._step_of = sample_ids[order], step_of[order]

    def lookup(self, ids: np.ndarray) -> StepLookup:
        left = np.searchsorted(self._ids, ids, side="left")
        right = np.searchsorted(self._ids, ids, side="right")
        counts = right - left
        # Every position in the [left, right) ranges, without a Python loop.
        positions = np.repeat(left - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        return StepLookup(np.unique(self._step_of[positions]), np.unique(ids[counts == 0]))
