"""STAR as an optax ``GradientTransformation``: gathers the pytree's leaves, calls the core rule, returns deltas."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nero_core._star import DEFAULT_PARAMS, StarState, load_star_params
from nero_core._star import star as star_rule

from ._schedule import check_scheduled, value_at

__all__ = ["StarState", "star"]


def star(
    meta_params: Mapping[str, Any] | str | None = None,
    *,
    step_mult: Any = 1e-3,
    nominal_stepsize: Any = 1e-3,
    weight_decay: Any = 0.0,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """STAR (Harrison, Metz & Sohl-Dickstein, 2022) for optax; see :func:`nero_core.star` for the arguments.

    The update needs ``params``: ``updates, state = tx.update(grads, state, params)``; the returned updates are
    ``new_params - params`` in each parameter's dtype, for ``optax.apply_updates``. Hyperparameters may be traced
    arrays (``optax.inject_hyperparams``), as may the leaves of ``meta_params``, or optax schedules (functions of
    ``state.count``, the updates taken). Extra keyword arguments to ``update`` are accepted and ignored (optax's
    ``GradientTransformationExtraArgs``).
    """
    if meta_params is None or isinstance(meta_params, str):  # loaded once, not at every update
        meta_params = load_star_params(meta_params or DEFAULT_PARAMS)
    check_scheduled("step_mult", step_mult, low=0.0, high=float("inf"), high_open=False)
    check_scheduled("nominal_stepsize", nominal_stepsize, low=0.0, high=float("inf"), high_open=False)
    check_scheduled("weight_decay", weight_decay, low=0.0, high=1.0, high_open=True)

    def rule(count: Any = 0) -> Any:
        return star_rule(
            meta_params, step_mult=value_at(step_mult, count), nominal_stepsize=value_at(nominal_stepsize, count),
            weight_decay=value_at(weight_decay, count), skip_nonfinite=skip_nonfinite,
        )

    rule()  # checks meta_params now rather than at the first step

    def init_fn(params: Any) -> StarState:
        return rule().init(jax.tree_util.tree_leaves(params), xp=jnp)

    def update_fn(updates: Any, state: StarState, params: Any = None, **extra_args: Any) -> tuple[Any, StarState]:
        del extra_args  # optax's convention: what other transformations of a chain take, this one ignores
        if params is None:
            raise ValueError("star needs the current parameters: call tx.update(grads, state, params)")
        grads, tree = jax.tree_util.tree_flatten(updates)
        leaves = tree.flatten_up_to(params)
        new_params, state = rule(state.count).update(grads, state, leaves)
        deltas = [(n - p).astype(p.dtype) for n, p in zip(new_params, leaves)]
        return jax.tree_util.tree_unflatten(tree, deltas), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
