"""nero_torch.agd.AGD against the core rule it wraps, and the torch.optim behaviour users rely on."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nero_core._agd import agd, agd_init  # noqa: E402
from nero_torch.agd import AGD  # noqa: E402


def make_model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5),
        torch.nn.LayerNorm(5),
        torch.nn.Linear(5, 3, bias=False),
    ).to(dtype)


def numpy_params(model):
    return [p.detach().numpy().copy() for p in model.parameters()]


def set_random_grads(model, seed):
    rng = np.random.default_rng(seed)
    grads = []
    for p in model.parameters():
        g = rng.normal(size=tuple(p.shape)) * rng.uniform(0.1, 5)
        p.grad = torch.from_numpy(g).to(p.dtype)
        grads.append(g)
    return grads


@pytest.mark.parametrize("gain", [1.0, 0.25])
def test_steps_match_the_core_rule(gain):
    model = make_model()
    opt = AGD(model.parameters(), gain=gain)
    rule = agd(gain)
    params = numpy_params(model)
    state = rule.init(params)
    for step in range(3):
        grads = set_random_grads(model, step)
        eta = opt.step()
        params, state = rule.update(grads, state, params)
        assert isinstance(eta, float) and eta == pytest.approx(float(state.eta), rel=1e-14)
        for p, q in zip(model.parameters(), params):
            np.testing.assert_allclose(p.detach().numpy(), q, rtol=0, atol=1e-13)
    slot = opt.state[next(iter(model.parameters()))]
    assert int(slot["count"]) == 3 and int(slot["skipped"]) == 0


def test_init_weights_is_the_core_initialisation():
    model = make_model()
    before = numpy_params(model)
    AGD(model.parameters()).init_weights(seed=5)
    expected = agd_init(before, seed=5)
    for p, q, old in zip(model.parameters(), expected, before):
        np.testing.assert_array_equal(p.detach().numpy(), q)
        if p.ndim < 2:
            np.testing.assert_array_equal(p.detach().numpy(), old)  # biases and norm gains are left alone
    conv = model[0].weight.detach().numpy()
    values = np.linalg.svd(np.moveaxis(conv, (0, 1), (-2, -1)), compute_uv=False)
    np.testing.assert_allclose(values, math.sqrt(4 / 3) / 3, rtol=1e-12)


def test_missing_gradient_counts_as_zero():
    model = make_model()
    opt = AGD(model.parameters())
    grads = set_random_grads(model, 1)
    model[3].weight.grad = None
    grads[2] = np.zeros_like(grads[2])
    before = numpy_params(model)
    eta = opt.step()
    expected, state = agd().update(grads, agd().init(before), before)
    assert eta == pytest.approx(float(state.eta), rel=1e-14)
    np.testing.assert_array_equal(model[3].weight.detach().numpy(), before[2])
    for p, q in zip(model.parameters(), expected):
        np.testing.assert_allclose(p.detach().numpy(), q, rtol=0, atol=1e-13)


def test_state_dict_round_trip_continues_identically():
    model, twin = make_model(), make_model()
    opt, other = AGD(model.parameters()), AGD(twin.parameters())
    for step in range(2):
        set_random_grads(model, step)
        opt.step()
    twin.load_state_dict(model.state_dict())
    other.load_state_dict(opt.state_dict())
    set_random_grads(model, 7)
    set_random_grads(twin, 7)
    assert opt.step() == other.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert int(other.state[next(iter(twin.parameters()))]["count"]) == 3


def test_float32_and_nonfinite_skip():
    model = make_model(torch.float32)
    opt = AGD(model.parameters())
    set_random_grads(model, 0)
    eta = opt.step()
    before = numpy_params(model)
    set_random_grads(model, 1)
    model[0].bias.grad[0] = math.nan
    assert opt.step() == eta  # skipped: the last eta is reported again, nothing moves
    for p, q in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.detach().numpy(), q)
    slot = opt.state[model[0].weight]
    assert slot["eta"].dtype == torch.float32 and int(slot["skipped"]) == 1 and int(slot["count"]) == 1


def test_closure_is_called_and_training_descends():
    torch.manual_seed(1)
    x = torch.randn(256, 20)
    y = (x @ torch.randn(20, 4)).argmax(1)  # a teacher: learnable labels
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = AGD(model.parameters())
    opt.init_weights(seed=0)
    losses = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        return loss

    etas = [opt.step(closure) for _ in range(40)]
    assert len(losses) == 40 and losses[-1] < 0.5 * losses[0]
    assert all(e > 0 for e in etas)


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match=r"gain must be a finite number in \[0.0, inf\], got -1"):
        AGD(model.parameters(), gain=-1)
    groups = [{"params": [model[0].weight]}, {"params": [model[3].weight]}]
    with pytest.raises(ValueError, match=r"AGD treats the parameters as one network"):
        AGD(groups)
