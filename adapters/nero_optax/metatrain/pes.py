"""Truncated unrolls of STAR on a task, and the antithetic PES gradient estimate of the meta-loss.

Persistent Evolution Strategies (Vicol, Metz & Sohl-Dickstein, ICML 2021), antithetic form: particle pair ``j``
unrolls two inner trainings, one with ``theta + eps_j`` and one with ``theta - eps_j``, ``eps_j`` drawn afresh for every
truncation, and keeps the sum ``xi_j`` of its perturbations since the episode began. After a truncation with losses
``L+_j, L-_j`` the estimate is ``sum_j xi_j * (L+_j - L-_j) / (2 * pairs * sigma^2)``. With the truncation as long
as the episode this is plain antithetic ES.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import nero_core


__all__ = ["Hyper", "Particles", "init_particles", "init_theta", "pes_step", "unroll"]

LOSS_CAP = 2.0  # meta-losses are inner losses over chance level (log of the classes); a diverged or NaN one is 2
INIT_SCALES = (0.5, 2.0)  # each task's initialisation is scaled by a log-uniform draw from this range
LOSS_SCALES = (0.1, 10.0)  # and its loss (so its gradients) by one from this range


class Hyper(NamedTuple):
    """The rule's fixed hyperparameters during meta-training."""

    step_mult: float = 1e-3
    nominal_stepsize: float = 1e-3
    weight_decay: float = 0.0


class Particles(NamedTuple):
    """Per pair (leading axis): the inner parameters and STAR state of the + and - unrolls, ``xi``, and the pair's
    loss scale."""

    pos: Any
    neg: Any
    xi: Any
    loss_scale: Any


def init_theta(key: Any, hidden: int = 4, out_scale: float = 1e-3) -> dict[str, Any]:
    """The MLP ``39 -> hidden -> hidden -> 4``: weights ``N(0, 1/fan_in)``, the output layer scaled by ``out_scale``,
    zero biases: meta-training starts at (about) AdamAggMo, the nominal term alone.
    """
    sizes = (39, hidden, hidden, 4)
    theta = {}
    for i, (k, (a, b)) in enumerate(zip(jax.random.split(key, 3), zip(sizes[:-1], sizes[1:])), start=1):
        scale = out_scale if i == 3 else 1.0
        theta[f"w{i}"] = scale * jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a)
        theta[f"b{i}"] = jnp.zeros((b,), jnp.float32)
    return theta


def _optimizer(theta: dict[str, Any], hyper: Hyper) -> nero_core.Optimizer:
    from nero_core._star import star

    return star(theta, step_mult=hyper.step_mult, nominal_stepsize=hyper.nominal_stepsize,
                weight_decay=hyper.weight_decay)


def _log_uniform(key: Any, bounds: tuple[float, float], shape: tuple[int, ...] = ()) -> Any:
    low, high = np.log(bounds[0]), np.log(bounds[1])
    return jnp.exp(jax.random.uniform(key, shape, jnp.float32, low, high))


def _init_inner(family: Any, theta: dict[str, Any], hyper: Hyper, key: Any, features: int, classes: int) -> Any:
    k_params, k_scale = jax.random.split(key)
    scale = _log_uniform(k_scale, INIT_SCALES)
    params = tuple(scale * p for p in family.init(k_params, features, classes))
    return params, _optimizer(theta, hyper).init(list(params))


def unroll(family: Any, theta: dict[str, Any], hyper: Hyper, inner: Any, key: Any, x: Any, y: Any, steps: int,
           loss_scale: Any, chance: float) -> tuple[Any, Any]:
    """``steps`` STAR updates from ``inner = (params, state)`` on the loss times ``loss_scale``; returns the new inner
    state and the meta-loss: the mean over the steps of the (unscaled) loss over ``chance``, capped at ``LOSS_CAP``."""
    opt = _optimizer(theta, hyper)

    def one(carry, k):
        params, state = carry
        loss, grads = jax.value_and_grad(family.loss)(params, *family.sample(k, x, y))
        grads = [loss_scale * g for g in grads]
        new_params, state = opt.update(grads, state, list(params))
        relative = loss / chance
        capped = jnp.where(jnp.isfinite(relative), jnp.minimum(relative, LOSS_CAP), LOSS_CAP)
        return (tuple(new_params), state), capped

    inner, losses = jax.lax.scan(one, inner, jax.random.split(key, steps))
    return inner, jnp.mean(losses)


def init_particles(family: Any, theta: dict[str, Any], hyper: Hyper, key: Any, pairs: int, features: int,
                   classes: int) -> Particles:
    """Fresh inner trainings, one initialisation (and initialisation and loss scale) per pair shared by its + and -
    unroll, and ``xi = 0``."""
    k_init, k_loss = jax.random.split(key)
    inner = jax.vmap(lambda k: _init_inner(family, theta, hyper, k, features, classes))(
        jax.random.split(k_init, pairs))
    xi = jax.tree_util.tree_map(lambda a: jnp.zeros((pairs, *a.shape), a.dtype), theta)
    return Particles(inner, inner, xi, _log_uniform(k_loss, LOSS_SCALES, (pairs,)))


@partial(jax.jit, static_argnames=("family", "hyper", "steps", "chance"))
def pes_step(family: Any, theta: dict[str, Any], particles: Particles, key: Any, x: Any, y: Any, *,
             hyper: Hyper, steps: int, sigma: float, chance: float) -> tuple[dict[str, Any], Particles, Any]:
    """One truncation for every pair: the PES gradient estimate, the advanced particles, and the mean loss."""
    pairs = particles.xi["b1"].shape[0]
    k_eps, k_data = jax.random.split(key)
    leaves, tree = jax.tree_util.tree_flatten(theta)
    noise = [sigma * jax.random.normal(k, (pairs, *a.shape), a.dtype)
             for k, a in zip(jax.random.split(k_eps, len(leaves)), leaves)]
    eps = jax.tree_util.tree_unflatten(tree, noise)
    data_keys = jax.random.split(k_data, pairs)  # + and - of a pair see the same minibatches

    def run(sign, inner):
        thetas = jax.tree_util.tree_map(lambda t, e: t + sign * e, theta, eps)
        return jax.vmap(lambda th, st, k, s: unroll(family, th, hyper, st, k, x, y, steps, s, chance))(
            thetas, inner, data_keys, particles.loss_scale)

    pos, loss_pos = run(1.0, particles.pos)
    neg, loss_neg = run(-1.0, particles.neg)
    xi = jax.tree_util.tree_map(jnp.add, particles.xi, eps)
    diff = loss_pos - loss_neg
    grad = jax.tree_util.tree_map(
        lambda a: jnp.tensordot(diff, a, axes=(0, 0)) / (2 * pairs * sigma**2), xi
    )
    return grad, Particles(pos, neg, xi, particles.loss_scale), 0.5 * jnp.mean(loss_pos + loss_neg)
