"""nero_optax's numbers: against the float64 reference on Flax and Equinox models, against the core rule on
NumPy, the fused kernel against the core rule, and convergence on a fixed problem."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import nero_core  # noqa: E402
import nero_optax  # noqa: E402
from reference import ReferenceNero  # noqa: E402

STEPS = 20


def run_optax(opt, params, grad_fn, steps=STEPS, *, jit=True):
    """Step ``opt`` on ``params``; ``grad_fn(step, params)`` gives each step's gradients. Returns every step's
    params as flat NumPy leaves, and the gradients used."""
    update = jax.jit(opt.update) if jit else opt.update
    state = opt.init(params)
    history, used = [], []
    for step in range(steps):
        grads = grad_fn(step, params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append([np.asarray(x) for x in jax.tree.leaves(params)])
        used.append([np.asarray(g, np.float64) for g in jax.tree.leaves(grads)])
    return history, used, state


def run_reference(params, used, axes, **options):
    ps = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
    ref = ReferenceNero([p.shape for p in ps], axes, **options)
    history = []
    for grads in used:
        ps = ref.step(ps, grads)
        history.append(ps)
    return history


def max_deviation(history, reference):
    return max(
        float(np.max(np.abs(np.asarray(a, np.float64) - b), initial=0.0))
        for step_a, step_b in zip(history, reference)
        for a, b in zip(step_a, step_b)
    )


# ---------------------------------------------------------------------------------------------------------------
# Models: a Flax NNX model (embedding, conv, dense, LayerNorm) and an Equinox one (torch layout).


def flax_problem(dtype):
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(11, 6, rngs=rngs, param_dtype=dtype)
            self.conv = nnx.Conv(6, 5, kernel_size=(3,), rngs=rngs, param_dtype=dtype)
            self.norm = nnx.LayerNorm(5, rngs=rngs, param_dtype=dtype)
            self.head = nnx.Linear(5, 3, rngs=rngs, param_dtype=dtype)

        def __call__(self, tokens):
            x = self.embed(tokens)
            return self.head(self.norm(jnp.tanh(self.conv(x)))).mean(axis=1)

    model = Model(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (STEPS, 4, 7), 0, 11)
    targets = jax.random.normal(jax.random.key(2), (STEPS, 4, 3), dtype)

    @jax.jit
    def grad(params, tokens, targets):
        return jax.grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(tokens) - targets) ** 2))(params)

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    axes = [nero_optax.flax_neuron_axis(path, leaf) for path, leaf in flat]
    options = dict(neuron_axis=nero_optax.flax_neuron_axis)
    return params, lambda step, p: grad(p, tokens[step], targets[step]), axes, options


def equinox_problem(dtype):
    eqx = pytest.importorskip("equinox")
    keys = jax.random.split(jax.random.key(3), 4)
    model = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(2, 4, kernel_size=3, key=keys[0], dtype=dtype),
            eqx.nn.Lambda(lambda x: jnp.tanh(x).reshape(-1)),
            eqx.nn.Linear(4 * 3 * 3, 6, key=keys[1], dtype=dtype),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(6, 1, use_bias=False, key=keys[2], dtype=dtype),  # a single neuron
        ]
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    images = jax.random.normal(keys[3], (STEPS, 8, 2, 5, 5), dtype)

    @jax.jit
    def grad(params, images):
        return jax.grad(lambda p: jnp.mean((jax.vmap(eqx.combine(p, static))(images) - 0.5) ** 2))(params)

    return params, lambda step, p: grad(p, images[step]), [0] * len(jax.tree.leaves(params)), dict(neuron_axis=0)


PROBLEMS = {"flax": flax_problem, "equinox": equinox_problem}


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize(("dtype", "tolerance"), [(jnp.float64, 1e-12), (jnp.float32, 1e-5)], ids=["f64", "f32"])
def test_models_match_float64_reference(problem, dtype, tolerance):
    params, grad_fn, axes, options = PROBLEMS[problem](dtype)
    for fused, jit in [(True, True), (True, False)]:
        history, used, state = run_optax(nero_optax.nero(fused=fused, **options), params, grad_fn, jit=jit)
        assert all(x.dtype == dtype for x in history[-1])
        assert int(state.count) == STEPS
        assert max_deviation(history, run_reference(params, used, axes)) <= tolerance, (fused, jit)


# ---------------------------------------------------------------------------------------------------------------
# Fused kernel against the core rule, and both against the NumPy backend of the core.

# 2-D, conv, 1-D, 0-D, fan-in 1, zero-initialised, no neurons, no fan-in, one neuron, 3-D.
SHAPES = [(6, 5), (4, 3, 3, 3), (7,), (), (5, 1), (3, 4), (0, 4), (4, 0), (1, 6), (2, 3, 4)]
ZERO_INIT = {5}


def random_problem(seed, dtype, steps=STEPS, scale=1.0):
    rng = np.random.default_rng(seed)
    params = {
        f"p{i}": (np.zeros(s) if i in ZERO_INIT else rng.normal(size=s) * scale).astype(dtype)
        for i, s in enumerate(SHAPES)
    }
    grads = [{k: (rng.normal(size=p.shape) * rng.uniform(0.1, 3) * scale).astype(dtype) for k, p in params.items()}
             for _ in range(steps)]
    for g in grads[:3]:  # zero-initialised rows that see no gradient at first stay zero, then move
        g["p5"][0, :] = g["p5"][:, 0] = 0
    return params, grads


def grads_from(grads):
    return lambda step, params: jax.tree.map(jnp.asarray, grads[step])


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(centre=False),
        dict(normalise=False),
        dict(centre=False, normalise=False),
        dict(learning_rate=0.3, beta=0.9),
    ],
    ids=["default", "no-centre", "no-normalise", "unconstrained", "lr0.3-beta0.9"],
)
@pytest.mark.parametrize(("dtype", "tolerance"), [(np.float64, 1e-12), (np.float32, 1e-6)], ids=["f64", "f32"])
def test_fused_kernel_matches_core_rule(options, dtype, tolerance):
    params, grads = random_problem(1, dtype)
    neuron_axis = {k: axis for k, axis in zip(params, [0, 1, None, 0, 0, -1, 0, 1, 0, 1])}  # a tree: every layout
    params = jax.tree.map(jnp.asarray, params)
    fused, _, fused_state = run_optax(nero_optax.nero(neuron_axis=neuron_axis, **options), params, grads_from(grads))
    core, _, core_state = run_optax(
        nero_optax.nero(neuron_axis=neuron_axis, fused=False, **options), params, grads_from(grads)
    )
    assert max_deviation(fused, [[np.asarray(x, np.float64) for x in step] for step in core]) <= tolerance
    for a, b in zip(jax.tree.leaves(fused_state), jax.tree.leaves(core_state)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tolerance * 10)


@pytest.mark.parametrize("options", [{}, dict(normalise=False)], ids=["default", "no-normalise"])
def test_fused_kernel_batches_mixed_dtypes_like_the_core_rule(options):
    """The fused step runs the per-row maths of all neuron tensors whose state shares a dtype at once: a tree
    mixing float64, float32 and bfloat16 tensors (float32 state, rows always read), with a neuron that never gets
    a gradient (its v stays 0) and one that starts at zero, matches the core rule tensor by tensor."""
    rng = np.random.default_rng(5)
    params = {
        "a64": rng.normal(size=(6, 5)), "b32": rng.normal(size=(7, 4)).astype(np.float32),
        "c16": rng.normal(size=(5, 9)), "d32": rng.normal(size=(3, 8)).astype(np.float32),
    }
    params["d32"][:, 2] = 0.0  # a neuron (neurons last) that starts at zero
    params = {k: jnp.asarray(v, jnp.bfloat16 if k == "c16" else v.dtype) for k, v in params.items()}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(6)]
    for g in grads:
        g["b32"][:, 1] = 0.0  # a neuron that never gets a gradient
    grads = [{k: jnp.asarray(g[k], params[k].dtype) for k in g} for g in grads]
    fused, _, fused_state = run_optax(nero_optax.nero(**options), params, grads_from(grads), steps=6)
    core, _, core_state = run_optax(nero_optax.nero(fused=False, **options), params, grads_from(grads), steps=6)
    names = sorted(params)
    for step_fused, step_core in zip(fused, core):
        for name, x, y in zip(names, step_fused, step_core):
            tolerance = {"a64": 1e-12, "b32": 1e-6, "c16": 1e-2, "d32": 1e-6}[name]
            np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=0, atol=tolerance)
    assert np.all(np.asarray(fused_state.v["b32"])[1] == 0)
    for a, b in zip(jax.tree.leaves(fused_state), jax.tree.leaves(core_state)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5)


FUSED, CORE = nero_optax.nero(neuron_axis=0), nero_optax.nero(neuron_axis=0, fused=False)  # compiled once


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_fused_kernel_extreme_magnitudes(scale):
    params, grads = random_problem(2, np.float64, steps=5, scale=scale)
    params = jax.tree.map(jnp.asarray, params)
    fused, _, state = run_optax(FUSED, params, grads_from(grads), steps=5)
    core, _, _ = run_optax(CORE, params, grads_from(grads), steps=5)
    assert all(np.all(np.isfinite(x)) for x in fused[-1] + [np.asarray(v) for v in jax.tree.leaves(state)])
    assert max_deviation(fused, [[np.asarray(x, np.float64) for x in step] for step in core]) <= 1e-12 * max(scale, 1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "core"])
def test_same_update_as_numpy_core(fused):
    params, grads = random_problem(3, np.float64)
    axes = [-1] * len(SHAPES)
    numpy_rule = nero_core.nero(neuron_axis=axes)
    numpy_params = list(params.values())
    numpy_state = numpy_rule.init(numpy_params)
    numpy_history = []
    for g in grads:
        numpy_params, numpy_state = numpy_rule.update(list(g.values()), numpy_state, numpy_params)
        numpy_history.append(numpy_params)
    history, _, state = run_optax(nero_optax.nero(fused=fused), jax.tree.map(jnp.asarray, params), grads_from(grads))
    assert max_deviation(history, numpy_history) <= 1e-12
    np.testing.assert_allclose(np.asarray(state.v["p1"]), numpy_state.v[1], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Convergence on a fixed target, as optax's own alias tests do.


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "core"])
def test_learns_a_balanced_teacher(fused):
    """A linear student (torch-layout weight + bias) fits a teacher whose neurons are balanced, to 1e-4."""
    rng = np.random.default_rng(4)
    teacher_w = nero_core.balanced([rng.normal(size=(4, 16))])[0]
    teacher_b = np.array([0.5, -1.0, 0.25, 2.0])
    inputs = rng.normal(size=(256, 16)).astype(np.float32)
    targets = jnp.asarray(inputs @ teacher_w.T + teacher_b, jnp.float32)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, 16)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=4), jnp.float32),
    }

    def loss(params):
        return jnp.mean((inputs @ params["w"].T + params["b"] - targets) ** 2)

    schedule = optax.cosine_decay_schedule(0.05, 1500)
    opt = optax.inject_hyperparams(nero_optax.nero, static_args="neuron_axis")(
        learning_rate=schedule, neuron_axis=0, fused=fused
    )

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    start = float(loss(params))
    for _ in range(1500):
        params, state = step(params, state)
    assert start > 1.0
    assert float(loss(params)) < 1e-4
    np.testing.assert_allclose(np.asarray(params["w"]), teacher_w, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# The fused path's weak spots (issue 18): its per-row maths is the core's row_factors; these pin where it once
# differed from the core rule.


@pytest.mark.parametrize("v", [1e-43, 1e-45, 2e-38, 1e-30], ids=["subnormal", "smallest", "tiny-normal", "small"])
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_factors_finite_for_a_dead_neurons_tiny_v(v, storage):
    """A neuron whose gradients died out: ``v`` decayed to a float32 subnormal. ``sqrt(bc / v)`` (once in the
    fused path) overflows there and ``0 * inf`` wrote NaN into the row; GPUs keep subnormals, XLA on CPU flushes
    them, so the factor maths is checked on NumPy, which keeps them, with gradients as bf16 storage rounds them."""
    import array_api_compat.numpy as xp
    from nero_core._closed_form import row_factors

    ml_dtypes = pytest.importorskip("ml_dtypes")
    rows, n = 3, 8
    w = np.asarray(nero_core.balanced([np.random.default_rng(0).normal(size=(rows, n))])[0], np.float32)
    g = np.full((rows, n), np.sqrt(v) / 10, np.float32)  # |g|^2 well below v: v stays near where it was
    g[0] = 0  # and a neuron with no gradient at all this step
    if storage == "bfloat16":
        w, g = (x.astype(ml_dtypes.bfloat16).astype(np.float32) for x in (w, g))
    sums = (w.sum(1), (w * w).sum(1), g.sum(1), (g * g).sum(1), (w * g).sum(1))
    with np.errstate(under="ignore"):
        f = row_factors(*sums, np.full(rows, v, np.float32), np.float32(1), np.int32(5000), fan_in=n, lr=0.01,
                        beta=0.999, centre=True, normalise=True, xp=xp)
        new = f.scale[:, None] * w - f.step[:, None] * g - f.shift[:, None]
    assert all(np.all(np.isfinite(x)) for x in (*f[:5], new))
    assert not f.recompute.any()
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1, atol=1e-5)
    kept = (w[0] - w[0].mean()) / np.linalg.norm(w[0] - w[0].mean())  # (bf16 storage: balanced to its rounding)
    np.testing.assert_allclose(new[0], kept, atol=1e-6)  # no gradient: the row stays where it was


def test_first_update_of_rows_with_a_large_common_offset_is_exact_in_float32():
    """Weights around 1000 with spread 1: the centred norm from sums cancelled six digits, and the fused path's rows
    came out with norms from 0.7 to 1.3."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(1000, 1, size=(64, 8)), jnp.float32)}
    for seed in range(3):
        grads = {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(64, 8)), jnp.float32)}
        opt = nero_optax.nero(0.01, neuron_axis=-1)
        updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
        rows = np.asarray(optax.apply_updates(params, updates)["w"], np.float64).T
        # optax's update is new - p: with p around 1000 it carries float32's rounding there (ulp(1000) / 2 = 3e-5
        # per element), which apply_updates adds back; the cancelled closed form was off by 0.3.
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-4)
        np.testing.assert_allclose(rows.mean(axis=1), 0, atol=1e-4)


def test_row_norms_do_not_drift_over_100k_float32_steps():
    """The fused path once took the old rows' sums as (0, 1), a balance rounding only approximates: its row norms
    random-walked 5e-5 from 1 in 100k steps, where the core rule, reading them, stays at rounding. One jitted scan."""
    steps, shape = 100_000, (16, 8)
    p0 = {"w": jax.random.normal(jax.random.key(0), shape, jnp.float32)}
    keys = jax.random.split(jax.random.key(1), steps)

    def worst_norm_error(opt):
        def step(carry, key):
            params, state = carry
            updates, state = opt.update({"w": jax.random.normal(key, shape, jnp.float32)}, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), jnp.max(jnp.abs(jnp.linalg.norm(params["w"], axis=0) - 1))

        return float(jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), keys)[1].max())(p0))

    fused = worst_norm_error(nero_optax.nero(0.01, neuron_axis=-1))
    core = worst_norm_error(nero_optax.nero(0.01, neuron_axis=-1, fused=False))
    assert core < 1e-6
    assert fused <= 2 * core


@pytest.mark.parametrize("fused", [True, False])
def test_zero_initialised_unconstrained_neuron_leaf_gets_a_unit_row_scale(fused):
    params = {"head": jnp.zeros((6, 3), jnp.float32), "bias": jnp.zeros((3,), jnp.float32)}
    opt = nero_optax.nero(0.01, centre=False, normalise=False, fused=fused)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = jax.jit(opt.update)(grads, opt.init(params), params)
    assert float(state.sigma["head"]) == 1.0 and float(state.sigma["bias"]) == pytest.approx(0.01)
