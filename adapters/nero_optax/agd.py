"""Automatic gradient descent as an optax ``GradientTransformation``, on nero_core's array-API rule.

Flax keeps kernels as ``(in, out)`` and ``(*kernel, in, out)``, so the layout defaults to ``"flax"``. A pytree's
leaves come out sorted by key (``bias`` before ``kernel``, ``Dense_10`` before ``Dense_2``), not in forward order.
AGD's weight maths does not depend on the order; a bias follows the weight beside it in the same module (the one
weight among its siblings), and only where there is none the nearest weight before it in leaf order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from nero_core._agd import AGDState, Layout, weight_axes
from nero_core._agd import agd as agd_rule
from nero_core._agd import agd_init as agd_init_rule

from ._schedule import check_scheduled, value_at

__all__ = ["AGDState", "agd", "agd_init"]


def _sibling_weights(params: Any, layout: Layout) -> list[int | None]:
    """For each leaf that is not a weight, the index of the single weight in the same module, else None."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    axes = weight_axes([tuple(leaf.shape) for _, leaf in paths_leaves], layout)
    weights_in: dict[tuple[Any, ...], list[int]] = {}
    for i, ((path, _), a) in enumerate(zip(paths_leaves, axes)):
        if a is not None:
            weights_in.setdefault(tuple(path[:-1]), []).append(i)
    attach: list[int | None] = []
    for (path, _), a in zip(paths_leaves, axes):
        siblings = weights_in.get(tuple(path[:-1]), [])
        attach.append(siblings[0] if a is None and len(siblings) == 1 else None)
    return attach


def agd(
    gain: Any = 1.0, *, layout: Layout = "flax", skip_nonfinite: bool = True
) -> optax.GradientTransformationExtraArgs:
    """AGD as an optax transformation: apply its updates with ``optax.apply_updates``; ``state.eta`` is the last
    step's automatic learning rate. Arguments as in :func:`nero_core.agd`; ``gain`` may be an
    ``optax.inject_hyperparams`` array or an optax schedule (a function of ``state.count``, the steps taken). The
    parameters are not needed (``update(grads, state)`` works); extra keyword arguments to ``update`` are accepted
    and ignored (optax's ``GradientTransformationExtraArgs``)."""
    check_scheduled("gain", gain, low=0.0, high=float("inf"), high_open=False)  # now rather than at the first step

    def rule(tree: Any, gain: Any = 1.0) -> Any:
        return agd_rule(gain, layout=layout, attach=_sibling_weights(tree, layout), skip_nonfinite=skip_nonfinite)

    def init(params: Any) -> AGDState:
        return rule(params).init(jax.tree_util.tree_leaves(params), xp=jnp)

    def update(updates: Any, state: AGDState, params: Any = None, **extra_args: Any) -> tuple[Any, AGDState]:
        del params, extra_args  # the step reads neither
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        # The step does not read the parameters, so stepping from zeros gives exactly minus the step.
        steps, state = rule(updates, value_at(gain, state.count)).update(
            leaves, state, [jnp.zeros_like(g) for g in leaves]
        )
        return jax.tree_util.tree_unflatten(treedef, steps), state

    return optax.GradientTransformationExtraArgs(init, update)


def agd_init(params: Any, seed: int = 0, *, layout: Layout = "flax") -> Any:
    """The pytree with every weight set to AGD's initialisation (see :func:`nero_core.agd_init`); other leaves
    are kept. Leaves are visited in pytree order, so the draw for a given seed follows that order."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(treedef, agd_init_rule(leaves, seed, layout=layout, xp=jnp))
