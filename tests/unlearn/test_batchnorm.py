"""BatchNorm running statistics: recomputed from retained data, and a warning when forgetting
leaves them as trained."""
from __future__ import annotations

import warnings

import pytest
import torch

import pyunlearn as pu
from pyunlearn.data import SampleSet
from pyunlearn.unlearn import StaleBuffersWarning, gradient_ascent, label_flip, recompute_batchnorm


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.lin(x))))


def _data(n=240, seed=0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return SampleSet(torch.arange(n), torch.randn(n, 4, generator=gen) + shift, torch.randint(0, 3, (n,), generator=gen))


def _trained(tmp_path, model):
    torch.manual_seed(0)
    data = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32")
    with pu.UpdateRecorder(model, opt, store) as rec:
        for ids, x, y in data.batches(40, generator=torch.Generator().manual_seed(0)):
            rec.batch(ids)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return data, store


def test_recompute_gives_the_retained_data_statistics():
    torch.manual_seed(0)
    model = BNNet()
    model.bn.running_mean.fill_(5.0)  # as if trained on other data
    model.bn.running_var.fill_(9.0)
    model.bn.momentum = 0.3
    model.eval()
    data = _data(300, seed=1, shift=2.0)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert recompute_batchnorm(model, data, batch_size=100) == 300
    with torch.no_grad():
        pre = model.lin(data.x)  # what the BatchNorm layer sees
    # Equal batches: the cumulative average of the batch means is the mean over all samples.
    assert torch.allclose(model.bn.running_mean, pre.mean(0), atol=1e-5)
    batch_vars = torch.stack([pre[i:i + 100].var(0, unbiased=True) for i in range(0, 300, 100)])
    assert torch.allclose(model.bn.running_var, batch_vars.mean(0), atol=1e-4)
    assert model.bn.momentum == 0.3 and not model.training  # restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no parameter moved
    assert recompute_batchnorm(model, data, max_samples=50) == 50
    assert recompute_batchnorm(torch.nn.Linear(4, 3), data) == 0  # nothing to recompute
    with pytest.raises(TypeError, match="data"):
        recompute_batchnorm(model, data.x)
    with pytest.raises(ValueError, match="max_samples"):
        recompute_batchnorm(model, data, max_samples=0)


def test_forgetting_a_model_with_batchnorm_warns(tmp_path):
    model = BNNet()
    data, store = _trained(tmp_path, model)
    with pytest.warns(StaleBuffersWarning, match=r"recompute_batchnorm.*") as caught:
        pu.amnesiac_forget(model, store, [1, 2])
    assert "bn" in str(caught[0].message) and caught[0].filename == __file__  # points at the caller
    forget = data.subset(torch.arange(30))
    with pytest.warns(StaleBuffersWarning, match="label_flip"):
        label_flip(model, forget, epochs=1)
    with pytest.warns(StaleBuffersWarning, match="gradient_ascent"):
        gradient_ascent(model, forget, epochs=1)
    store.close()


def test_no_warning_without_running_statistics(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6, track_running_stats=False),
                                torch.nn.Linear(6, 3))
    _, store = _trained(tmp_path, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleBuffersWarning)
        pu.amnesiac_forget(model, store, [1, 2])
    store.close()
