"""The role audit for optax: :func:`describe` prints what Nero does with every leaf, and
:func:`warn_suspicious` warns, at ``init``, about the settings that look like mistakes."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from nero_core._audit import Role, format_roles, positions_axis, role_of, suspicions, warn_from_user_code, warning_text

from ._axes import NeuronAxisTree, _is_function, flax_neuron_axis, flax_rule, leaf_name, leaf_settings

__all__ = ["describe", "warn_suspicious"]


def describe(
    params: Any, neuron_axis: NeuronAxisTree = -1, *, centre: bool = True, normalise: bool = True
) -> list[Role]:
    """Print and return one row per leaf of ``params``: name (its key path), shape, role (neuron tensor,
    bias-like, unconstrained), neuron axis, neuron count, fan-in, and why; for the ``neuron_axis``, ``centre``
    and ``normalise`` given to :func:`nero_optax.nero`. ``params`` may hold ``jax.ShapeDtypeStruct`` leaves."""
    rows = [row for row, _ in _roles(params, neuron_axis, centre or normalise)]
    print(format_roles(rows))
    return rows


def _roles(params: Any, neuron_axis: NeuronAxisTree, constrained: bool) -> list[tuple[Role, tuple[Any, ...]]]:
    return [
        (role_of(jax.tree_util.keystr(path) or "<root>", tuple(leaf.shape), axis, constrained=constrained,
                 why=_why(neuron_axis, path, leaf, axis)), path)
        for path, leaf, axis in leaf_settings(neuron_axis, params)
    ]


def _why(neuron_axis: NeuronAxisTree, path: tuple[Any, ...], leaf: Any, axis: int | None) -> str:
    if neuron_axis is flax_neuron_axis:
        return flax_rule(path, leaf)[1]
    if neuron_axis is None or isinstance(neuron_axis, (int, np.integer)):
        return f"neuron_axis={neuron_axis} for every leaf"
    if _is_function(neuron_axis):
        return f"{getattr(neuron_axis, '__name__', 'neuron_axis')}(path, leaf) gave {axis}"
    return f"the neuron_axis tree gives {axis}"


def _layout(row: Role, name: str) -> dict[str, str]:
    """A leaf whose name says one framework's layout and whose axis says the other's."""
    if row.neuron_axis is None:
        return {}
    if name == "weight" and row.neuron_axis == len(row.shape) - 1:
        return {"layout_weight": "is named 'weight', as Equinox and torch-layout weights (out, in, ...) are, but "
                                 "its neurons are on its last axis, Flax's (in, out) convention"}
    if name == "kernel" and row.neuron_axis == 0:
        return {"layout_kernel": "is named 'kernel', as Flax's (..., in, out) kernels are, but its neurons are on "
                                 "axis 0"}
    return {}


_FIXES = {
    "layout_weight": "for Equinox or torch-layout weights pass neuron_axis=0",
    "layout_kernel": "for Flax kernels pass neuron_axis=-1 or nero_optax.flax_neuron_axis",
    "positional": "give it axis {positions} (a neuron_axis callable or tree that says {positions} for it)",
    "bias": "make it bias-like: neuron_axis=nero_optax.flax_neuron_axis (Flax: every bias is bias-like), or a "
            "neuron_axis callable that returns None for it",
    "kernel_axis": "Flax kernels (*kernel, in, out) take neuron_axis=-1; Equinox and torch-layout ones "
                   "(out, in, *kernel) take 0",
    "one_neuron": "if it is an output layer with one output, leave it free (optax.partition, with "
                  "nero_optax.nero(centre=False, normalise=False) for it); if its neurons lie on another axis, give "
                  "neuron_axis a callable or tree with that axis for it",
}


def warn_suspicious(params: Any, neuron_axis: NeuronAxisTree, *, constrained: bool) -> None:
    """A ``ConfigWarning`` for each leaf whose role looks like a mistake, naming the leaf and the fix."""
    for row, path in _roles(params, neuron_axis, constrained):
        name = leaf_name(path)
        found = {**_layout(row, name), **suspicions(row, name)}
        if found:
            fix = _FIXES[next(iter(found))].format(positions=positions_axis(row.shape))
            warn_from_user_code(warning_text(row, found, fix), ("jax", "optax", "flax", "nero_optax"))
