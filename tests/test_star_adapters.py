"""The optax and torch STAR wrappers agree with the core rule they call."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nero_core._star import star as star_rule

SHAPES = {"dense": (5, 3), "bias": (3,), "conv": (4, 2, 3, 3), "scale": ()}
STEPS = 4


def meta_params(seed=0):
    rng = np.random.default_rng(seed)
    sizes = (39, 4, 4, 4)
    meta = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        meta[f"w{i}"] = rng.normal(size=(a, b)) / math.sqrt(a)
        meta[f"b{i}"] = rng.normal(size=(b,)) * 0.1
    return meta


def problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


OPTIONS = dict(step_mult=0.01, nominal_stepsize=0.01, weight_decay=0.01)


def core_history(params, grads, order):
    opt = star_rule(meta_params(), **OPTIONS)
    ps = [params[k] for k in order]
    state = opt.init(ps)
    out = []
    for g in grads:
        ps, state = opt.update([g[k] for k in order], state, ps)
        out.append(dict(zip(order, ps)))
    return out


def test_optax_wrapper_matches_core():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    from nero_optax.star import star

    params, grads = problem()
    tx = star(meta_params(), **OPTIONS)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)

    @jax.jit
    def step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    reference = core_history(params, grads, sorted(SHAPES))  # a dict's leaves come in sorted key order
    for g, ref in zip(grads, reference):
        p, state = step(p, state, {k: jnp.asarray(v) for k, v in g.items()})
        for k in SHAPES:
            assert p[k].dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(p, state)


def test_optax_wrapper_inits_from_shapes():
    jax = pytest.importorskip("jax")
    from nero_optax.star import star

    shapes = {"w": jax.ShapeDtypeStruct((3, 2), jax.numpy.float32)}
    state = star(meta_params()).init(shapes)
    assert state.m[0].shape == (3, 3, 2)


def test_tracing_the_optax_step_never_asks_a_tracer_for_its_device(monkeypatch):
    """A tracer's ``device`` raises an error whose message walks the whole program traced so far: asked once per
    tensor, it made tracing STAR's step quadratic in the number of tensors (minutes on the GPT-2-like set)."""
    jax = pytest.importorskip("jax")
    from jax._src.interpreters.partial_eval import DynamicJaxprTracer

    from nero_optax import agd, nero, star

    asked = []
    origin_msg = DynamicJaxprTracer._origin_msg  # (what the error message calls)
    monkeypatch.setattr(DynamicJaxprTracer, "_origin_msg", lambda self: asked.append(1) or origin_msg(self))
    shapes = [(8, 6), (6,), (6, 4), (4,), (4, 3, 3)]
    params = [jax.ShapeDtypeStruct(s, jax.numpy.float32) for s in shapes]
    for tx in (star(), nero(), agd()):
        state = jax.eval_shape(tx.init, params)
        jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)).lower(params, state, params)
    assert asked == []


@pytest.mark.parametrize("block_size", [None, 5])
def test_torch_wrapper_matches_core(block_size, monkeypatch):
    torch = pytest.importorskip("torch")
    import nero_torch.star
    from nero_torch.star import Star

    if block_size is not None:  # blocks of a few elements: every tensor runs over several
        monkeypatch.setattr(nero_torch.star, "BLOCK_SIZE", block_size)

    params, grads = problem()
    order = list(SHAPES)
    tensors = {k: torch.nn.Parameter(torch.from_numpy(params[k].copy())) for k in order}
    opt = Star([tensors[k] for k in order], meta_params(), **OPTIONS)
    reference = core_history(params, grads, order)
    for g, ref in zip(grads, reference):
        for k in order:
            tensors[k].grad = torch.from_numpy(g[k].copy())
        opt.step()
        for k in order:
            np.testing.assert_allclose(tensors[k].detach().numpy(), ref[k], rtol=1e-6, atol=1e-7)
    first = opt.state[tensors["dense"]]
    assert int(first["step"]) == STEPS and first["m"].shape == (3, 5, 3)
    # The state survives a state_dict round trip.
    clone = Star([torch.nn.Parameter(t.detach().clone()) for t in tensors.values()], meta_params(), **OPTIONS)
    clone.load_state_dict(opt.state_dict())
    assert int(clone.state[clone.param_groups[0]["params"][0]]["step"]) == STEPS


def test_torch_wrapper_on_half_precision_matches_core():
    """bfloat16 parameters take the core rule's path (float32 state, a copy back), not the in-place one."""
    torch = pytest.importorskip("torch")
    from nero_torch.star import Star

    params, grads = problem()
    tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy()).to(torch.bfloat16)) for k, v in params.items()}
    opt = Star(list(tensors.values()), meta_params(), **OPTIONS)
    rule = star_rule(meta_params(), **OPTIONS)
    ps = [t.detach().clone() for t in tensors.values()]
    state = rule.init(ps)
    for g in grads:
        for k, t in tensors.items():
            t.grad = torch.from_numpy(g[k].copy()).to(torch.bfloat16)
        opt.step()
        ps, state = rule.update([t.grad for t in tensors.values()], state, ps)
        for t, ref in zip(tensors.values(), ps):
            assert t.dtype == torch.bfloat16
            torch.testing.assert_close(t.detach(), ref, rtol=1e-2, atol=1e-3)  # a bfloat16 rounding either way


def test_torch_wrapper_skips_a_nonfinite_step():
    torch = pytest.importorskip("torch")
    from nero_torch.star import Star

    params, grads = problem()
    tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params.values()]
    opt = Star(tensors, meta_params(), **OPTIONS)
    for t, g in zip(tensors, grads[0].values()):
        t.grad = torch.from_numpy(g.copy())
    opt.step()
    before = [t.detach().clone() for t in tensors]
    state_before = {k: opt.state[tensors[0]][k].clone() for k in ("m", "v", "fac_row", "fac_col")}
    tensors[1].grad[0] = float("nan")
    opt.step()
    for t, b in zip(tensors, before):
        torch.testing.assert_close(t.detach(), b, rtol=0, atol=0)
    for k, v in state_before.items():
        torch.testing.assert_close(opt.state[tensors[0]][k], v, rtol=0, atol=0)
    assert int(opt.state[tensors[0]]["step"]) == 1 and int(opt.state[tensors[0]]["skipped"]) == 1


def test_torch_wrapper_trains_a_linear_model():
    torch = pytest.importorskip("torch")
    from nero_torch.star import Star

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    opt = Star(model.parameters(), meta_params(), step_mult=0.0, nominal_stepsize=0.05)
    start = torch.nn.functional.mse_loss(model(x), y).item()
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * start
