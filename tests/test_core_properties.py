"""Property-based checks of the core rule (hypothesis): shapes 0-D to 5-D, empty and size-1 axes, every float dtype
a backend has, any neuron axis and magnitudes across the dtype's range.

From finite inputs: no NaN or Inf in parameters or state, neuron rows balanced (zero-mean, unit norm, or an
exactly zero row), and the state keeps its shapes and dtypes.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nero_core
from balance import check_balanced

# Decimal exponents of parameter and gradient magnitudes each dtype represents with room to square.
MAGNITUDES = {"float16": 3, "bfloat16": 12, "float32": 15, "float64": 60}

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple)


def available_dtypes(backend):
    names = [n for n in MAGNITUDES if getattr(backend.xp, n, None) is not None]
    return [n for n in names if n != "bfloat16" or backend.has_bfloat16]


@st.composite
def problems(draw, dtypes):
    shape = draw(shapes)
    ndim = len(shape)
    axis = draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1))) if ndim else None
    dtype = draw(st.sampled_from(dtypes))
    limit = MAGNITUDES[dtype]
    p_exp, g_exp = draw(st.integers(-limit, limit)), draw(st.integers(-limit, limit))
    seed = draw(st.integers(0, 2**16))
    return shape, axis, dtype, p_exp, g_exp, seed


def _cast(backend, array, dtype_name):
    xp = backend.xp
    return xp.astype(backend.asarray(array.astype(np.float32 if dtype_name != "float64" else np.float64)),
                     getattr(xp, dtype_name))


def check_finite_and_balanced(backend, data):
    shape, axis, dtype_name, p_exp, g_exp, seed = data.draw(problems(available_dtypes(backend)))
    xp = backend.xp
    rng = np.random.default_rng(seed)
    opt = nero_core.nero(neuron_axis=axis)
    update = backend.jit(opt.update)
    params = [_cast(backend, rng.normal(size=shape) * 10.0**p_exp, dtype_name)]
    state = opt.init(params)
    shapes_before = [tuple(v.shape) for v in state.v]
    dtypes_before = [v.dtype for v in state.v] + [s.dtype for s in state.sigma]
    for _ in range(3):
        grads = [_cast(backend, rng.normal(size=shape) * 10.0**g_exp, dtype_name)]
        params, state = update(grads, state, params)
    p = backend.to_numpy(xp.astype(params[0], xp.float64 if dtype_name == "float64" else xp.float32))
    assert np.all(np.isfinite(p))
    for leaf in state.v + state.sigma:
        assert np.all(np.isfinite(backend.to_numpy(leaf)))
    assert [tuple(v.shape) for v in state.v] == shapes_before
    assert [v.dtype for v in state.v] + [s.dtype for s in state.sigma] == dtypes_before
    assert params[0].dtype == getattr(xp, dtype_name)
    check_balanced(p, shape, axis, dtype_name)


def _property_test(max_examples: int, compiled: bool):
    """Compiling backends (JAX) trace every new shape, so they get fewer examples."""

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test(backend, data):
        if backend.name.startswith("jax") != compiled:
            pytest.skip("covered by the other property test")
        check_finite_and_balanced(backend, data)

    return test


test_finite_inputs_stay_finite_and_balanced = _property_test(60, compiled=False)
test_finite_inputs_stay_finite_and_balanced_compiled = _property_test(12, compiled=True)
