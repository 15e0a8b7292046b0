"""nero_optax.nero where JAX runs on another platform than the CPU (a GPU): the fused step takes XLA's reductions,
never the CPU custom call (``nero_optax._native`` registers it for the CPU alone: on a GPU it would not compile),
and keeps the core rule's maths. This machine has no GPU, so the platform is faked (``jax.default_backend``);
``tests/test_gpu.py`` runs nero_optax on a real one (``make gpu-check``)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import nero_optax  # noqa: E402
from nero_optax import _native  # noqa: E402


@pytest.fixture
def on_gpu(monkeypatch):
    """JAX's default platform reported as a GPU; the custom call fails the test if anything calls it."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_native, "sums", lambda *a, **k: pytest.fail("the CPU custom call was used off the CPU"))


def test_custom_call_applies_on_the_cpu_alone(on_gpu):
    for shape, axis in [((8, 16), 0), ((8, 16), -1), ((3, 3, 4, 8), -1)]:
        for dtype in (jnp.float32, jnp.float64):
            assert not _native.applies(jnp.ones(shape, dtype), axis)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_nero_off_the_cpu_takes_xla_reductions_with_the_core_rule_s_maths(on_gpu, dtype):
    """A Dense kernel, a conv kernel (neurons last) and a bias, five jitted steps: the fused step (XLA's reductions
    here) against the core rule (``fused=False``), to float rounding; no custom call in the lowered step."""
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    params = {"dense": jax.random.normal(keys[0], (12, 20), dtype), "conv": jax.random.normal(keys[1], (3, 3, 4, 8),
              dtype), "bias": jax.random.normal(keys[2], (20,), dtype)}
    results = {}
    for fused in (True, False):
        opt = nero_optax.nero(0.05, fused=fused)
        state, p = opt.init(params), params
        update = jax.jit(opt.update)
        if fused:
            assert _native.TARGET not in update.lower(params, state, params).as_text()
        for step in range(5):
            grads = jax.tree.map(lambda x, k=keys[3 + step]: jax.random.normal(k, x.shape, dtype), params)
            updates, state = update(grads, state, p)
            p = optax.apply_updates(p, updates)
        results[fused] = p
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-12
    for name in params:
        np.testing.assert_allclose(np.asarray(results[True][name]), np.asarray(results[False][name]), rtol=0,
                                   atol=tolerance, err_msg=name)
