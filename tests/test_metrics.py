"""Metrics on hand-made cases: a perfect model and a random one."""
from __future__ import annotations

import pytest
import torch

from pyunlearn.data import SampleSet
from pyunlearn.metrics import Evaluation, accuracy, evaluate, mia_efficacy


class Oracle(torch.nn.Module):
    """Predicts the label stored in the input's first feature, with a chosen confidence."""

    def __init__(self, classes=4, confident=True):
        super().__init__()
        self.classes = classes
        self.scale = 20.0 if confident else 2.0

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].long(), self.classes).float() * self.scale


class Coin(torch.nn.Module):
    """Uniformly random logits, whatever the input."""

    def __init__(self, classes=4, seed=0):
        super().__init__()
        self.classes, self.gen = classes, torch.Generator().manual_seed(seed)

    def forward(self, x):
        return torch.randn(len(x), self.classes, generator=self.gen)


def _set(n, first_id=0, seed=0, classes=4):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = torch.cat([y[:, None].float(), torch.randn(n, 3, generator=gen)], 1)
    return SampleSet(torch.arange(first_id, first_id + n), x, y)


def test_a_perfect_model():
    forget, retain, test = _set(50, 0, 1), _set(400, 100, 2), _set(300, 1000, 3)
    e = evaluate(Oracle(), forget=forget, retain=retain, test=test)
    assert (e.UA, e.RA, e.TA) == (0.0, 100.0, 100.0)
    # Members and non-members look alike (same confidence): the attack cannot do better than
    # calling everything one way, so MIA-efficacy is 0 or 100, nothing in between.
    assert e.MIA in (0.0, 100.0)


def test_a_random_model():
    forget, retain, test = _set(2000, 0, 1), _set(2000, 5000, 2), _set(2000, 9000, 3)
    e = evaluate(Coin(), forget=forget, retain=retain, test=test)
    for value in (e.RA, e.TA, 100 - e.UA):
        assert 20 < value < 30  # chance for 4 classes
    assert 0.0 <= e.MIA <= 100.0


def test_mia_tells_confident_members_from_unsure_non_members():
    """A model confident on its training data and unsure on the test data: forget samples that
    still get high confidence look like members (MIA-efficacy ~0), unsure ones like non-members."""

    class Memoriser(torch.nn.Module):
        def __init__(self, members):
            super().__init__()
            self.members = set(members)

        def forward(self, x):
            confident = torch.tensor([float(i) in self.members for i in x[:, 1].tolist()])
            scale = torch.where(confident, torch.tensor(20.0), torch.tensor(0.5))
            return torch.nn.functional.one_hot(x[:, 0].long(), 4).float() * scale[:, None]

    def tagged(n, first):
        s = _set(n, first, first)
        s.x[:, 1] = s.ids.float()
        return s

    retain, test, remembered, forgotten = tagged(300, 0), tagged(300, 1000), tagged(100, 2000), tagged(100, 3000)
    model = Memoriser(list(range(0, 300)) + list(range(2000, 2100)))
    assert mia_efficacy(model, forget=remembered, retain=retain, test=test) == 0.0
    assert mia_efficacy(model, forget=forgotten, retain=retain, test=test) == 100.0


def test_gap_and_determinism():
    a, b = Evaluation(10, 90, 80, 50), Evaluation(20, 80, 80, 30)
    assert a.gap(b) == pytest.approx((10 + 10 + 0 + 20) / 4)
    forget, retain, test = _set(100, 0, 1), _set(500, 200, 2), _set(500, 900, 3)
    model = Oracle(confident=False)
    assert evaluate(model, forget=forget, retain=retain, test=test, seed=4) == \
        evaluate(model, forget=forget, retain=retain, test=test, seed=4)


def test_bad_inputs():
    empty = _set(10).subset(torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="forget is empty"):
        evaluate(Oracle(), forget=empty, retain=_set(10), test=_set(10))
    with pytest.raises(TypeError, match="test must be a pyunlearn.data.SampleSet"):
        evaluate(Oracle(), forget=_set(10), retain=_set(10), test=[1, 2])
    with pytest.raises(ValueError, match="empty set"):
        accuracy(Oracle(), empty)
