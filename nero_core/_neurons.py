"""Neurons: which tensors have them, how to view a tensor as rows, and the balanced projection.

A *neuron tensor* has ``ndim >= 2`` and fan-in (the product of every axis but the neuron axis) ``>= 2``; it is
viewed as a matrix ``W`` of shape ``(neurons, fan_in)``. Every other tensor is *bias-like* and handled
elementwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

__all__ = [
    "NeuronAxis",
    "as_rows",
    "balanced_rows",
    "from_rows",
    "neuron_axes",
    "row_norm",
    "row_sum",
]

NeuronAxis = Union[int, None, Sequence[Union[int, None]], Callable[[tuple[int, ...]], Union[int, None]]]


def _fan_in(shape: tuple[int, ...], axis: int) -> int:
    return math.prod(n for i, n in enumerate(shape) if i != axis)


def neuron_axis_of(shape: tuple[int, ...], axis: int | None, index: int = 0) -> int | None:
    """The normalised neuron axis of a tensor of ``shape``, or None when it is bias-like."""
    if axis is None or len(shape) < 2:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"neuron_axis for params[{index}] must be an int or None, got {axis!r}")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(
            f"neuron_axis {axis} is out of range for params[{index}] of shape {shape} (ndim {len(shape)})"
        )
    axis %= len(shape)
    return axis if _fan_in(shape, axis) >= 2 else None


def neuron_axes(shapes: Sequence[tuple[int, ...]], neuron_axis: NeuronAxis) -> tuple[int | None, ...]:
    """Resolve ``neuron_axis`` (int, None, one entry per tensor, or ``shape -> int | None``) per tensor."""
    if callable(neuron_axis):
        per_tensor = [neuron_axis(tuple(s)) for s in shapes]
    elif not isinstance(neuron_axis, Sequence) or isinstance(neuron_axis, str):
        per_tensor = [neuron_axis] * len(shapes)
    else:
        per_tensor = list(neuron_axis)
        if len(per_tensor) != len(shapes):
            raise ValueError(f"neuron_axis has {len(per_tensor)} entries but there are {len(shapes)} parameters")
    return tuple(neuron_axis_of(tuple(s), a, i) for i, (s, a) in enumerate(zip(shapes, per_tensor)))


def as_rows(x: Any, axis: int, xp: Any) -> Any:
    """View ``x`` as ``(neurons, fan_in)``: the neuron axis first, the rest flattened."""
    shape = tuple(x.shape)
    if axis != 0:
        x = xp.moveaxis(x, axis, 0)
    return xp.reshape(x, (shape[axis], _fan_in(shape, axis)))


def from_rows(rows: Any, shape: tuple[int, ...], axis: int, xp: Any) -> Any:
    """Inverse of :func:`as_rows`."""
    moved = (shape[axis],) + tuple(n for i, n in enumerate(shape) if i != axis)
    x = xp.reshape(rows, moved)
    return xp.moveaxis(x, 0, axis) if axis != 0 else x


def row_sum(rows: Any, xp: Any) -> Any:
    return xp.sum(rows, axis=1, keepdims=True)


def row_norm(rows: Any, xp: Any) -> Any:
    return xp.sqrt(row_sum(rows * rows, xp))


def _safe_reciprocal(x: Any, xp: Any) -> Any:
    """1/x where x > 0, else 1 (a zero row stays zero)."""
    positive = x > 0
    return xp.where(positive, 1 / xp.where(positive, x, xp.ones_like(x)), xp.ones_like(x))


def balanced_rows(rows: Any, xp: Any, *, centre: bool = True, normalise: bool = True) -> Any:
    """Project every row to zero mean (``centre``) and unit norm (``normalise``); zero rows stay zero."""
    if centre:
        rows = rows - row_sum(rows, xp) / rows.shape[1]
    if normalise:
        rows = rows * _safe_reciprocal(row_norm(rows, xp), xp)
    return rows
