"""Data sets with stable int64 sample IDs, as the recorder needs them.

What the IDs are: `digits()` and `idx()` number the samples by their position in the source
files (fixed, so a run tomorrow gets the same IDs), and selecting from a SampleSet keeps its
IDs. `IdDataset` wraps other datasets, with IDs from a key function you give (stable keys,
e.g. user IDs or strings) or, without one, positions (renumbered by a Subset).

`digits()` is scikit-learn's bundled 8×8 digits set (1797 images, no download): the embedded
default for the demo and tests.
"""
from __future__ import annotations

import numbers
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ._validate import int_in_range, positive_int

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

    def draw(self, size: int, *, seed: int) -> "SampleSet":
        """Up to `size` samples drawn at random under `seed` (all of them, in order, when there
        are no more than that): a probe that costs a bounded number of forward passes."""
        size = positive_int("size", size)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if size >= len(self):
            return self
        return self.subset(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:size])

    def _holds(self, ids) -> torch.Tensor:
        return torch.isin(self.ids, torch.as_tensor(np.asarray(ids), dtype=torch.int64))

    def without(self, ids) -> "SampleSet":
        """All samples whose ID is not in `ids`."""
        return self.subset(~self._holds(ids))

    def with_ids(self, ids) -> "SampleSet":
        """The samples whose ID is in `ids`."""
        return self.subset(self._holds(ids))

    def batches(self, batch_size: int, *, shuffle: bool = True,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(ids, x, y) mini-batches; shuffled with `generator` when asked."""
        batch_size = positive_int("batch_size", batch_size)
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            sel = order[start : start + batch_size]
            yield self.ids[sel], self.x[sel], self.y[sel]


def checked_samples(arg: str, data, *, when_empty: str) -> SampleSet:
    """`data` if it is a non-empty SampleSet; otherwise TypeError / ValueError naming `arg`
    (`when_empty` says why an empty set will not do)."""
    if not isinstance(data, SampleSet):
        raise TypeError(f"{arg} must be a pyunlearn.data.SampleSet (ids, x, y), got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{arg} is empty: {when_empty}")
    return data


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


# ---------------------------------------------------------------------------- IDX files
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


def read_idx(path) -> np.ndarray:
    """One IDX file (MNIST's format: magic, dimension sizes, big-endian data), gzipped or raw."""
    import gzip
    from pathlib import Path

    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    start = 4 + 4 * dims
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - start != expected:
        raise ValueError(f"{path}: header promises {expected} bytes of data for shape {shape}, found {len(raw) - start}")
    return np.frombuffer(raw, dtype=dtype, offset=start).reshape(shape)


def idx(folder=FASHION_MNIST_DEBIAN) -> tuple[SampleSet, SampleSet]:
    """(train, test) from a folder of MNIST-format IDX files (MNIST or Fashion-MNIST):
    train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
    t10k-labels-idx1-ubyte, each optionally .gz. Images scaled to [0, 1], shape (N, 1, H, W).
    Train IDs are 0..N−1, test IDs follow them, so an ID names one sample of the whole set."""
    from pathlib import Path

    folder = Path(folder)

    def find(stem):
        for name in (stem, stem + ".gz"):
            if (folder / name).exists():
                return folder / name
        raise FileNotFoundError(f"{folder} has no {stem}[.gz]; Fashion-MNIST comes with Debian's "
                                "dataset-fashion-mnist package (files under /usr/share/datasets/fashion-mnist)")

    sets, first_id = [], 0
    for split_name in ("train", "t10k"):
        images = read_idx(find(f"{split_name}-images-idx3-ubyte"))
        labels = read_idx(find(f"{split_name}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise ValueError(f"{folder}: {len(images)} {split_name} images but {len(labels)} labels")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(labels.astype(np.int64))
        sets.append(SampleSet(torch.arange(first_id, first_id + len(y), dtype=torch.int64), x, y))
        first_id += len(y)
    return sets[0], sets[1]


# ---------------------------------------------------------------------------- forget sets
def forget_random(train: SampleSet, n: int, *, seed: int = 0) -> tuple[SampleSet, SampleSet]:
    """(train, forget): n training samples drawn at random."""
    if not 0 < n < len(train):
        raise ValueError(f"n must lie in [1, {len(train) - 1}], got {n}")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return train, train.subset(pick)


def forget_class(train: SampleSet, label: int) -> tuple[SampleSet, SampleSet]:
    """(train, forget): every training sample of one class."""
    mask = train.y == label
    if not bool(mask.any()):
        raise ValueError(f"no training sample has label {label}")
    return train, train.subset(mask)


def forget_rare_class(train: SampleSet, label: int, n: int, *, seed: int = 0) -> tuple[SampleSet, SampleSet]:
    """(train, forget) for the amnesiac paper's rare-class set-up: class `label` is cut to n
    random samples in training, and those n are then forgotten."""
    members = torch.nonzero(train.y == label).flatten()
    if not 0 < n <= len(members):
        raise ValueError(f"n must lie in [1, {len(members)}] (samples of class {label}), got {n}")
    keep = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(seed))[:n]]
    mask = train.y != label
    mask[keep] = True
    reduced = train.subset(mask)
    return reduced, reduced.subset(reduced.y == label)


def parse_forget(spec: str, train: SampleSet, *, seed: int = 0) -> tuple[SampleSet, SampleSet]:
    """'random:N', 'class:C' or 'rare:C:N' → (train, forget)."""
    parts = spec.split(":")
    try:
        if parts[0] == "random" and len(parts) == 2:
            return forget_random(train, int(parts[1]), seed=seed)
        if parts[0] == "class" and len(parts) == 2:
            return forget_class(train, int(parts[1]))
        if parts[0] == "rare" and len(parts) == 3:
            return forget_rare_class(train, int(parts[1]), int(parts[2]), seed=seed)
    except ValueError as exc:
        if "invalid literal" not in str(exc):
            raise
    raise ValueError(f"forget set-up must be random:N, class:C or rare:C:N, got {spec!r}")


class IdDataset(torch.utils.data.Dataset):
    """Wraps any map-style dataset of (x, y) so items come as (id, x, y): the recorder's loader
    convention for datasets without IDs.

    With `key` (a function of the sample's index in the underlying dataset, found through any
    torch.utils.data.Subset wrappers, returning an int ID or a str/bytes/UUID key), the ID is
    `key(index)`: stable under Subset, shuffling and re-splitting, e.g.
    `key=lambda i: f"fashion-train-{i}"` or a lookup of the record's user ID. Without it the
    ID is the position in `dataset` plus `first_id`, which a Subset renumbers: fine for one
    fixed data set, not a key to delete by later. The default collate gives a batch of keys as
    a list, which rec.batch() and amnesiac_forget() take as they are."""

    def __init__(self, dataset, first_id: int = 0, *, key=None):
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of the sample's index, got {type(key).__name__}")
        self.dataset = dataset
        self.first_id = int(first_id)
        self.key = key

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index]
        if self.key is None:
            return torch.tensor(self.first_id + index, dtype=torch.int64), x, y
        key = self.key(root_index(self.dataset, index))
        if isinstance(key, (int, np.integer)):
            return torch.tensor(key, dtype=torch.int64), x, y
        # A UUID as its canonical text (the same key: keys.py), which the default collate gathers
        # into a list as it does str and bytes; it cannot collate UUID objects.
        return (str(key) if isinstance(key, uuid.UUID) else key), x, y


def root_index(dataset, index: int) -> int:
    """The index in the underlying dataset of item `index` of `dataset`, through Subset wrappers."""
    while isinstance(dataset, torch.utils.data.Subset):
        index = int(dataset.indices[index])
        dataset = dataset.dataset
    return int(index)


# ---------------------------------------------------------------------------- cohort batching
class CohortBatchSampler(torch.utils.data.Sampler):
    """Batches that keep each deletion unit (a person, a tenant: `cohort_of[i]` for sample i)
    in as few batches as possible, so forgetting a unit touches few optimizer steps.

    `units_per_batch` (m, default 1) bounds how much of a batch one unit may fill: at most
    batch_size // m of its samples (its share), so a batch of batch_size samples draws from at
    least m units. Each epoch: the units are shuffled; each unit, shuffled, is cut into whole
    slices of one share and a remainder; the slices are packed first-fit into batches of
    batch_size, never splitting a slice and never putting two slices of one unit into one batch:
    first the whole slices, dealt in rounds (every unit's first, then every unit's second, ...),
    then the remainders; then the batches are shuffled. So a unit of n samples touches exactly
    ceil(n / share) batches, the fewest its share allows. With m = 1 the share is the whole
    batch: a unit fills n // batch_size batches of its own and its remainder goes whole into a
    batch shared with other units' remainders.

    Every sample appears once per epoch; some batches are smaller than batch_size. The order is
    random per epoch and fixed by `seed` (call set_epoch(e) to pick an epoch, as with
    DistributedSampler; iterating also advances it).

    Trade-off: with m = 1 batches are less i.i.d. (a batch holds a few units' samples), which can
    cost accuracy when units are homogeneous: with units of one class, benchmarks/batching_cost.py's
    CNN did not train at all. A larger m mixes the batches at a price in steps touched: a unit of
    n samples touches ceil(n / share) batches an epoch instead of ceil(n / batch_size), up to m
    times as many (see docs/methods.md, "What cohort batching cost", for both, measured).
    """

    def __init__(self, cohort_of, batch_size: int, *, seed: int = 0, units_per_batch: int = 1):
        cohort_of = np.asarray(cohort_of)
        if cohort_of.ndim != 1 or cohort_of.size == 0 or cohort_of.dtype.kind not in "iu":
            raise ValueError("cohort_of must be a non-empty 1-D array of integer unit IDs, one per sample")
        self.batch_size, self.seed, self.epoch = positive_int("batch_size", batch_size), int(seed), 0
        self.units_per_batch = int_in_range("units_per_batch", units_per_batch, 1, self.batch_size)
        # The floor, not the ceiling: m whole shares then fit in one batch, so a full batch holds
        # at least m units (128 // 3 = 42: three units and 2 samples to spare, where shares of 43
        # would fit only two).
        self.share = self.batch_size // self.units_per_batch
        units, inverse = np.unique(cohort_of, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(units)))])
        self._members = [order[bounds[u] : bounds[u + 1]] for u in range(len(units))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        share = self.share
        whole, remainders = [], []  # slices: (round, unit, samples)
        for u in rng.permutation(len(self._members)):
            members = rng.permutation(self._members[u])
            cut = len(members) - len(members) % share
            whole += [(k, u, members[i : i + share]) for k, i in enumerate(range(0, cut, share))]
            if cut < len(members):
                remainders.append((0, u, members[cut:]))
        if self.units_per_batch > 1:
            # Rounds, not unit by unit: dealt unit by unit, the last few units' slices find no
            # other units to share a batch with (100 units of 25 shares of 8 samples, 16 shares
            # to a batch: 175 batches, 25 of them a quarter full, instead of 157). With m = 1 a
            # whole slice fills a batch alone, and unit order keeps the batches of 0.2.0.
            whole.sort(key=lambda slice_: slice_[0])  # stable: the units' order within a round
        # Whole slices first: they need the most room.
        batches: list[list[int]] = []
        room: list[int] = []
        units_in: list[set] = []
        full = 0  # batches before this one have no room left: skip them
        for _, u, piece in whole + remainders:
            for b in range(full, len(batches)):
                if room[b] >= len(piece) and u not in units_in[b]:  # one slice of a unit per batch
                    break
            else:
                b = len(batches)
                batches.append([])
                room.append(self.batch_size)
                units_in.append(set())
            batches[b] += piece.tolist()
            room[b] -= len(piece)
            units_in[b].add(u)
            while full < len(batches) and room[full] == 0:
                full += 1
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        batches = self._batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self._batches(self.epoch))


def sample_batches(data: SampleSet, sampler) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(ids, x, y) batches of `data` in the order a batch sampler gives (one epoch)."""
    for batch in sampler:
        sel = torch.as_tensor(batch, dtype=torch.int64)
        yield data.ids[sel], data.x[sel], data.y[sel]
