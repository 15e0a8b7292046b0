"""The noisy quadratic model (Zhang et al., 2019) as a stability check for a learned optimizer.

``L(x) = 0.5 * sum_i h_i x_i^2`` with curvatures ``h`` log-spaced over ``[1e-3, 1]`` and gradient noise
``sqrt(h_i) * noise * N(0, 1)``, run far past the meta-training horizon. A stable rule keeps the loss finite and
ends below where it started.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .pes import Hyper, _optimizer

__all__ = ["nqm_check"]


@partial(jax.jit, static_argnames=("hyper", "steps", "dim"))
def _run(theta: dict[str, Any], key: Any, *, hyper: Hyper, steps: int, dim: int, noise: float) -> Any:
    h = jnp.logspace(-3.0, 0.0, dim, dtype=jnp.float32)
    k0, k1 = jax.random.split(key)
    x = jax.random.normal(k0, (dim,), jnp.float32)
    opt = _optimizer(theta, hyper)

    def one(carry, k):
        x, state = carry
        g = h * x + noise * jnp.sqrt(h) * jax.random.normal(k, (dim,), jnp.float32)
        (x,), state = opt.update([g], state, [x])
        return (x, state), 0.5 * jnp.sum(h * x * x)

    _, losses = jax.lax.scan(one, (x, opt.init([x])), jax.random.split(k1, steps))
    return 0.5 * jnp.sum(h * x * x), losses


def nqm_check(theta: dict[str, Any], hyper: Hyper = Hyper(), *, steps: int = 5000, dim: int = 100,
              noise: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """Run STAR on the NQM; ``stable`` when every loss is finite and the final loss is below the initial one."""
    initial, losses = _run(theta, jax.random.PRNGKey(seed), hyper=hyper, steps=steps, dim=dim, noise=noise)
    losses = np.asarray(losses, dtype=np.float64)
    initial = float(initial)
    finite = bool(np.all(np.isfinite(losses)))
    return {
        "steps": steps,
        "initial_loss": initial,
        "final_loss": float(losses[-1]),
        "max_loss_ratio": float(np.max(losses) / initial) if finite else float("inf"),
        "stable": finite and float(losses[-1]) < initial,
    }
