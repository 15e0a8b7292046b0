"""Neurons: which tensors have them, how to view a tensor as rows, and the balanced projection.

A *neuron tensor* has ``ndim >= 2`` and fan-in (the product of every axis but the neuron axis) ``>= 2``; it is
viewed as a matrix ``W`` of shape ``(neurons, fan_in)``. Every other tensor is *bias-like* and handled
elementwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

from ._base import device_of
from ._branch import is_library

__all__ = [
    "NeuronAxis",
    "affine_write",
    "as_rows",
    "balanced_rows",
    "from_rows",
    "neuron_axes",
    "neuron_sums",
    "per_neuron",
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


def _row_sums(rows: Any, xp: Any) -> Any:
    """``sum(row)`` per row of a ``(rows, n)`` array: a matrix-vector product with ones, which BLAS runs at twice the
    speed of NumPy's ``sum`` along rows."""
    return rows @ xp.ones((rows.shape[1],), dtype=rows.dtype, device=device_of(rows))


def _row_dot(a: Any, b: Any, xp: Any) -> Any:
    """``<a_row, b_row>`` per row of two ``(rows, n)`` arrays."""
    if is_library(xp, "torch"):  # array_api_compat's torch vecdot runs 4x slower than these
        return xp.linalg.vector_norm(a, axis=1) ** 2 if a is b else xp.sum(a * b, axis=1)
    return xp.vecdot(a, b)  # NumPy, CuPy: no temporary the size of the rows


def neuron_sums(w: Any, g: Any, axis: int, xp: Any) -> tuple[Any, Any, Any, Any, Any]:
    """Per neuron of ``w`` (neurons on ``axis``) and its gradient ``g``, over every other axis: ``sum(w)``,
    ``|w|^2``, ``sum(g)``, ``|g|^2`` and ``<w, g>``, each of shape ``(neurons,)``. Reads only; with neurons on
    axis 0 the rows are views, elsewhere the sums run in place (no transpose)."""
    if axis == 0:
        rows_w, rows_g = as_rows(w, 0, xp), as_rows(g, 0, xp)
        return (
            _row_sums(rows_w, xp), _row_dot(rows_w, rows_w, xp), _row_sums(rows_g, xp),
            _row_dot(rows_g, rows_g, xp), _row_dot(rows_w, rows_g, xp),
        )
    others = tuple(i for i in range(len(w.shape)) if i != axis)
    return tuple(xp.sum(x, axis=others) for x in (w, w * w, g, g * g, w * g))


def per_neuron(x: Any, shape: tuple[int, ...], axis: int, xp: Any) -> Any:
    """A ``(neurons,)`` vector shaped to broadcast along the neuron axis of a tensor of ``shape``."""
    along = [1] * len(shape)
    along[axis] = shape[axis]
    return xp.reshape(x, tuple(along))


def affine_write(
    w: Any, g: Any, scale: Any, step: Any, shift: Any, axis: int, xp: Any, *, offset: Any = None,
    in_place: bool = False,
) -> Any:
    """``scale * (w - offset) - step * g - shift`` with per-neuron factors (``offset`` None: 0).

    As a new array: ``(w - (step / scale) * g) * scale - shift``, in place on that array where arrays are mutable
    (no other temporary the size of ``w``), one fused loop under a compiler; ``scale`` is positive (a product of safe
    reciprocals, or 1). ``in_place``: into ``w`` itself, where its library's arrays are mutable (one temporary).
    """
    shape = tuple(w.shape)
    if offset is not None:  # first, exactly: w and offset are close where it matters (rows around a large mean)
        if in_place:
            w -= per_neuron(offset, shape, axis, xp)
        else:
            w = w - per_neuron(offset, shape, axis, xp)
    scale, step, shift = (per_neuron(x, shape, axis, xp) for x in (scale, step, shift))
    if is_library(xp, "torch"):  # its fused multiply-adds: two or three passes over memory instead of four
        out = w.mul_(scale) if in_place else (-shift).addcmul(w, scale)
        out.addcmul_(g, step, value=-1)
        return out.sub_(shift) if in_place else out
    if in_place:
        w *= scale
        w -= g * step
        w -= shift
        return w
    out = g * (-(step / scale))
    out += w
    out *= scale
    out -= shift
    return out
