"""nero_optax inside optax: chain, inject_hyperparams, masked/partition, abstract init, state types and shardings,
non-finite gradients, Flax Linen variables, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import nero_optax  # noqa: E402


def make_params(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(6, 4)), dtype),
            "bias": jnp.asarray(rng.normal(size=4), dtype),
        },
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 5)), dtype)},
        "scale": jnp.asarray(rng.normal(size=()), dtype),
    }


def make_grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def assert_trees_close(a, b, tolerance):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=tolerance, rtol=0)


def test_chain_with_clipping_equals_nero_on_clipped_grads():
    params, grads = make_params(jnp.float64), make_grads(make_params(jnp.float64))
    chained = optax.chain(optax.clip_by_global_norm(0.5), nero_optax.nero())
    updates, _ = jax.jit(chained.update)(grads, chained.init(params), params)
    clipped, _ = optax.clip_by_global_norm(0.5).update(grads, optax.EmptyState())
    alone = nero_optax.nero()
    expected, _ = alone.update(clipped, alone.init(params), params)
    assert_trees_close(updates, expected, 1e-14)


def test_inject_hyperparams_schedules_lr_without_recompiling():
    params = make_params(jnp.float64)
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    opt = optax.inject_hyperparams(nero_optax.nero, static_args="neuron_axis", hyperparam_dtype=jnp.float64)(
        learning_rate=schedule
    )
    step = jax.jit(opt.update)
    state, p = opt.init(params), params
    manual_state, q = nero_optax.nero().init(params), params
    for i in range(4):
        grads = make_grads(params, seed=i)
        updates, state = step(grads, state, p)
        p = optax.apply_updates(p, updates)
        lr = float(state.hyperparams["learning_rate"])  # the schedule's value, as inject_hyperparams stores it
        assert lr == pytest.approx(0.1 * 0.5**i, rel=1e-6)
        manual, manual_state = nero_optax.nero(learning_rate=lr).update(grads, manual_state, q)
        q = optax.apply_updates(q, manual)
    assert step._cache_size() == 1
    assert_trees_close(p, q, 1e-13)
    assert state.inner_state.count == 4


def test_inject_hyperparams_names_the_fix_for_an_array_neuron_axis():
    with pytest.raises(TypeError, match="static_args='neuron_axis'"):
        optax.inject_hyperparams(nero_optax.nero)(learning_rate=0.1).init(make_params())


def test_masked_and_partition_leave_other_leaves_alone():
    params, grads = make_params(jnp.float64), make_grads(make_params(jnp.float64))
    mask = {"dense": {"kernel": True, "bias": False}, "conv": {"kernel": True}, "scale": False}
    axes = {"dense": {"kernel": -1, "bias": None}, "conv": {"kernel": 3}, "scale": None}  # the whole model's tree
    masked = optax.masked(nero_optax.nero(neuron_axis=axes), mask)
    updates, state = jax.jit(masked.update)(grads, masked.init(params), params)
    assert state.inner_state.count == 1
    np.testing.assert_array_equal(updates["scale"], grads["scale"])  # optax.masked passes the rest through
    labels = jax.tree.map(lambda m: "nero" if m else "frozen", mask)
    partition = optax.partition({"nero": nero_optax.nero(neuron_axis=axes), "frozen": optax.set_to_zero()}, labels)
    by_partition, _ = jax.jit(partition.update)(grads, partition.init(params), params)
    assert np.all(np.asarray(by_partition["dense"]["bias"]) == 0)
    sub = {"dense": {"kernel": params["dense"]["kernel"]}, "conv": params["conv"]}
    alone = nero_optax.nero()
    sub_grads = {"dense": {"kernel": grads["dense"]["kernel"]}, "conv": grads["conv"]}
    expected, _ = alone.update(sub_grads, alone.init(sub), sub)
    for got in (updates, by_partition):
        assert_trees_close([got["dense"]["kernel"], got["conv"]], [expected["dense"]["kernel"], expected["conv"]],
                           1e-14)


def test_flax_linen_variables_train_balanced_columns():
    nn = pytest.importorskip("flax.linen")
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    x = jnp.ones((2, 5), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    opt = nero_optax.nero()
    grads = jax.grad(lambda v: jnp.sum(model.apply(v, x) ** 2))(variables)
    updates, _ = jax.jit(opt.update)(grads, opt.init(variables), variables)
    new = optax.apply_updates(variables, updates)
    for layer in new["params"].values():
        kernel = np.asarray(layer["kernel"], np.float64)  # (in, out): each column is a neuron
        np.testing.assert_allclose(kernel.mean(axis=0), 0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# State: abstract init, dtypes, shapes and shardings stable across init/update and eager/jit.

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]


def types(tree):
    return jax.tree.map(lambda x: (jax.typeof(x), getattr(x, "sharding", None)), tree)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "core"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_state_types_and_shardings_are_stable(dtype, fused):
    opt = nero_optax.nero(fused=fused)
    params, grads = make_params(dtype), make_grads(make_params(dtype))
    eager_init, jit_init = opt.init(params), jax.jit(opt.init)(params)
    eager_update = opt.update(grads, eager_init, params)
    jit_update = jax.jit(opt.update)(grads, eager_init, params)
    expected = types(eager_init)
    for state in (jit_init, eager_update[1], jit_update[1]):
        assert types(state) == expected
    assert types(eager_update[0]) == types(params) == types(jit_update[0])
    state_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    assert {x.dtype for x in jax.tree.leaves((eager_init.v, eager_init.sigma))} == {jnp.dtype(state_dtype)}
    assert eager_init.v["dense"]["kernel"].shape == (4,) and eager_init.v["conv"]["kernel"].shape == (5,)
    assert eager_init.v["dense"]["bias"].shape == (4,) and eager_init.count.dtype == jnp.int32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_state_survives_lax_cond_like_optax_checks(dtype):
    """optax's own stability check: a jitted step that picks update or no update with lax.cond."""
    opt = nero_optax.nero()
    params = make_params(dtype)

    @jax.jit
    def step(params, state, pick):
        grads = make_grads(params)
        updates, state = jax.lax.cond(pick, lambda: opt.update(grads, state, params), lambda: (params, state))
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for pick in (True, False, True):
        params, state = step(params, state, pick)
        assert jax.tree.leaves(params)[0].dtype == dtype


def test_init_reads_shapes_only():
    opt = nero_optax.nero()
    params = make_params(jnp.bfloat16)
    structs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    from_structs = opt.init(structs)
    assert types(from_structs) == types(opt.init(params))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(opt.init, params)) == jax.tree.map(
        lambda x: (x.shape, x.dtype), from_structs
    )


def test_state_follows_a_committed_device():
    device = jax.devices()[-1]
    params = jax.device_put(make_params(), device)
    state = nero_optax.nero().init(params)
    assert all(x.sharding == jax.sharding.SingleDeviceSharding(device) for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------------------------------------------
# Non-finite gradients: the whole step is skipped and counted, under jit.


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "core"])
def test_nonfinite_gradients_skip_the_step_under_jit(fused, bad):
    opt = nero_optax.nero(fused=fused)
    params = make_params()
    update = jax.jit(opt.update)
    _, state = update(make_grads(params, 1), opt.init(params), params)
    grads = make_grads(params, 2)
    grads["conv"]["kernel"] = grads["conv"]["kernel"].at[0, 1, 0, 2].set(bad)
    updates, skipped = update(grads, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert int(skipped.skipped) == 1 and int(skipped.count) == 1
    assert_trees_close((skipped.v, skipped.sigma), (state.v, state.sigma), 0)
    _, resumed = update(make_grads(params, 3), skipped, params)
    assert int(resumed.count) == 2 and int(resumed.skipped) == 1


# ---------------------------------------------------------------------------------------------------------------
# Errors.


def test_integer_leaf_is_named():
    params = {"w": jnp.zeros((3, 4)), "steps": jnp.zeros((2,), jnp.int32)}
    with pytest.raises(TypeError, match=r"params leaf \['steps'\] has dtype int32: Nero needs real floating-point"):
        nero_optax.nero().init(params)


def test_complex_leaf_is_refused():
    with pytest.raises(TypeError, match=r"\['z'\] has dtype complex64"):
        nero_optax.nero().init({"z": jnp.zeros((3, 4), jnp.complex64)})


def test_integer_gradient_is_named():
    params = make_params()
    grads = make_grads(params)
    grads["scale"] = jnp.zeros((), jnp.int32)
    opt = nero_optax.nero()
    with pytest.raises(TypeError, match=r"grads leaf \['scale'\] has dtype int32"):
        opt.update(grads, opt.init(params), params)


@pytest.mark.parametrize(
    ("neuron_axis", "error", "message"),
    [
        ({"dense": {"kernel": -1}}, ValueError, r"does not match params"),
        ([0, 1], ValueError, r"does not match params"),
        ("last", ValueError, r"does not match params"),
        (lambda path, leaf: "first", TypeError, r"neuron_axis for leaf \['conv'\]\['kernel'\] must be an int or None"),
        (4, ValueError, r"neuron_axis 4 is out of range for leaf \['conv'\]\['kernel'\] of shape \(3, 3, 2, 5\)"),
    ],
)
def test_bad_neuron_axis(neuron_axis, error, message):
    with pytest.raises(error, match=message):
        nero_optax.nero(neuron_axis=neuron_axis).init(make_params())


def test_update_without_params_says_so():
    opt = nero_optax.nero()
    params = make_params()
    with pytest.raises(ValueError, match="nero needs the current params.*put nero last"):
        opt.update(make_grads(params), opt.init(params))


@pytest.mark.parametrize(
    ("kwargs", "message"), [(dict(learning_rate=-1.0), "learning_rate must be"), (dict(beta=1.0), "beta must")]
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nero_optax.nero(**kwargs)
