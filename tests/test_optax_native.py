"""nero_optax's CPU custom call (``nero_optax._native``): its per-neuron sums against float64 NumPy, that the fused
step uses it where it applies and XLA's reductions elsewhere, and the fallback without a C++ compiler."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import nero_optax  # noqa: E402
from nero_optax import _native  # noqa: E402

# 2-D both ways, a conv kernel (kh, kw, in, out), fan-in not a multiple of the kernel's 4-row sweep, one neuron;
# then tensors large enough to be shared between threads: neurons last over several 128-row blocks (the last one
# short) with a column count that is not a whole number of vector lanes, narrow rows (one per sweep) and wide ones
# (four per sweep, with a row left over), and neurons first.
CASES = [((37, 24), -1), ((24, 37), 0), ((3, 3, 5, 16), 3), ((19, 1024), 1), ((200, 1), 1), ((1, 200), 0),
         ((1029, 67), -1), ((2, 150, 301), 2), ((301, 700), -1), ((700, 130), 0)]


@pytest.fixture
def native():
    """Skips where there is no C++ compiler; where there is one, the kernel must build and register."""
    import os
    import shutil

    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler: nero_optax uses XLA's reductions")
    assert _native._registered()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", CASES)
def test_sums_match_float64_numpy(native, shape, axis, dtype):
    rng = np.random.default_rng(0)
    g, w = (rng.normal(size=shape).astype(dtype) for _ in range(2))
    assert _native.applies(jnp.asarray(w), axis)
    got = jax.jit(_native.sums, static_argnums=2)(jnp.asarray(g), jnp.asarray(w), axis)
    again = jax.jit(_native.sums, static_argnums=2)(jnp.asarray(g), jnp.asarray(w), axis)
    for a, b in zip(got, again):  # threads take the parts in any order; the sums do not depend on it
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    others = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    expected = (w64.sum(others), (w64 * w64).sum(others), g64.sum(others), (g64 * g64).sum(others),
                (w64 * g64).sum(others))  # row_factors' order: sum(w), |w|^2, sum(g), |g|^2, <w, g>
    fan_in = g.size // shape[axis]
    tolerance = (1e-6 if dtype == np.float32 else 1e-14) * fan_in  # float rounding of a sum of fan_in terms
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == dtype and a.shape == (shape[axis],)
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=0, atol=tolerance * (1 + np.abs(b).max()))


def _lowered(params, **options) -> str:
    opt = nero_optax.nero(**options)
    return jax.jit(opt.update).lower(params, opt.init(params), params).as_text()


def test_the_fused_step_calls_it_where_it_applies(native):
    f32 = {"w": jnp.ones((8, 16), jnp.float32), "b": jnp.zeros(16, jnp.float32)}
    assert _native.TARGET in _lowered(f32)
    assert _native.TARGET not in _lowered(f32, neuron_axis=None)  # no neuron tensors
    assert _native.TARGET not in _lowered(jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32))  # sums in float32
    assert _native.TARGET not in _lowered({"k": jnp.ones((3, 4, 5), jnp.float32)}, neuron_axis=1)  # a middle axis


def test_vmapped_updates_match_one_at_a_time(native):
    opt = nero_optax.nero()
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (4, 6, 5), jnp.float32)}  # a batch of 4 (6, 5) kernels
    grads = {"w": jax.random.normal(jax.random.PRNGKey(1), (4, 6, 5), jnp.float32)}
    state = jax.vmap(opt.init)(params)
    for _ in range(2):  # the first update projects; the second is a steady-state step with the sums
        updates, state = jax.jit(jax.vmap(opt.update))(grads, state, params)
        params = optax.apply_updates(params, updates)
    singles = []
    for i in range(4):
        p = {"w": jax.random.normal(jax.random.PRNGKey(0), (4, 6, 5), jnp.float32)[i]}
        s = opt.init(p)
        for _ in range(2):
            u, s = jax.jit(opt.update)({"w": grads["w"][i]}, s, p)
            p = optax.apply_updates(p, u)
        singles.append(p["w"])
    np.testing.assert_allclose(np.asarray(params["w"]), np.stack(singles), rtol=0, atol=1e-6)


def test_without_a_compiler_the_step_uses_xla_reductions(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("NERO_KERNEL_CACHE", str(tmp_path / "cache"))
    _native._registered.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"nero_optax\.nero: could not build the CPU kernel .*XLA's reductions"):
            assert not _native.applies(jnp.ones((4, 4), jnp.float32), -1)
        params = {"w": jnp.ones((8, 16), jnp.float32) + jnp.arange(16.0, dtype=jnp.float32)}
        assert _native.TARGET not in _lowered(params)
    finally:
        _native._registered.cache_clear()
