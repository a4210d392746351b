"""Data sets with IDs: the IDX reader, forget-set builders, the dataset wrapper."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from pyunlearn.data import (IdDataset, SampleSet, digits, forget_class, forget_random, forget_rare_class, idx,
                            parse_forget, read_idx, split)


def _write_idx(path, array: np.ndarray, compress: bool):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder(tmp_path, compress):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    train_images = rng.integers(0, 256, (7, 4, 4), dtype=np.uint8)
    test_images = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train_images, compress)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(7, dtype=np.uint8) % 3, compress)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test_images, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.array([2, 1, 0], dtype=np.uint8), compress)
    train, test = idx(tmp_path)
    assert train.x.shape == (7, 1, 4, 4) and train.x.dtype == torch.float32
    assert torch.equal(train.x[3, 0], torch.from_numpy(train_images[3] / 255.0).float())
    assert train.ids.tolist() == list(range(7)) and test.ids.tolist() == [7, 8, 9]
    assert test.y.tolist() == [2, 1, 0]


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((2, 2), dtype=np.uint8), False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header promises 4 bytes"):
        read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        idx(tmp_path)
    with_ints = np.arange(6, dtype=">i4").reshape(2, 3)
    _write_idx(tmp_path / "ints", with_ints, False)
    assert read_idx(tmp_path / "ints").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_forget_sets():
    data = digits()
    train, _ = split(data, 0.2, seed=1)
    same, forget = forget_random(train, 50, seed=2)
    assert same is train and len(forget) == 50 and len(set(forget.ids.tolist())) == 50
    _, forget = forget_class(train, 3)
    assert bool((forget.y == 3).all()) and len(forget) == int((train.y == 3).sum())
    reduced, forget = forget_rare_class(train, 5, 10, seed=0)
    assert len(forget) == 10 and int((reduced.y == 5).sum()) == 10
    assert len(reduced) == len(train) - int((train.y == 5).sum()) + 10
    assert parse_forget("rare:5:10", train)[1].ids.tolist() == forget.ids.tolist()
    for spec in ("random", "class:x", "rare:1", "nope:3"):
        with pytest.raises(ValueError, match="random:N, class:C or rare:C:N"):
            parse_forget(spec, train)
    with pytest.raises(ValueError, match="n must lie"):
        forget_random(train, 0)
    with pytest.raises(ValueError, match="no training sample has label 42"):
        forget_class(train, 42)


def test_sample_set_and_wrapper():
    data = SampleSet(torch.arange(10, 20), torch.randn(10, 2), torch.arange(10) % 2)
    assert data.without([10, 11]).ids.tolist() == list(range(12, 20))
    assert data.with_ids([15, 99]).ids.tolist() == [15]
    seen = torch.cat([ids for ids, _, _ in data.batches(3, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10, 20))
    with pytest.raises(ValueError, match="differ in length"):
        SampleSet(torch.arange(3), torch.zeros(2, 1), torch.zeros(3, dtype=torch.long))
    wrapped = IdDataset([(torch.zeros(2), 1), (torch.ones(2), 0)], first_id=100)
    loader = torch.utils.data.DataLoader(wrapped, batch_size=2)
    ids, x, y = next(iter(loader))
    assert ids.tolist() == [100, 101] and ids.dtype == torch.int64 and y.tolist() == [1, 0]
