"""STAR as an optax ``GradientTransformation``: gathers the pytree's leaves, calls the core rule, returns deltas."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nero_core._star import StarState
from nero_core._star import star as star_rule

__all__ = ["StarState", "star"]


def star(
    meta_params: Mapping[str, Any] | str | None = None,
    *,
    step_mult: Any = 1e-3,
    nominal_stepsize: Any = 1e-3,
    weight_decay: Any = 0.0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformation:
    """STAR (Harrison, Metz & Sohl-Dickstein, 2022) for optax; see :func:`nero_core.star` for the arguments.

    The update needs ``params``: ``updates, state = tx.update(grads, state, params)``; the returned updates are
    ``new_params - params`` in each parameter's dtype, for ``optax.apply_updates``. Hyperparameters may be traced
    arrays (``optax.inject_hyperparams``), as may the leaves of ``meta_params``.
    """
    rule = star_rule(meta_params, step_mult=step_mult, nominal_stepsize=nominal_stepsize,
                     weight_decay=weight_decay, skip_nonfinite=skip_nonfinite)

    def init_fn(params: Any) -> StarState:
        return rule.init(jax.tree_util.tree_leaves(params), xp=jnp)

    def update_fn(updates: Any, state: StarState, params: Any = None) -> tuple[Any, StarState]:
        if params is None:
            raise ValueError("star needs the current parameters: call tx.update(grads, state, params)")
        grads, tree = jax.tree_util.tree_flatten(updates)
        leaves = tree.flatten_up_to(params)
        new_params, state = rule.update(grads, state, leaves)
        deltas = [(n - p).astype(p.dtype) for n, p in zip(new_params, leaves)]
        return jax.tree_util.tree_unflatten(tree, deltas), state

    return optax.GradientTransformation(init_fn, update_fn)
