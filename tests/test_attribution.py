"""Gradient (momentum-aware) attribution (pyunlearn/attribution.py): each step's effect on the
final weights, by hand for SGD with momentum and Adam, the coefficient rules, the optimizer
families, and what it refuses."""
from __future__ import annotations

import pytest
import torch

import pyunlearn as pu
from pyunlearn import attribution
from pyunlearn.attribution import coefficients
from tests.support import TinyNet, recorded_store


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
