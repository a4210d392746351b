"""Deletion units in training: the cohort batch sampler (pyunlearn.data.CohortBatchSampler) packs
each unit into the fewest batches, mixes several units a batch when asked, every sample once an
epoch, in a seeded order."""
from __future__ import annotations

import numpy as np
import pytest

from pyunlearn.data import CohortBatchSampler


def _epochs(sampler, n):
    return [list(sampler) for _ in range(n)]


def test_every_sample_once_per_epoch_and_units_packed():
    rng = np.random.default_rng(0)
    cohort = rng.integers(0, 60, 1000)  # 60 units of varied size (~17)
    sampler = CohortBatchSampler(cohort, 32, seed=1)
    for batches in _epochs(sampler, 3):
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(1000))
        assert all(1 <= len(b) <= 32 for b in batches)
        for unit in range(60):
            size = int((cohort == unit).sum())
            touched = sum(any(cohort[i] == unit for i in b) for b in batches)
            assert touched == -(-size // 32)  # the fewest batches the unit can fill


def test_large_units_fill_whole_batches():
    cohort = np.repeat([0, 1, 2], [100, 40, 7])
    batches = list(CohortBatchSampler(cohort, 32, seed=0))
    unit0 = [b for b in batches if any(cohort[i] == 0 for i in b)]
    assert len(unit0) == 4 and sum(len(b) for b in unit0 if all(cohort[i] == 0 for i in b)) >= 96


def test_order_is_seeded_and_changes_per_epoch():
    cohort = np.arange(200) // 5
    a, b = CohortBatchSampler(cohort, 16, seed=3), CohortBatchSampler(cohort, 16, seed=3)
    ea, eb = _epochs(a, 2), _epochs(b, 2)
    assert ea == eb
    assert ea[0] != ea[1]
    assert list(CohortBatchSampler(cohort, 16, seed=4)) != ea[0]
    c = CohortBatchSampler(cohort, 16, seed=3)
    c.set_epoch(1)
    assert list(c) == ea[1] and len(c) == len(ea[0])


def test_one_sample_units_give_full_random_batches():
    batches = list(CohortBatchSampler(np.arange(100), 10, seed=0))
    assert sorted(len(b) for b in batches) == [10] * 10


def test_sampler_bad_input():
    with pytest.raises(ValueError, match="cohort_of must be"):
        CohortBatchSampler(np.array([0.5, 1.5]), 4)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        CohortBatchSampler(np.arange(4), 0)


def _old_cohort_batches(cohort, batch_size, seed, epoch):
    """CohortBatchSampler._batches as released in 0.2.0 (before units_per_batch), kept here as
    the specification the default must still meet batch for batch."""
    units, inverse = np.unique(cohort, return_inverse=True)
    members_of = [np.flatnonzero(inverse == u) for u in range(len(units))]
    rng = np.random.default_rng([seed, epoch])
    whole, remainders = [], []
    for u in rng.permutation(len(members_of)):
        members = rng.permutation(members_of[u])
        cut = len(members) - len(members) % batch_size
        whole += [members[i : i + batch_size].tolist() for i in range(0, cut, batch_size)]
        if cut < len(members):
            remainders.append(members[cut:].tolist())
    bins, room = [], []
    for rest in remainders:
        for b, free in enumerate(room):
            if free >= len(rest):
                bins[b] += rest
                room[b] -= len(rest)
                break
        else:
            bins.append(list(rest))
            room.append(batch_size - len(rest))
    batches = whole + bins
    return [batches[i] for i in rng.permutation(len(batches))]


def test_default_batches_are_unchanged():
    rng = np.random.default_rng(5)
    for cohort, batch_size in [(rng.integers(0, 60, 1000), 32), (np.repeat(np.arange(20), 200), 128),
                               (np.concatenate([np.repeat(np.arange(9), 200), 100 + np.arange(300)]), 128),
                               (np.repeat(np.arange(6), [300, 50, 400, 10, 129, 256]), 64)]:  # several whole batches
        for seed in (0, 7):
            default, explicit = CohortBatchSampler(cohort, batch_size, seed=seed), \
                CohortBatchSampler(cohort, batch_size, seed=seed, units_per_batch=1)
            for epoch in range(2):
                expected = _old_cohort_batches(cohort, batch_size, seed, epoch)
                assert list(default) == expected and list(explicit) == expected


def _units_per_batch(cohort, batch):
    return np.bincount(cohort[batch])


@pytest.mark.parametrize("m", [2, 3, 4, 8, 32])
def test_mixed_batches_cap_each_unit_and_touch_the_fewest_batches(m):
    rng = np.random.default_rng(m)
    sizes = rng.integers(1, 150, 40)  # units of 1 to 149 samples, some several shares
    cohort = np.repeat(np.arange(40), sizes)
    rng.shuffle(cohort)
    share = 32 // m
    sampler = CohortBatchSampler(cohort, 32, seed=2, units_per_batch=m)
    for batches in _epochs(sampler, 3):
        assert sorted(i for b in batches for i in b) == list(range(len(cohort)))
        for b in batches:
            assert 1 <= len(b) <= 32
            assert np.bincount(cohort[b]).max() <= share
        for unit in range(40):
            touched = sum(any(cohort[i] == unit for i in b) for b in batches)
            assert touched == -(-sizes[unit] // share)


def test_mixing_fills_batches_of_equal_units():
    # 20 units of 200, batch 128, 4 units a batch (shares of 32): each unit is 6 whole shares and
    # 8 samples; 4 units' shares fill 6 batches (30 in all) and the 20 remainders of 8 fill 128 + 32
    # samples: 32 batches, ceil(4000 / 128). Without mixing every unit fills one batch of 128 and
    # one of 72: 40 batches, each of one unit.
    cohort = np.repeat(np.arange(20), 200)
    mixed = list(CohortBatchSampler(cohort, 128, seed=0, units_per_batch=4))
    assert len(mixed) == 32 and sorted(map(len, mixed))[2:] == [128] * 30
    assert all(len(set(cohort[b].tolist())) >= 4 for b in mixed)
    alone = list(CohortBatchSampler(cohort, 128, seed=0))
    assert len(alone) == 40 and all(len(set(cohort[b].tolist())) == 1 for b in alone)


def test_mixed_slices_are_dealt_in_rounds():
    # 20 units of 16 shares of 4 samples, 8 shares a batch: dealt in rounds every batch is full
    # (40 = 1280 / 32); dealt unit by unit, the last 4 units would fill 16 batches half.
    cohort = np.repeat(np.arange(20), 64)
    batches = list(CohortBatchSampler(cohort, 32, seed=0, units_per_batch=8))
    assert len(batches) == 40 and all(len(b) == 32 for b in batches)


def test_one_unit_a_sample_per_batch():
    cohort = np.repeat([0, 1, 2, 3], [5, 9, 2, 7])
    batches = list(CohortBatchSampler(cohort, 4, seed=1, units_per_batch=4))
    assert all(len(set(cohort[b].tolist())) == len(b) for b in batches)
    assert len(batches) == 9  # unit 1's 9 samples need 9 batches


def test_mixed_order_is_seeded_and_set_epoch_picks_the_epoch():
    cohort = np.arange(400) // 25
    a, b = CohortBatchSampler(cohort, 32, seed=3, units_per_batch=4), \
        CohortBatchSampler(cohort, 32, seed=3, units_per_batch=4)
    ea = _epochs(a, 2)
    assert ea == _epochs(b, 2) and ea[0] != ea[1]
    assert list(CohortBatchSampler(cohort, 32, seed=4, units_per_batch=4)) != ea[0]
    c = CohortBatchSampler(cohort, 32, seed=3, units_per_batch=4)
    c.set_epoch(1)
    assert len(c) == len(ea[1]) and list(c) == ea[1]


@pytest.mark.parametrize("bad", [0, -1, 33, 2.0, True, "4", None])
def test_units_per_batch_bad_values(bad):
    with pytest.raises(ValueError, match=r"units_per_batch must be an int in \[1, 32\]"):
        CohortBatchSampler(np.arange(64), 32, units_per_batch=bad)
