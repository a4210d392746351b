"""Layer-wise partial updates (LayerwiseMask): only each layer's top-k entries by |gradient|
move, with any optimizer, and the optimizer's state of the others stays as it was."""
from __future__ import annotations

import pytest
import torch

from pyunlearn.data import SampleSet
from pyunlearn.unlearn import LayerwiseMask
from tests.support import TinyNet, tiny_data


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
