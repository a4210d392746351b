"""Metrics on hand-made cases (a perfect model, a random one, memorisers), the signals that can
tell (KS, KL, membership and generalisation gaps, MIA over seeds), and on the model's device."""
from __future__ import annotations

import pytest
import torch

import pyunlearn as pu
from pyunlearn.data import SampleSet
from pyunlearn.evaluation.metrics import Evaluation, accuracy, class_logits, evaluate, mia_efficacy
from tests.support import TinyNet, tiny_data


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


# ---------------------------------------------------------------------------- issue 15: signals that can tell
import numpy as np  # noqa: E402

from pyunlearn.evaluation.metrics import (compare, ks_statistic, losses, membership_gap, mia_spread,  # noqa: E402
                               output_kl)


def test_ks_statistic_matches_scipy_and_its_edge_cases():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    for n, m, shift in ((50, 70, 0.0), (200, 30, 0.5), (10, 10, 3.0)):
        a, b = rng.normal(size=n), rng.normal(shift, 1.0, size=m)
        assert ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic, abs=1e-12)
    assert ks_statistic([1.0, 2.0, 2.0], [2.0, 1.0, 2.0]) == 0.0        # same samples, any order
    assert ks_statistic([0.0, 1.0], [5.0, 6.0, 7.0]) == 1.0              # no overlap
    assert ks_statistic([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="non-empty"):
        ks_statistic([], [1.0])


def test_losses_membership_gap_and_kl_by_hand():
    forget, test = _set(40, 0, 1), _set(60, 100, 2)
    sure, unsure = Oracle(confident=True), Oracle(confident=False)
    # One-hot logits times s over 4 classes: loss = log(1 + 3·e^(−s)).
    assert np.allclose(losses(unsure, test), np.log(1 + 3 * np.exp(-2.0)), atol=1e-6)

    class Mixed(torch.nn.Module):  # sure on the forget IDs (< 100), unsure elsewhere
        def forward(self, x):
            return sure(x) if float(x[0, 1]) < 100 else unsure(x)

    for s in (forget, test):
        s.x[:, 1] = s.ids.float()
    expected = np.log(1 + 3 * np.exp(-20.0)) - np.log(1 + 3 * np.exp(-2.0))
    assert membership_gap(Mixed(), forget=forget, test=test) == pytest.approx(expected, abs=1e-5)
    assert membership_gap(unsure, forget=forget, test=test) == pytest.approx(0.0, abs=1e-6)
    # KL(p ‖ q) for p = softmax(20·onehot), q = softmax(2·onehot), per sample (all alike).
    p = torch.softmax(torch.tensor([20.0, 0, 0, 0], dtype=torch.float64), 0)
    q = torch.softmax(torch.tensor([2.0, 0, 0, 0], dtype=torch.float64), 0)
    kl = float((p * (p / q).log()).sum())
    assert output_kl(unsure, sure, forget) == pytest.approx(kl, rel=1e-4)
    assert output_kl(sure, sure, forget) == pytest.approx(0.0, abs=1e-9)
    c = compare(unsure, sure, forget)
    assert c.forget_loss_ks == 1.0 and c.forget_kl == pytest.approx(kl, rel=1e-4)


def _memoriser_sets():
    """Retained samples whose first 100 the model is sure of (logit scale 20; the other 900:
    0.5), 100 test samples at 1.5, and forget sets at 20 (remembered) and 0.5 (forgotten)."""

    class Memoriser(torch.nn.Module):
        def forward(self, x):
            sure = (x[:, 1] < 100) | (x[:, 1] >= 5000)
            test = (x[:, 1] >= 2000) & (x[:, 1] < 3000)
            scale = torch.where(sure, torch.tensor(20.0), torch.where(test, torch.tensor(1.5), torch.tensor(0.5)))
            return torch.nn.functional.one_hot(x[:, 0].long(), 4).float() * scale[:, None]

    def tagged(n, first):
        s = _set(n, first, first)
        s.x[:, 1] = s.ids.float()
        return s

    return Memoriser(), tagged(1000, 0), tagged(100, 2000), tagged(50, 5000), tagged(50, 3000)


def test_the_reference_protocol_uses_the_first_retained_samples_and_the_whole_test_set():
    model, retain, test, remembered, forgotten = _memoriser_sets()
    for seed in (0, 1, 2):  # nothing is drawn: the seed does not matter
        assert mia_efficacy(model, forget=remembered, retain=retain, test=test, seed=seed, protocol="reference") == 0.0
        assert mia_efficacy(model, forget=forgotten, retain=retain, test=test, seed=seed, protocol="reference") == 100.0
    # Sampled: most members drawn are among the 900 at scale 0.5, so the attack learns 0.5 =
    # member, and calls the forgotten samples (0.5) members.
    assert mia_efficacy(model, forget=forgotten, retain=retain, test=test, protocol="sampled") == 0.0
    with pytest.raises(ValueError, match="protocol"):
        mia_efficacy(model, forget=forgotten, retain=retain, test=test, protocol="salun")
    with pytest.raises(ValueError, match="mia_protocol"):
        evaluate(model, forget=forgotten, retain=retain, test=test, mia_protocol="salun")
    e = evaluate(model, forget=remembered, retain=retain, test=test, mia_protocol="reference")
    assert e.MIA == 0.0


def test_mia_spread_averages_the_attack_seeds():
    forget, retain, test = _set(80, 0, 1), _set(600, 1000, 2), _set(600, 5000, 3)
    model = Coin()
    spread = mia_spread(model, forget=forget, retain=retain, test=test, seeds=(0, 1, 2, 3), max_samples=300)
    # Coin's outputs depend on its generator's position: a fresh Coin repeats the first seed's value.
    again = [mia_efficacy(Coin(), forget=forget, retain=retain, test=test, seed=0, max_samples=300)]
    assert len(spread.values) == 4 and all(0.0 <= v <= 100.0 for v in spread.values)
    assert spread.mean == pytest.approx(np.mean(spread.values))
    assert spread.sd == pytest.approx(np.std(spread.values, ddof=1))
    assert again[0] == spread.values[0]
    assert len(set(spread.values)) > 1  # a random model: the attack's draw matters
    one = mia_spread(Oracle(), forget=forget, retain=retain, test=test, seeds=(5,), max_samples=300)
    assert one.sd == 0.0 and one.values == [mia_efficacy(Oracle(), forget=forget, retain=retain, test=test,
                                                         seed=5, max_samples=300)]
    with pytest.raises(ValueError, match="seeds"):
        mia_spread(model, forget=forget, retain=retain, test=test, seeds=())


def test_generalisation_gap_by_hand_and_on_a_bounded_draw():
    from pyunlearn.evaluation.metrics import generalisation_gap

    sure, unsure = Oracle(confident=True), Oracle(confident=False)

    class Memoriser(torch.nn.Module):  # sure on the trained IDs (< 1000), unsure on the rest
        def forward(self, x):
            return torch.where(x[:, 1:2] < 1000, sure(x), unsure(x))

    retain, held_out = _set(300, 0, 1), _set(200, 1000, 2)
    for s in (retain, held_out):
        s.x[:, 1] = s.ids.float()
    expected = np.log(1 + 3 * np.exp(-2.0)) - np.log(1 + 3 * np.exp(-20.0))  # unsure loss − sure loss
    assert generalisation_gap(Memoriser(), retain=retain, held_out=held_out) == pytest.approx(expected, abs=1e-5)
    assert generalisation_gap(unsure, retain=retain, held_out=held_out) == pytest.approx(0.0, abs=1e-6)

    # At most `samples` of each set, drawn under the seed: the same draw gives the same gap.
    class Counting(torch.nn.Module):
        seen = 0

        def forward(self, x):
            Counting.seen += len(x)
            return Memoriser()(x) + torch.nn.functional.pad(x[:, 2:3], (0, 3))  # class 0's logit varies by sample

    counting = Counting()
    first = generalisation_gap(counting, retain=retain, held_out=held_out, samples=50, seed=4)
    assert Counting.seen == 100
    assert generalisation_gap(counting, retain=retain, held_out=held_out, samples=50, seed=4) == first
    assert generalisation_gap(counting, retain=retain, held_out=held_out, samples=50, seed=5) != first


def test_generalisation_gap_bad_inputs():
    from pyunlearn.evaluation.metrics import generalisation_gap

    data, model = _set(20), Oracle()
    with pytest.raises(ValueError, match="samples must be a positive int"):
        generalisation_gap(model, retain=data, held_out=data, samples=0)
    with pytest.raises(ValueError, match="seed must be an int"):
        generalisation_gap(model, retain=data, held_out=data, seed=1.5)
    with pytest.raises(ValueError, match="size must be a positive int"):
        data.draw(-3, seed=0)
    with pytest.raises(TypeError, match="held_out must be a pyunlearn.data.SampleSet"):
        generalisation_gap(model, retain=data, held_out=[1, 2])
    with pytest.raises(ValueError, match="retain is empty"):
        generalisation_gap(model, retain=data.subset(torch.arange(0)), held_out=data)
    narrow = SampleSet(data.ids, data.x, data.y + 10)  # labels past the model's 4 classes
    with pytest.raises(ValueError, match="held_out: the model cannot score these samples"):
        generalisation_gap(model, retain=data, held_out=narrow)

    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 4), float("nan"))

    with pytest.raises(ValueError, match="not finite"):
        generalisation_gap(Broken(), retain=data, held_out=data)


def test_evaluate_runs_on_the_models_device(device):
    torch.manual_seed(0)
    model = TinyNet()
    forget, retain, test = (SampleSet(*tiny_data(n, seed=s)) for n, s in ((20, 1), (60, 2), (60, 3)))
    on_cpu = pu.evaluation.metrics.evaluate(model, forget=forget, retain=retain, test=test, progress=False)
    on_device = pu.evaluation.metrics.evaluate(model.to(device), forget=forget, retain=retain, test=test, progress=False)
    # The same model on another device: the same predictions up to the device's float rounding.
    assert on_device.gap(on_cpu) <= 2.0
    assert all(p.device.type == device.type for p in model.parameters())


def test_evaluate_progress_is_off_unless_asked(capsys):
    from pyunlearn import data
    from pyunlearn.evaluation import metrics
    from pyunlearn.models import DigitsCNN

    train_set, test_set = data.split(data.digits(), 0.2, seed=0)
    forget = train_set.subset(torch.arange(10))
    retain = train_set.without(forget.ids)
    metrics.evaluate(DigitsCNN(), forget=forget, retain=retain, test=test_set, mia_samples=50)
    assert "evaluating" not in capsys.readouterr().err  # standard error is not a terminal here
    metrics.evaluate(DigitsCNN(), forget=forget, retain=retain, test=test_set, mia_samples=50, progress=True)
    assert "evaluating: 100%" in capsys.readouterr().err


def test_class_logits_reads_a_tensor_or_a_hugging_face_output_and_refuses_the_rest():
    from dataclasses import dataclass

    @dataclass
    class Output:  # what a transformers ModelOutput offers: attributes, .logits among them
        logits: torch.Tensor
        loss: torch.Tensor | None = None

    logits = torch.randn(3, 4)
    assert class_logits(logits) is logits and class_logits(Output(logits)) is logits
    for output in ((logits, torch.zeros(3)), {"logits": logits}, Output(logits=None)):
        with pytest.raises(TypeError, match=f"model\\(x\\) returned {type(output).__name__}, not class logits.*Wrap the "
                                            "model in a module whose forward returns the logits"):
            class_logits(output)
    with pytest.raises(ValueError, match=r"logits of shape \(3, 5, 4\), not \(batch, classes\).*amnesiac_forget"):
        class_logits(Output(torch.randn(3, 5, 4)))  # a language model's, one row per token
    with pytest.raises(TypeError, match="returned tuple"):  # the metrics say so, not cross_entropy
        accuracy(_TupleNet(), SampleSet(torch.arange(4), torch.randn(4, 8), torch.zeros(4, dtype=torch.long)))


class _TupleNet(torch.nn.Module):
    def forward(self, x):
        return x[:, :4], x
