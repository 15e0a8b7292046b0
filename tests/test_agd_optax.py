"""nero_optax.agd against the core rule it wraps, on Flax-layout pytrees."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from nero_core._agd import AGDState  # noqa: E402
from nero_core._agd import agd as core_agd  # noqa: E402
from nero_core._agd import agd_init as core_agd_init  # noqa: E402
from nero_optax.agd import agd, agd_init  # noqa: E402


def make_params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    shapes = {
        "Conv_0": {"kernel": (3, 3, 2, 4), "bias": (4,)},
        "Dense_0": {"kernel": (36, 6), "bias": (6,)},
        "LayerNorm_0": {"scale": (6,), "bias": (6,)},
        "Dense_1": {"kernel": (6, 3), "bias": (3,)},
    }
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s).astype(dtype)), shapes,
                                  is_leaf=lambda s: isinstance(s, tuple))


def random_grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape) * rng.uniform(0.1, 5)), params)


# Leaf order: Conv_0/{bias, kernel}, Dense_0/{bias, kernel}, Dense_1/{bias, kernel}, LayerNorm_0/{bias, scale}.
# Each bias follows the kernel beside it; the LayerNorm has none, so it follows the weight before it (Dense_1).
ATTACH = [1, None, 3, None, 5, None, 5, 5]


def test_leaf_order_is_what_the_attachment_assumes():
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(make_params())[0]]
    assert paths == [
        "['Conv_0']['bias']", "['Conv_0']['kernel']", "['Dense_0']['bias']", "['Dense_0']['kernel']",
        "['Dense_1']['bias']", "['Dense_1']['kernel']", "['LayerNorm_0']['bias']", "['LayerNorm_0']['scale']",
    ]


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_updates_match_the_core_rule(gain):
    params = make_params()
    tx = agd(gain)
    state = tx.init(params)
    rule = core_agd(gain, layout="flax", attach=ATTACH)
    leaves = jax.tree_util.tree_leaves(params)
    core_state = rule.init(leaves)
    update = jax.jit(tx.update)
    for step in range(3):
        grads = random_grads(params, step)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        leaves, core_state = rule.update(jax.tree_util.tree_leaves(grads), core_state, leaves)
        assert isinstance(state, AGDState)
        np.testing.assert_allclose(float(state.eta), float(core_state.eta), rtol=1e-15)
        for a, b in zip(jax.tree_util.tree_leaves(params), leaves):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-13)
    assert int(state.count) == 3


def test_update_needs_no_params_and_is_exactly_the_negated_step():
    params = make_params()
    grads = random_grads(params, 1)
    tx = agd()
    updates, _ = tx.update(grads, tx.init(params))
    new, _ = core_agd(layout="flax", attach=ATTACH).update(
        jax.tree_util.tree_leaves(grads), tx.init(params), jax.tree_util.tree_leaves(params)
    )
    for u, p, q in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params), new):
        np.testing.assert_array_equal(np.asarray(p - (-u)), np.asarray(p + u))
        np.testing.assert_allclose(np.asarray(p + u), np.asarray(q), rtol=0, atol=1e-14)


def test_inject_hyperparams_gain():
    params = make_params(dtype=np.float32)
    grads = random_grads(params, 2)
    injected = optax.inject_hyperparams(agd)(gain=0.5)
    plain = agd(0.5)
    u1, s1 = jax.jit(injected.update)(grads, injected.init(params), params)
    u2, s2 = plain.update(grads, plain.init(params), params)
    for a, b in zip(jax.tree_util.tree_leaves(u1), jax.tree_util.tree_leaves(u2)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert s1.inner_state.eta == pytest.approx(float(s2.eta), rel=1e-6)


def test_init_reads_shapes_only():
    shapes = jax.eval_shape(lambda: make_params(dtype=np.float32))
    state = agd().init(shapes)
    assert state.eta.dtype == jnp.float32 and int(state.count) == 0


def test_agd_init_on_a_pytree():
    params = make_params()
    new = agd_init(params, seed=4)
    leaves = jax.tree_util.tree_leaves(params)
    for a, b in zip(jax.tree_util.tree_leaves(new), core_agd_init(leaves, seed=4, layout="flax")):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernel = np.asarray(new["Conv_0"]["kernel"])  # (kh, kw, in, out)
    values = np.linalg.svd(np.swapaxes(kernel, -1, -2), compute_uv=False)
    np.testing.assert_allclose(values, math.sqrt(4 / 2) / 3, rtol=1e-12)
    assert new["Dense_0"]["bias"] is params["Dense_0"]["bias"]


def test_flax_model_trains():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.relu(nn.Dense(64)(x)))

    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (256, 20), dtype=jnp.float32)
    y = jnp.argmax(x @ jax.random.normal(jax.random.PRNGKey(1), (20, 4)), axis=1)  # a teacher: learnable labels
    model = MLP()
    params = agd_init(model.init(key, x)["params"], seed=0)
    tx = agd()
    state = tx.init(params)

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for _ in range(40):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0] and float(state.eta) > 0
