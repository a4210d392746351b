"""Label flipping, gradient ascent, fine-tuning and layer-wise partial updates."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from pyunlearn.data import SampleSet
from tests.support import TinyNet, tiny_data
from pyunlearn.unlearn import LayerwiseMask, fine_tune, gradient_ascent, label_flip
from pyunlearn.unlearn.label_flip import random_wrong_labels


def _samples(n=64, seed=0):
    ids, x, y = tiny_data(n, seed=seed)
    return SampleSet(ids, x, y)


def _model():
    torch.manual_seed(0)
    return TinyNet()


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True),
], ids=["sgd-momentum-wd", "adam-wd", "adamw-amsgrad"])
def test_partial_updates_leave_unselected_entries_bit_identical(make):
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make(params)
    mask = LayerwiseMask(model, optimizer, keep=0.1)
    data = _samples()
    for step in range(5):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x), data.y).backward()
        chosen = mask.selection()
        before = [p.detach().clone() for p in params]
        state_before = {id(p): {k: v.clone() for k, v in optimizer.state.get(p, {}).items()
                                if isinstance(v, torch.Tensor) and v.shape == p.shape} for p in params}
        mask.step()
        for p, b, positions, k in zip(params, before, chosen, mask.k):
            assert positions.numel() == k
            frozen = torch.ones(p.numel(), dtype=torch.bool)
            frozen[positions] = False
            assert torch.equal(p.detach().view(-1)[frozen], b.view(-1)[frozen])
            assert not torch.equal(p.detach().view(-1)[~frozen], b.view(-1)[~frozen])  # the chosen ones moved
            for name, value in optimizer.state[p].items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    old = state_before[id(p)].get(name, torch.zeros_like(value))
                    assert torch.equal(value.view(-1)[frozen], old.view(-1)[frozen]), name


def test_partial_selection_is_the_largest_gradients():
    model = _model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    mask = LayerwiseMask(model, optimizer, keep=0.25)
    data = _samples()
    torch.nn.functional.cross_entropy(model(data.x), data.y).backward()
    for p, positions, k in zip(mask.params, mask.selection(), mask.k):
        expected = torch.sort(p.grad.abs().view(-1), descending=True, stable=True).indices[:k].sort().values
        assert torch.equal(positions, expected)


def test_label_flip_never_assigns_the_true_label():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (10_000,), generator=gen)
    flipped = random_wrong_labels(y, 10, gen)
    assert not bool((flipped == y).any())
    assert set(flipped.tolist()) == set(range(10))
    assert torch.equal(random_wrong_labels(torch.zeros(500, dtype=torch.long), 2, gen), torch.ones(500, dtype=torch.long))


@pytest.mark.parametrize("method", [label_flip, gradient_ascent])
@pytest.mark.parametrize("keep", [None, 0.1])
def test_methods_change_the_model_and_report(method, keep):
    model = _model()
    original = copy.deepcopy(model)
    report = method(model, _samples(48), keep, epochs=2, seed=1)
    assert report.steps == 2 * 1 and report.keep == keep and report.seconds > 0
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters())]
    assert any(changed)
    assert torch.equal(model.frozen, original.frozen)


def test_methods_are_deterministic_under_a_seed():
    a, b = _model(), _model()
    label_flip(a, _samples(), 0.2, seed=3)
    label_flip(b, _samples(), 0.2, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_gradient_ascent_with_retained_data_raises_forget_loss():
    model = _model()
    forget, retain = _samples(32, seed=1), _samples(256, seed=2)
    def loss(m, d):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(d.x), d.y))

    before = loss(model, forget)
    gradient_ascent(model, forget, None, epochs=3, lr=0.05, retain_data=retain)
    assert loss(model, forget) > before


def test_fine_tune_lowers_the_retain_loss():
    model = _model()
    retain = _samples(256)
    def loss():
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(retain.x), retain.y))

    before = loss()
    fine_tune(model, retain, epochs=3, lr=0.05)
    assert loss() < before


def test_fine_tune_stops_at_max_steps():
    model, retain = _model(), _samples()
    report = fine_tune(model, retain, epochs=5, batch_size=8, max_steps=3)
    assert report.steps == 3 and report.stopped == "step budget: max_steps=3"
    with pytest.raises(ValueError, match="max_steps, if not None, must be a positive int"):
        fine_tune(model, retain, max_steps=0)


def test_bad_inputs():
    model = _model()
    empty = _samples().subset(torch.zeros(64, dtype=torch.bool))
    with pytest.raises(ValueError, match="forget_data is empty"):
        label_flip(model, empty)
    with pytest.raises(TypeError, match="forget_data must be a pyunlearn.data.SampleSet"):
        gradient_ascent(model, [(1, 2, 3)])
    for keep in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"keep, if not None .*, must be a ratio in \(0, 1\]"):
            label_flip(model, _samples(), keep)
    frozen = torch.nn.Linear(8, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        label_flip(frozen, _samples(), classes=3)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        fine_tune(model, _samples(), epochs=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        gradient_ascent(model, _samples(), lr=-1.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        label_flip(model, _samples(), classes=2)


def test_partial_updates_on_a_non_contiguous_parameter():
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(3, 5).t())  # transposed: not contiguous
    assert not model.w.is_contiguous()
    optimizer = torch.optim.SGD([model.w], lr=0.1, momentum=0.9)
    mask = LayerwiseMask(model, optimizer, keep=0.2)
    before = model.w.detach().clone()
    (model.w * torch.arange(15.0).view(5, 3)).sum().backward()
    chosen = mask.selection()[0]
    mask.step()
    moved = (model.w.detach() != before).reshape(-1).nonzero().flatten()
    assert torch.equal(moved, chosen) and chosen.numel() == 3


# ---- gradient ascent's held-out target ---------------------------------------------------------

def _random_labels(n, seed):
    """Samples whose labels are noise: a model can only memorise them, so it fits its training
    samples far better than unseen ones (a large generalisation gap)."""
    ids, x, _ = tiny_data(n, seed=seed)
    return SampleSet(ids, x, torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed)))


def _memoriser(train: SampleSet) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(train.x), train.y).backward()
        optimizer.step()
    return model


def test_held_out_target_stops_where_the_forget_loss_rose_by_the_generalisation_gap():
    from pyunlearn.evaluation.metrics import losses

    data = _random_labels(256, seed=3)
    forget, retain, held_out = (data.subset(torch.arange(a, b)) for a, b in ((0, 32), (32, 192), (192, 256)))
    model = _memoriser(data.subset(torch.arange(192)))
    gap = losses(model, held_out).mean() - losses(model, retain).mean()
    assert gap > 0.5  # the premise: the model memorised its training samples

    def rise(m):  # the forget set's mean loss less the held-out one, from the start (the sets fit the probes whole)
        return losses(m, forget).mean() - losses(m, held_out).mean() - (losses(start, forget).mean()
                                                                         - losses(start, held_out).mean())

    start = copy.deepcopy(model)
    steps_per_epoch = 4  # 32 forget samples in batches of 8: checked after whole epochs only
    options = dict(retain_data=retain, epochs=1000, lr=0.002, batch_size=8, max_steps=None, max_retain_drop=None)

    report = gradient_ascent(model, forget, **options, held_out_data=held_out)
    found = re.match(r"held-out target (\S+) of the way from step (\d+) to step (\d+):", report.stopped)
    assert found and int(found[3]) == report.steps and int(found[2]) == report.steps - steps_per_epoch, report.stopped
    # The same run without the target, to the epoch that passed the gap and to the one before (the
    # target draws nothing from the batches' generator): the second passed it, the first had not.
    before, after = copy.deepcopy(start), copy.deepcopy(start)
    gradient_ascent(before, forget, **{**options, "max_steps": report.steps - steps_per_epoch})
    gradient_ascent(after, forget, **{**options, "max_steps": report.steps})
    assert rise(before) < gap <= rise(after)
    # The model lies on the line between the two, where the rise, taken as linear, meets the gap...
    way = (gap - rise(before)) / (rise(after) - rise(before))
    for name, value in model.state_dict().items():
        expected = torch.lerp(before.state_dict()[name], after.state_dict()[name], float(way))
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # ... and is nearer the gap than the epoch that passed it.
    assert abs(rise(model) - gap) < 0.25 * (rise(after) - gap)
    # Without the target the run goes on: the ascent is unbounded.
    unbounded = copy.deepcopy(start)
    assert gradient_ascent(unbounded, forget, **{**options, "max_steps": 2 * report.steps}).steps == 2 * report.steps


def test_held_out_interpolation_moves_each_tensor_once():
    """Tied weights are one tensor listed under two names: interpolated once, not twice; extra
    state (not a tensor) and integer buffers keep their current value."""
    from pyunlearn.unlearn._loop import HeldOutTarget

    class WithExtra(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.norm = torch.nn.BatchNorm1d(4)

        def get_extra_state(self):
            return {"note": "kept"}

        def set_extra_state(self, state):
            pass

    model = WithExtra()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.a.weight.add_(1.0)
        model.a.bias.add_(2.0)
        model.norm.running_mean.add_(4.0)
        model.norm.num_batches_tracked.add_(3)
    target = HeldOutTarget.__new__(HeldOutTarget)
    target.gap = 0.25
    assert target.between(model, before, 0.0, 1.0) == 0.25
    torch.testing.assert_close(model.a.weight, before["a.weight"] + 0.25)
    assert model.b.weight is model.a.weight
    torch.testing.assert_close(model.a.bias, before["a.bias"] + 0.5)
    torch.testing.assert_close(model.norm.running_mean, before["norm.running_mean"] + 1.0)
    assert int(model.norm.num_batches_tracked) == 3


def test_held_out_target_puts_back_the_last_check_when_the_loss_blows_up():
    data = _random_labels(256, seed=3)
    forget, retain, held_out = (data.subset(torch.arange(a, b)) for a, b in ((0, 32), (32, 192), (192, 256)))
    model = _memoriser(data.subset(torch.arange(192)))
    model[0].weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    report = gradient_ascent(model, forget, retain_data=retain, held_out_data=held_out, lr=1e30, clip=None, epochs=3,
                             max_steps=None, max_retain_drop=None, batch_size=8)
    assert report.stopped == "held-out target: the forget or held-out loss is not finite after step 4; put back to step 0"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_held_out_target_takes_a_gap_measured_once():
    from pyunlearn.evaluation.metrics import generalisation_gap

    data = _random_labels(256, seed=3)
    forget, retain, held_out = (data.subset(torch.arange(a, b)) for a, b in ((0, 32), (32, 192), (192, 256)))
    options = dict(retain_data=retain, held_out_data=held_out, epochs=1000, lr=0.002, batch_size=8, max_steps=None,
                   max_retain_drop=None)
    measured, given = _memoriser(data.subset(torch.arange(192))), _memoriser(data.subset(torch.arange(192)))
    gap = generalisation_gap(given, retain=retain, held_out=held_out)
    first = gradient_ascent(measured, forget, **options)
    second = gradient_ascent(given, forget, **options, generalisation_gap=gap)
    assert first.stopped == second.stopped and f"the generalisation gap is {gap:.4f}" in first.stopped
    assert all(torch.equal(measured.state_dict()[k], v) for k, v in given.state_dict().items())
    # Another gap is taken as given: half of it stops the ascent earlier.
    halved = _memoriser(data.subset(torch.arange(192)))
    assert gradient_ascent(halved, forget, **options, generalisation_gap=gap / 2).steps < first.steps
    # A gap passed in needs no retained data to measure it (a gap of 0: reached before any step).
    no_retain = gradient_ascent(_memoriser(data.subset(torch.arange(192))), forget, **{**options, "retain_data": None},
                                generalisation_gap=0.0)
    assert no_retain.steps == 0 and no_retain.stopped.startswith("held-out target at step 0:")


def test_held_out_target_counts_the_forget_loss_against_the_held_out_loss():
    """An ascent that harms the model raises every loss: the held-out loss rising as much as the
    forget set's is no forgetting. Here the 'forget set' is held-out data itself, so the two rise
    alike and the target is never reached."""
    data = _random_labels(256, seed=6)
    retain, unseen = data.subset(torch.arange(192)), data.subset(torch.arange(192, 256))
    model = _memoriser(retain)
    report = gradient_ascent(model, unseen, retain_data=retain, held_out_data=unseen, epochs=30, lr=0.01,
                             batch_size=8, max_steps=None, max_retain_drop=None)
    assert report.steps == 30 * 8 and report.stopped is None


def test_held_out_target_probes_the_forget_set_apart_from_the_batch_order():
    from pyunlearn.unlearn._loop import HeldOutTarget

    data = _random_labels(2048, seed=5)
    forget, rest = data.subset(torch.arange(1024)), data.subset(torch.arange(1024, 2048))
    target = HeldOutTarget(_model(), forget, rest, rest, samples=256, seed=7)
    assert len(target.forget) == HeldOutTarget.PROBE < len(forget)
    # gradient_ascent(seed=7) batches the forget set in torch.randperm's order under 7: the probe
    # must not be the samples of its first batches (they were pushed longest by momentum).
    first_batches = set(forget.ids[torch.randperm(len(forget), generator=torch.Generator().manual_seed(7))]
                        [: HeldOutTarget.PROBE].tolist())
    overlap = len(first_batches & set(target.forget.ids.tolist())) / HeldOutTarget.PROBE
    assert 0.3 < overlap < 0.7  # about half, as for any random half of the set


def test_held_out_target_already_reached_takes_no_step():
    data = _random_labels(128, seed=4)
    forget, retain = data.subset(torch.arange(16)), data.subset(torch.arange(16, 128))
    model = _memoriser(data)
    before = copy.deepcopy(model.state_dict())
    # Held-out data that scores like the retained data (here: the same samples): no gap to close.
    report = gradient_ascent(model, forget, retain_data=retain, held_out_data=retain)
    assert report.steps == 0 and report.stopped.startswith("held-out target at step 0:")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_held_out_target_bad_inputs():
    model, data = _model(), _samples()
    with pytest.raises(ValueError, match="held_out_data needs retain_data too"):
        gradient_ascent(model, data, held_out_data=data)
    with pytest.raises(TypeError, match="held_out_data must be a pyunlearn.data.SampleSet"):
        gradient_ascent(model, data, retain_data=data, held_out_data=[(1, 2, 3)])
    with pytest.raises(ValueError, match="held_out_samples must be a positive int"):
        gradient_ascent(model, data, retain_data=data, held_out_data=data, held_out_samples=0)
    for gap in (float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="generalisation_gap must be a finite number"):
            gradient_ascent(model, data, retain_data=data, held_out_data=data, generalisation_gap=gap)
    with pytest.raises(ValueError, match="generalisation_gap needs held_out_data too"):
        gradient_ascent(model, data, retain_data=data, generalisation_gap=0.1)
    before = copy.deepcopy(model.state_dict())
    narrow = SampleSet(data.ids, data.x[:, :5], data.y)  # TinyNet takes 8 features
    with pytest.raises(ValueError, match="held_out_data: the model cannot score these samples"):
        gradient_ascent(model, data, retain_data=data, held_out_data=narrow)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.fc2.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        gradient_ascent(broken, data, retain_data=data, held_out_data=data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # failed calls changed nothing
