"""Data sets with stable int64 sample IDs, as the recorder needs them.

`digits()` is scikit-learn's bundled 8×8 digits set (1797 images, no download): the embedded
default for the demo and tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


@dataclass
class SampleSet:
    """Samples with IDs: ids (int64), x (float32), y (int64 labels), all on the CPU."""

    ids: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if not (len(self.ids) == len(self.x) == len(self.y)):
            raise ValueError(f"ids, x and y differ in length: {len(self.ids)}, {len(self.x)}, {len(self.y)}")
        if self.ids.dtype != torch.int64 or self.y.dtype != torch.int64:
            raise TypeError("ids and y must be int64 tensors")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, selection) -> "SampleSet":
        """The samples at positions `selection` (indices or a boolean mask)."""
        selection = torch.as_tensor(selection)
        return SampleSet(self.ids[selection], self.x[selection], self.y[selection])

    def without(self, ids) -> "SampleSet":
        """All samples whose ID is not in `ids`."""
        drop = torch.isin(self.ids, torch.as_tensor(np.asarray(ids), dtype=torch.int64))
        return self.subset(~drop)

    def with_ids(self, ids) -> "SampleSet":
        keep = torch.isin(self.ids, torch.as_tensor(np.asarray(ids), dtype=torch.int64))
        return self.subset(keep)

    def batches(self, batch_size: int, *, shuffle: bool = True,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(ids, x, y) mini-batches; shuffled with `generator` when asked."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            sel = order[start : start + batch_size]
            yield self.ids[sel], self.x[sel], self.y[sel]


def digits() -> SampleSet:
    """scikit-learn's 8×8 digits: x of shape (1797, 1, 8, 8) scaled to [0, 1], IDs 0..1796."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return SampleSet(torch.arange(len(y), dtype=torch.int64), x, y)


def split(data: SampleSet, test_fraction: float = 0.2, *, seed: int = 0) -> tuple[SampleSet, SampleSet]:
    """A seeded random (train, test) split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(data)))
    return data.subset(order[n_test:]), data.subset(order[:n_test])
