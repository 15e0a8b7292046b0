"""Property-based checks of the adapters (hypothesis), as tests/test_core_properties.py does for the core:
``nero_torch.Nero`` (foreach, core and fused kernels, both skip policies) and ``nero_optax.nero`` (fused and core,
jitted), over shapes 0-D to 5-D with empty and size-1 axes, float16, bfloat16, float32 and float64, any neuron axis,
and magnitudes.

From finite inputs: no NaN or Inf in parameters or state, ever; neuron rows balanced (zero mean and unit norm, or an
exactly zero row) once a step was taken; the state keeps its shapes and dtypes. Gradients span the dtype's whole
range: where a square overflows the state's dtype the step is skipped and counted, never written; where squares fit
(the range test_core_properties.py uses) no step is skipped. Parameters stay in that range (a known limit: a row
whose squared norm overflows is zeroed by the first projection). The core rule gets the gradients' whole range here
too, on the backends that run it eagerly.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nero_core
from balance import check_balanced

# Decimal exponents each dtype represents with room to square (as test_core_properties.py), and its whole range.
ROOM = {"float16": 3, "bfloat16": 12, "float32": 15, "float64": 60}
RANGE = {"float16": 4, "bfloat16": 37, "float32": 37, "float64": 307}
STEPS = 3

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def problems(draw, dtypes=tuple(ROOM), axes=None):
    """``axes``: the neuron axes to draw from (default: None or any axis of the shape)."""
    shape = draw(shapes)
    ndim = len(shape)
    if not ndim:
        axis = None
    else:
        axis = draw(st.sampled_from(axes) if axes else st.one_of(st.none(), st.integers(-ndim, ndim - 1)))
    dtype = draw(st.sampled_from(list(dtypes)))
    p_exp = draw(st.integers(-ROOM[dtype], ROOM[dtype]))
    g_exp = draw(st.integers(-RANGE[dtype], RANGE[dtype]))
    seed = draw(st.integers(0, 2**16))
    return shape, axis, dtype, p_exp, g_exp, seed


def draws(shape, p_exp, g_exp, seed):
    rng = np.random.default_rng(seed)
    params = np.asarray(rng.normal(size=shape) * 10.0**p_exp)
    grads = [np.asarray(rng.normal(size=shape) * 10.0**g_exp) for _ in range(STEPS)]
    return params, grads


def expected_state(shape, axis, dtype):
    resolved = nero_core.neuron_axes([shape], axis)[0]
    return (tuple(shape) if resolved is None else (shape[resolved],)), ("float64" if dtype == "float64" else "float32")


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_core_properties_over_the_whole_gradient_range(backend, data):
    if backend.name.startswith("jax"):
        pytest.skip("every example traces anew; test_core_properties.py covers JAX in the squares' range")
    xp = backend.xp
    shape, axis, dtype, p_exp, g_exp, seed = data.draw(problems())
    if dtype == "bfloat16" and not backend.has_bfloat16 or getattr(xp, dtype, None) is None:
        dtype = "float32"
    params, grads = draws(shape, p_exp, min(g_exp, RANGE[dtype]), seed)

    def cast(a):
        wide = a.astype(np.float64 if dtype == "float64" else np.float32)
        return xp.astype(backend.asarray(wide), getattr(xp, dtype))

    opt = nero_core.nero(neuron_axis=axis)
    with np.errstate(over="ignore", invalid="ignore"):  # NumPy warns of the overflow it then skips
        ps = [cast(params)]
        state = opt.init(ps)
        for g in grads:
            ps, state = opt.update([cast(g)], state, ps)
    wide = xp.float64 if dtype == "float64" else xp.float32
    p = backend.to_numpy(xp.astype(ps[0], wide))
    assert ps[0].dtype == getattr(xp, dtype) and np.all(np.isfinite(p))
    assert all(np.all(np.isfinite(backend.to_numpy(x))) for x in (*state.v, *state.sigma))
    taken = STEPS - int(backend.to_numpy(state.skipped))
    assert int(backend.to_numpy(state.count[0])) == taken
    if g_exp <= ROOM[dtype]:
        assert taken == STEPS
    state_shape, state_dtype = expected_state(shape, axis, dtype)
    assert tuple(state.v[0].shape) == state_shape and state.v[0].dtype == getattr(xp, state_dtype)
    if taken:
        check_balanced(p, shape, axis, dtype)


TORCH_PATHS = {
    "foreach": dict(),
    "core": dict(foreach=False),
    "fused": dict(fused=True),
    "fused-neuron": dict(fused=True, skip_nonfinite="neuron"),
    "foreach-neuron": dict(skip_nonfinite="neuron"),
}


@settings(max_examples=50, **SETTINGS)
@given(data=st.data(), path=st.sampled_from(list(TORCH_PATHS)))
def test_torch_adapter_properties(data, path):
    """With ``skip_nonfinite="neuron"`` a neuron (row, or element of a bias-like tensor) whose gradient is not finite
    keeps its weights: every step is counted in the step counts, and a row is balanced or, held back at every
    step, still its initial row. ``fused=True`` draws float32/float64 with neurons on axis 0 (or none), the C
    kernel's domain: elsewhere it compiles kernels per rank and dtype, too slow for this many examples
    (tests/test_torch_fast_path.py compares those with the core rule)."""
    torch = pytest.importorskip("torch")
    import nero_torch

    options = TORCH_PATHS[path]
    held_back = options.get("skip_nonfinite") == "neuron"
    fused = dict(dtypes=("float32", "float64"), axes=(None, 0)) if options.get("fused") else {}
    shape, axis, dtype, p_exp, g_exp, seed = data.draw(problems(**fused))
    params, grads = draws(shape, p_exp, g_exp, seed)
    tdtype = getattr(torch, dtype)
    with np.errstate(over="ignore"):  # the cast to float16 of an out-of-range draw is not what is tested
        p = torch.nn.Parameter(torch.from_numpy(params).to(tdtype))
        grads = [torch.from_numpy(g).to(tdtype) for g in grads]
    bias = torch.nn.Parameter(torch.linspace(-1, 1, 3, dtype=tdtype))  # one more tensor: a skip is for the set
    opt = nero_torch.Nero([{"params": [p], "neuron_axis": axis}, {"params": [bias], "neuron_axis": None}],
                          **options)
    initial = p.detach().to(torch.float64).numpy().copy()
    for g in grads:
        p.grad, bias.grad = g.clone(), torch.ones_like(bias)
        opt.step()
    state_shape, state_dtype = expected_state(shape, axis, dtype)
    taken = STEPS - opt.skipped_steps
    assert p.dtype == tdtype and bool(torch.isfinite(p).all()) and bool(torch.isfinite(bias).all())
    if g_exp <= ROOM[dtype]:
        assert taken == STEPS
    if held_back:  # every step counted, rows balanced or never moved
        for s in (opt.state[p], opt.state[bias]):
            assert s["step"].item() == STEPS and all(bool(torch.isfinite(v).all()) for v in s.values())
        assert tuple(opt.state[p]["v"].shape) == state_shape and str(opt.state[p]["v"].dtype) == f"torch.{state_dtype}"
        check_balanced_or_initial(p.detach().to(torch.float64).numpy(), initial, shape, axis, dtype)
    elif taken:
        for s in (opt.state[p], opt.state[bias]):
            assert s["step"].item() == taken and all(bool(torch.isfinite(v).all()) for v in s.values())
        state = opt.state[p]
        assert tuple(state["v"].shape) == state_shape and str(state["v"].dtype) == f"torch.{state_dtype}"
        assert str(state["sigma"].dtype) == f"torch.{state_dtype}" and state["sigma"].shape == ()
        check_balanced(p.detach().to(torch.float64).numpy(), shape, axis, dtype)
    else:
        assert len(opt.state) == 0  # every step skipped, from the first: no state was created


def check_balanced_or_initial(p, initial, shape, axis, dtype) -> None:
    """Every neuron row of ``p`` is balanced, or exactly its ``initial`` row (held back at every step)."""
    resolved = nero_core.neuron_axes([shape], axis)[0]
    if resolved is None or p.size == 0:
        return
    rows, before = (np.moveaxis(x, resolved, 0).reshape(shape[resolved], -1) for x in (p, initial))
    moved = ~np.all(rows == before, axis=1)
    check_balanced(rows[moved], rows[moved].shape, 0, dtype)


@settings(max_examples=16, **SETTINGS)
@given(data=st.data(), fused=st.booleans())
def test_optax_adapter_properties(data, fused):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import nero_optax

    jnp = jax.numpy
    shape, axis, dtype, p_exp, g_exp, seed = data.draw(problems())
    params, grads = draws(shape, p_exp, g_exp, seed)
    jdtype = getattr(jnp, dtype)
    with np.errstate(over="ignore"):
        tree = {"p": jnp.asarray(params, jdtype), "bias": jnp.linspace(-1, 1, 3, dtype=jdtype)}
        grads = [{"p": jnp.asarray(g, jdtype), "bias": jnp.ones(3, jdtype)} for g in grads]
    opt = nero_optax.nero(neuron_axis={"p": axis, "bias": None}, fused=fused)
    update = jax.jit(opt.update)
    state = opt.init(tree)
    types = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    for g in grads:
        updates, state = update(g, state, tree)
        tree = optax.apply_updates(tree, updates)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == types
    assert tree["p"].dtype == jdtype
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((tree, state)))
    assert int(state.count) + int(state.skipped) == STEPS
    if g_exp <= ROOM[dtype]:
        assert int(state.skipped) == 0
    state_shape, state_dtype = expected_state(shape, axis, dtype)
    assert state.v["p"].shape == state_shape and state.v["p"].dtype == jnp.dtype(state_dtype)
    if int(state.count):
        check_balanced(np.asarray(tree["p"].astype(jnp.float64)), shape, axis, dtype)


EDGE_SHAPES = [(0, 2), (2, 0), (0, 3, 2), (1, 1), (1, 5), (5, 1), (0,), ()]


@pytest.mark.parametrize("options", [{}, dict(foreach=False)], ids=["foreach", "core"])
def test_torch_edge_shapes_step_and_skip_together(options):
    """Empty and size-1 tensors beside an ordinary one: steps are taken, and a NaN elsewhere skips them too (an
    empty neuron tensor has no rows to check, and must not break the check)."""
    torch = pytest.importorskip("torch")
    import nero_torch

    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate([(3, 4), *EDGE_SHAPES])]
    opt = nero_torch.Nero(params, **options)
    for step in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + step))
        if step == 2:
            params[0].grad[1, 2] = float("nan")
        opt.step()
    assert opt.skipped_steps == 1
    assert all(opt.state[p]["step"].item() == 3 for p in params)
    assert all(bool(torch.isfinite(p).all()) for p in params)
