"""Deletion units: the cohort batch sampler and gradient (momentum-aware) attribution."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn import attribution
from pyunlearn.attribution import coefficients
from pyunlearn.data import CohortBatchSampler
from tests.support import TinyNet, recorded_store


# ---------------------------------------------------------------------------- the sampler
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


# ---------------------------------------------------------------------------- attribution
class Linear(torch.nn.Module):
    """loss(batch) = w · a_batch: the gradient is a_batch whatever w is, so the effect of each
    batch on the final weights can be written down by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))


DIRECTIONS = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, -1.0], [2.0, 1.0, 1.0], [-1.0, 0.5, 0.0]])
LRS = [0.1, 0.05, 0.05, 0.02]


def _train(model, optimizer, store=None, skip=None):
    rec = pu.UpdateRecorder(model, optimizer, store) if store is not None else None
    for t, a in enumerate(DIRECTIONS):
        for group in optimizer.param_groups:
            group["lr"] = LRS[t]  # a schedule
        if rec is not None:
            rec.batch([t])
        optimizer.zero_grad()
        (model.w * (0 * a if t == skip else a)).sum().backward()
        optimizer.step()
    if rec is not None:
        rec.close()
    return model.w.detach().clone()


def test_sgd_momentum_attribution_by_hand(tmp_path):
    mu = 0.9
    model = Linear()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32", attribution="gradient")
    final = _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=mu), store)
    # Step 1's gradient a_1 moves w by lr_1 now, then by mu·lr_2 and mu²·lr_3 through momentum.
    c1 = LRS[1] + mu * LRS[2] + mu**2 * LRS[3]
    assert coefficients(store, [1])[0] == pytest.approx(c1)
    pu.amnesiac_forget(model, store, [1])
    torch.testing.assert_close(model.w.detach(), final + c1 * DIRECTIONS[1])
    # For a loss whose gradient ignores w this is exactly training without batch 1.
    retrained = Linear()
    expected = _train(retrained, torch.optim.SGD(retrained.parameters(), lr=0.1, momentum=mu), skip=1)
    torch.testing.assert_close(model.w.detach(), expected)


def test_update_attribution_misses_what_momentum_carried(tmp_path):
    """The paper's Δθ of step 1 holds only lr_1·(a_1 + mu·v_0): forgetting by updates leaves
    a_1's later momentum in the weights."""
    model = Linear()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32")
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), store)
    pu.amnesiac_forget(model, store, [1])
    retrained = Linear()
    expected = _train(retrained, torch.optim.SGD(retrained.parameters(), lr=0.1, momentum=0.9), skip=1)
    assert float((model.w.detach() - expected).abs().max()) > 1e-3


def test_adam_attribution_by_hand(tmp_path):
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    model = Linear()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32", attribution="gradient")
    final = _train(model, torch.optim.Adam(model.parameters(), lr=0.1, betas=(beta1, beta2), eps=eps), store)
    # v̂ after step 1 (Adam step count 2), and the coefficient of the documented approximation.
    v = torch.zeros(3)
    for t in range(2):
        v = beta2 * v + (1 - beta2) * DIRECTIONS[t] ** 2
    v_hat = v / (1 - beta2**2)
    c1 = (1 - beta1) * sum(beta1 ** (s - 1) * LRS[s] / (1 - beta1 ** (s + 1)) for s in range(1, 4))
    assert coefficients(store, [1])[0] == pytest.approx(c1)
    pu.amnesiac_forget(model, store, [1])
    torch.testing.assert_close(model.w.detach(), final + c1 * DIRECTIONS[1] / (v_hat.sqrt() + eps))


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1), "dampening"),
    (lambda p: torch.optim.RMSprop(p, lr=0.1), "supports SGD, Adam and AdamW, not RMSprop"),
    (lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True), "amsgrad"),
], ids=["nesterov", "dampening", "rmsprop", "amsgrad"])
def test_unsupported_optimizers_are_refused(tmp_path, make, message):
    model = Linear()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, attribution="gradient")
    with pytest.raises(ValueError, match=message):
        pu.UpdateRecorder(model, make(model.parameters()), store)


def test_attribution_argument_checked(tmp_path):
    with pytest.raises(ValueError, match="attribution must be 'update' or 'gradient'"):
        pu.UpdateStore.create(tmp_path / "s.zarr", Linear(), attribution="both")


def test_cohort_table_smoke_run(tmp_path, benchmark_script):
    """The evidence script on the digits: completes, numbers in range, cohort batching touches
    fewer steps than random batching (a property of the sampler, not a claim about accuracy)."""
    cohort_table = benchmark_script("cohort_table")
    rows = cohort_table.main(["--data", "digits", "--forget", "cohort:20:20", "--epochs", "2", "--batch-size", "32",
                              "--mia-samples", "300", "--out", str(tmp_path), "--name", "smoke"])
    assert len(rows) == 12
    for r in rows:
        assert all(0.0 <= v <= 100.0 for v in (r.UA, r.RA, r.TA, r.MIA, r.gap))
    touched = {(r.batching, r.method): r.steps_touched for r in rows if r.steps_touched is not None}
    assert touched[("cohort", "update keep=1.0")] == 2  # 20 samples < 32: one batch per epoch
    assert touched[("random", "update keep=1.0")] > touched[("cohort", "update keep=1.0")]
    assert (tmp_path / "smoke.md").exists() and (tmp_path / "smoke.csv").exists()


def test_maximize_is_refused(tmp_path):
    model = Linear()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, attribution="gradient")
    with pytest.raises(ValueError, match="maximize"):
        pu.UpdateRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1, maximize=True), store)


def test_a_resumed_run_with_a_fresh_optimizer_cuts_the_momentum_chain(tmp_path):
    """After truncate, a new optimizer starts with no momentum: steps before the resume must not
    be credited with momentum that never reached the steps after it."""
    model = Linear()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32", attribution="gradient")
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), store)
    store.truncate(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = pu.UpdateRecorder(model, optimizer, store)
    for t in (2, 3):
        rec.batch([t])
        model.w.grad = DIRECTIONS[t].clone()
        optimizer.param_groups[0]["lr"] = LRS[t]
        optimizer.step()
    rec.close()
    mu = 0.9
    assert coefficients(store, [0, 1, 2]).tolist() == pytest.approx([LRS[0] + mu * LRS[1], LRS[1], LRS[2] + mu * LRS[3]])


def test_adam_layers_that_skip_steps(tmp_path):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))
            self.u = torch.nn.Parameter(torch.ones(2))

    model = Two()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32", attribution="gradient")
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for t in range(4):
            rec.batch([t])
            optimizer.zero_grad()
            loss = model.w.sum() + (model.u.sum() if t >= 2 else 0)  # u first gets a gradient at step 2
            loss.backward()
            optimizer.step()
    hyper = store.read_step_hyper(4)
    assert hyper[:, 2].tolist() == [1, 2, 3, 4]  # w's count: the largest
    pu.amnesiac_forget(model, store, [3])


# ---------------------------------------------------------------------------- coefficient rules (issue 15, part 5)
def test_coefficient_rules_by_hand(tmp_path):
    from pyunlearn.attribution import coefficient_rule

    model = Linear()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32", attribution="gradient")
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), store)
    mu = 0.9
    first = [LRS[0] + mu * LRS[1] + mu**2 * LRS[2] + mu**3 * LRS[3], LRS[1] + mu * LRS[2] + mu**2 * LRS[3],
             LRS[2] + mu * LRS[3], LRS[3]]
    steps = [0, 1, 2, 3]
    assert coefficients(store, steps).tolist() == pytest.approx(first)
    assert coefficients(store, steps, "own-step").tolist() == pytest.approx(LRS)
    assert coefficients(store, steps, "damped", 0.25).tolist() == pytest.approx(
        [o + 0.25 * (f - o) for o, f in zip(LRS, first)])
    assert coefficients(store, steps, "damped", 1.0).tolist() == pytest.approx(first)
    with coefficient_rule("own-step"):
        assert coefficients(store, steps).tolist() == pytest.approx(LRS)
        with coefficient_rule("first-order"):
            assert coefficients(store, steps).tolist() == pytest.approx(first)
        assert coefficients(store, steps).tolist() == pytest.approx(LRS)
    assert coefficients(store, steps).tolist() == pytest.approx(first)  # the default again
    with pytest.raises(ValueError, match="rule"):
        coefficients(store, steps, "calibrated")
    with pytest.raises(ValueError, match="damping"):
        coefficient_rule("damped", 1.5).__enter__()
    with pytest.raises(ValueError, match="damping"):
        coefficients(store, steps, "first-order", 0.5)
    store.close()


def test_amnesiac_forget_follows_the_rule(tmp_path):
    """Forgetting step 0 moves w by +c_0 · a_0 (the gradient of step 0 is a_0): with the rule
    in force, c_0 is lr_0 (own step) or the full first-order sum."""
    import copy as _copy

    from pyunlearn.attribution import coefficient_rule

    model = Linear()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32", attribution="gradient")
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), store)
    for rule, damping in (("own-step", None), ("damped", 0.5), ("first-order", None)):
        m = _copy.deepcopy(model)
        with coefficient_rule(rule, damping):
            pu.amnesiac_forget(m, store, [0])
        expected = model.w.detach() + coefficients(store, [0], rule, damping)[0] * DIRECTIONS[0]
        assert torch.allclose(m.w.detach(), expected, atol=1e-6)
    assert coefficients(store, [0], "own-step")[0] == pytest.approx(LRS[0])
    store.close()


# ------------------------------------------------------------------ the optimizer families
@pytest.mark.parametrize("make, family", [
    (lambda p: torch.optim.SGD(p, lr=0.1), attribution.SGDMomentum),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), attribution.SGDMomentum),
    (lambda p: torch.optim.Adam(p), attribution.AdamFamily),
    (lambda p: torch.optim.AdamW(p), attribution.AdamFamily),
])
def test_family_lookup(make, family):
    assert attribution.family_for(make(TinyNet().fc1.parameters())) is family
    assert attribution.family_named(family.name) is family


def test_unknown_family_name_is_a_clear_error():
    with pytest.raises(pu.StoreError, match="optimizer family 'lion'"):
        attribution.family_named("lion")


def test_coefficients_need_a_gradient_store_with_a_final_model(tmp_path):
    store = recorded_store(tmp_path / "s.zarr").store
    with pytest.raises(pu.StoreError, match="attribution='update'"):
        attribution.coefficients(store, [0])
    model = TinyNet()
    grad_store = pu.UpdateStore.create(tmp_path / "g.zarr", model, attribution="gradient")
    with pytest.raises(pu.StoreError, match="no final model"):
        attribution.coefficients(grad_store, [0])
