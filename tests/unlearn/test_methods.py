"""Label flipping, gradient ascent and fine-tuning: they change the model and report, under a
seed, and refuse bad input. (Layer-wise partial updates: test_partial.py; gradient ascent's
held-out target: test_held_out_target.py.)"""
from __future__ import annotations

import copy

import pytest
import torch

from pyunlearn.data import SampleSet
from pyunlearn.unlearn import fine_tune, gradient_ascent, label_flip
from pyunlearn.unlearn.label_flip import random_wrong_labels
from tests.support import TinyNet, tiny_data


def _samples(n=64, seed=0):
    ids, x, y = tiny_data(n, seed=seed)
    return SampleSet(ids, x, y)


def _model():
    torch.manual_seed(0)
    return TinyNet()


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
