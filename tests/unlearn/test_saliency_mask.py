"""Forget-set saliency masks for partial label flipping / gradient ascent (issue 15, part 6)."""
from __future__ import annotations

import copy

import pytest
import torch

from pyunlearn.data import SampleSet
from pyunlearn.unlearn import gradient_ascent, label_flip


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(1)
    forget = SampleSet(torch.arange(64), torch.randn(64, 6, generator=gen), torch.randint(0, 4, (64,), generator=gen))
    return model, forget


def _salient(model, forget, keep):
    """By hand: per parameter, the ceil(keep·numel) positions of largest |∇ Σ CE(forget)|."""
    m = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(m(forget.x), forget.y, reduction="sum").backward()
    out = []
    for p in m.parameters():
        k = max(1, -(-int(keep * p.numel() * 1000) // 1000))
        out.append(set(torch.topk(p.grad.abs().reshape(-1), k).indices.tolist()))
    return out


def _changed(before, after):
    return [set(torch.nonzero((a != b).reshape(-1)).flatten().tolist())
            for a, b in zip(before.parameters(), after.parameters())]


@pytest.mark.parametrize("method", [label_flip, gradient_ascent])
def test_the_saliency_mask_changes_only_the_forget_sets_salient_entries(method):
    model, forget = _setup()
    salient = _salient(model, forget, 0.1)
    masked = copy.deepcopy(model)
    method(masked, forget, 0.1, mask="saliency", epochs=3, max_steps=None)
    changed = _changed(model, masked)
    assert all(c <= s for c, s in zip(changed, salient))
    assert sum(map(len, changed)) > 0.8 * sum(map(len, salient))  # and it does use them
    if method is label_flip:  # its per-step mask follows the flipped labels' gradients, beyond that set
        per_step = copy.deepcopy(model)
        method(per_step, forget, 0.1, mask="step", epochs=3, max_steps=None)
        assert any(not c <= s for c, s in zip(_changed(model, per_step), salient))


def test_mask_arguments_are_checked():
    model, forget = _setup()
    with pytest.raises(ValueError, match="mask"):
        label_flip(copy.deepcopy(model), forget, 0.1, mask="salun")
    with pytest.raises(ValueError, match="needs keep"):
        gradient_ascent(copy.deepcopy(model), forget, None, mask="saliency")
