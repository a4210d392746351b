"""Gradient ascent's held-out target: it stops where the forget set's loss rose by the model's
generalisation gap (interpolating between the two epochs around it), puts back the last check
when the loss blows up, and takes a gap measured once."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from pyunlearn.data import SampleSet
from pyunlearn.unlearn import gradient_ascent
from tests.support import TinyNet, tiny_data


def _samples(n=64, seed=0):
    ids, x, y = tiny_data(n, seed=seed)
    return SampleSet(ids, x, y)


def _model():
    torch.manual_seed(0)
    return TinyNet()


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
