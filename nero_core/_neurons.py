"""Neurons: which tensors have them, how to view a tensor as rows, and the balanced projection.

A *neuron tensor* has ``ndim >= 2`` and fan-in (the product of every axis but the neuron axis) ``>= 2``; it is
viewed as a matrix ``W`` of shape ``(neurons, fan_in)``. Every other tensor is *bias-like* and handled
elementwise.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, Union

from ._base import device_of
from ._branch import blas_flags_quiet, is_library, is_traced

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


# Eager sums and writes over a large CPU tensor run over blocks of rows this big (per array, per torch thread): the
# five reductions then read a block from cache after its first read from memory, where whole-tensor reductions
# would each read the tensor from memory (measured on a 2-core Xeon, the GPT-2-like set: about a quarter off the
# sums' time in torch; at 2 threads, blocks twice as large took a tenth off the step).
BLOCK_BYTES = 1 << 18


# On a GPU a block is a few kernel launches, not a cache's worth of work: blocks there are this large (one block for
# most tensors), only to bound the temporary that torch's row dot product takes.
GPU_BLOCK_BYTES = 1 << 26


def _block_rows(x: Any, row_bytes: int, xp: Any) -> int | None:
    """Rows per block of an eager array whose rows take ``row_bytes``: on CPU, :data:`BLOCK_BYTES` per thread of
    torch's (each thread's share then fits its core's cache); on a GPU (CuPy, torch off the CPU),
    :data:`GPU_BLOCK_BYTES`. None, one block, for JAX's and traced arrays (a compiler fuses their passes)."""
    if is_library(xp, "jax.numpy") or is_traced(x, xp):
        return None
    size = BLOCK_BYTES
    if is_library(xp, "cupy"):
        size = GPU_BLOCK_BYTES
    elif is_library(xp, "torch"):
        torch = sys.modules["torch"]
        size = BLOCK_BYTES * torch.get_num_threads() if x.device.type == "cpu" else GPU_BLOCK_BYTES
    return max(1, size // max(1, row_bytes))


def _blocks(x: Any, rows: int, xp: Any) -> list[Any]:
    """Views of ``x``'s blocks of ``rows`` rows (along axis 0), in order."""
    if is_library(xp, "torch"):
        return list(x.split(rows))  # (one call, where a slice each costs as much as a small reduction)
    return [x[i:min(i + rows, x.shape[0]), ...] for i in range(0, x.shape[0], rows)]


def _sums(rows_w: Any, rows_g: Any, ones: Any, xp: Any) -> tuple[Any, Any, Any, Any, Any]:
    """The five sums of :func:`neuron_sums` over ``(rows, n)`` arrays, except that on torch the second and fourth are
    the norms ``|w|`` and ``|g|`` (squared by the caller once, not per block). ``ones``: ``n`` ones, to sum rows by a
    matrix-vector product, which BLAS runs faster than NumPy's sum along rows (torch's own sum is faster still)."""
    if is_library(xp, "torch"):  # array_api_compat's torch vecdot runs 4x slower than these
        norm = sys.modules["torch"].linalg.vector_norm
        dot = (rows_w * rows_g).sum(1)  # first: one operation reads both arrays from memory, the rest from cache
        return rows_w.sum(1), norm(rows_w, dim=1), rows_g.sum(1), norm(rows_g, dim=1), dot
    return (
        rows_w @ ones, xp.vecdot(rows_w, rows_w), rows_g @ ones, xp.vecdot(rows_g, rows_g), xp.vecdot(rows_w, rows_g)
    )  # (NumPy, CuPy: no temporary the size of the rows)


def neuron_sums(w: Any, g: Any, axis: int, xp: Any) -> tuple[Any, Any, Any, Any, Any]:
    """Per neuron of ``w`` (neurons on ``axis``) and its gradient ``g``, over every other axis: ``sum(w)``,
    ``|w|^2``, ``sum(g)``, ``|g|^2`` and ``<w, g>``, each of shape ``(neurons,)``. Reads only; with neurons on
    axis 0 the rows are views (summed a block of rows at a time on eager arrays, see :data:`BLOCK_BYTES`),
    elsewhere the sums run in place (no transpose)."""
    if axis == 0:
        rows_w, rows_g = as_rows(w, 0, xp), as_rows(g, 0, xp)
        neurons, fan_in = rows_w.shape
        block = _block_rows(rows_w, fan_in * xp.finfo(rows_w.dtype).bits // 8, xp)
        on_torch = is_library(xp, "torch")  # (its row sums need no ones)
        ones = None if on_torch else xp.ones((fan_in,), dtype=rows_w.dtype, device=device_of(rows_w))
        with blas_flags_quiet(xp):
            if block is None or block >= neurons:
                sums = _sums(rows_w, rows_g, ones, xp)
            else:
                blocks = zip(_blocks(rows_w, block, xp), _blocks(rows_g, block, xp))
                parts = [_sums(x, y, ones, xp) for x, y in blocks]
                sums = tuple(xp.concat([part[k] for part in parts]) for k in range(5))
        if on_torch:
            return sums[0], sums[1] * sums[1], sums[2], sums[3] * sums[3], sums[4]
        return sums
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
    on_torch = is_library(xp, "torch")
    if in_place:  # w - (step / scale) g first: the pass that reads w and g from memory reads both
        step = step / scale
    scale, step, shift = (per_neuron(x, shape, axis, xp) for x in (scale, step, shift))
    if in_place and axis == 0 and len(shape):
        block = _block_rows(w, math.prod(shape[1:]) * xp.finfo(w.dtype).bits // 8, xp)
        if block is not None and block < shape[0]:  # a block of rows at a time: its passes read it from cache
            blocks = zip(*(_blocks(x, block, xp) for x in (w, g, scale, step, shift)))
            for w_b, g_b, scale_b, step_b, shift_b in blocks:
                _write_rows(w_b, g_b, scale_b, step_b, shift_b, xp)
            return w
    if in_place:
        return _write_rows(w, g, scale, step, shift, xp)
    if on_torch:  # its fused multiply-adds: two passes over memory instead of four
        return (-shift).addcmul(w, scale).addcmul_(g, step, value=-1)
    out = g * (-(step / scale))
    out += w
    out *= scale
    out -= shift
    return out


def _write_rows(w: Any, g: Any, scale: Any, ratio: Any, shift: Any, xp: Any) -> Any:
    """``w = scale * (w - ratio * g) - shift`` in place (``ratio`` is ``step / scale``; factors shaped to broadcast
    along ``w``'s neuron axis). The first operation reads both arrays at once (on a block's first read from memory,
    one stream each instead of one after the other: about a tenth off torch's step on the GPT-2-like set); on torch
    it is a fused multiply-add with no temporary."""
    if is_library(xp, "torch"):
        return w.addcmul_(g, ratio, value=-1).mul_(scale).sub_(shift)
    w -= g * ratio
    w *= scale
    w -= shift
    return w
