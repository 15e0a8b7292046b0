"""Automatic gradient descent (Bernstein, Mingard, Huang, Azizan & Yue, 2023), as a pure array-API rule.

The *weights* are the tensors with an output and an input axis (torch ``(out, in, *kernel)`` by default); ``L`` is
their number and ``k`` the size of a weight's kernel (1 for a matrix). Each weight has the scale
``sv(W) = sqrt(d_out / d_in) / sqrt(k)``. One step, with no state but a report of ``eta``:

* per kernel slice ``s`` of each weight, ``n_s = ||grad W[:, :, s]||_F``;
* ``G = (1/L) * sum_W sv(W) * sum_s n_s`` and ``eta = log((1 + sqrt(1 + 4G)) / 2)``;
* ``W[:, :, s] -= gain * (eta / L) * sv(W) * grad W[:, :, s] / n_s`` (no move where ``n_s == 0``).

Every other tensor (biases, norm gains: the experimental extension) follows one weight, by default the nearest
weight before it, and moves by ``gain * (eta / L) * sv(W) * grad p / ||grad W||_F``; it does not enter ``G`` or ``L``.

:func:`agd_init` is the paper's initialisation: every ``(out, in)`` slice (semi-)orthogonal, times ``sv(W)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeGuard, Union

import numpy as np
from array_api_compat import is_array_api_obj

from ._base import (
    Optimizer,
    check_gradients,
    check_hyperparameter,
    check_params,
    compute_dtype,
    device_of,
    namespace_of,
    zeros_beside,
)

__all__ = ["AGDState", "agd", "agd_init", "weight_axes"]

Axes = tuple[int, int]
_Entry = Union[str, Axes, None]
Layout = Union[_Entry, Sequence[_Entry], Callable[[tuple[int, ...]], _Entry]]

# (out, in) axes of a weight of ndim n, by named layout.
_LAYOUTS: dict[str, Callable[[int], Axes]] = {
    "torch": lambda n: (0, 1),  # Linear (out, in), ConvNd (out, in, *kernel)
    "flax": lambda n: (n - 1, n - 2),  # Dense (in, out), Conv (*kernel, in, out)
}


class AGDState(NamedTuple):
    """AGD's state: nothing the step needs, only what it reports.

    eta:     0-d float, the automatic learning rate of the last step taken (0 before the first). float64 when any
             parameter is float64, else float32.
    count:   0-d int32, steps taken (skipped steps excluded).
    skipped: 0-d int32, steps skipped because a gradient was not finite.
    """

    eta: Any
    count: Any
    skipped: Any


def _is_pair(entry: Any) -> TypeGuard[Axes]:
    return isinstance(entry, Sequence) and len(entry) == 2 and all(type(a) is int for a in entry)


def _resolve(shape: tuple[int, ...], entry: _Entry, index: int) -> Axes | None:
    if entry is None or len(shape) < 2:
        return None
    if isinstance(entry, str):
        if entry not in _LAYOUTS:
            raise ValueError(f"layout for params[{index}] must be one of {sorted(_LAYOUTS)}, got {entry!r}")
        return _LAYOUTS[entry](len(shape))
    if not _is_pair(entry):
        raise TypeError(
            f"layout for params[{index}] must be 'torch', 'flax', (out_axis, in_axis) or None, got {entry!r}"
        )
    out_axis, in_axis = entry
    n = len(shape)
    if not (-n <= out_axis < n and -n <= in_axis < n) or out_axis % n == in_axis % n:
        raise ValueError(f"layout {tuple(entry)} for params[{index}] of shape {shape} needs two distinct axes in range")
    return out_axis % n, in_axis % n


def weight_axes(shapes: Sequence[tuple[int, ...]], layout: Layout = "torch") -> tuple[Axes | None, ...]:
    """The ``(out_axis, in_axis)`` of every weight, None for the other tensors (``ndim < 2`` always).

    ``layout`` is ``"torch"`` (``(out, in, *kernel)``), ``"flax"`` (``(*kernel, in, out)``), an ``(out_axis,
    in_axis)`` pair for every tensor, a sequence with one such entry (or None: not a weight) per tensor, or a
    callable ``shape -> entry``.
    """
    if callable(layout):
        entries = [layout(tuple(s)) for s in shapes]
    elif layout is None or isinstance(layout, str) or _is_pair(layout):
        entries = [layout] * len(shapes)
    else:
        entries = list(layout)  # type: ignore[arg-type]  # a sequence of entries, by elimination
        if len(entries) != len(shapes):
            raise ValueError(f"layout has {len(entries)} entries but there are {len(shapes)} parameters")
    return tuple(_resolve(tuple(s), e, i) for i, (s, e) in enumerate(zip(shapes, entries)))


def _owners(axes: Sequence[Axes | None], attach: Sequence[int | None] | None) -> tuple[int, ...]:
    """The weight each tensor's step follows: itself for a weight; else ``attach[i]``, or the nearest weight
    before it, or (none before) the first weight after it."""
    weights = [i for i, a in enumerate(axes) if a is not None]
    if not weights:
        raise ValueError("AGD needs at least one weight tensor (ndim >= 2 with an (out, in) layout)")
    if attach is not None and len(attach) != len(axes):
        raise ValueError(f"attach has {len(attach)} entries but there are {len(axes)} parameters")
    owners = []
    for i, a in enumerate(axes):
        chosen = None if attach is None else attach[i]
        if a is not None:
            if chosen is not None and chosen != i:
                raise ValueError(f"params[{i}] is a weight: attach[{i}] must be None or {i}, got {chosen!r}")
            owners.append(i)
        elif chosen is not None:
            if type(chosen) is not int or not 0 <= chosen < len(axes) or axes[chosen] is None:
                raise ValueError(f"attach[{i}] must be the index of a weight tensor, got {chosen!r}")
            owners.append(chosen)
        else:
            before = [w for w in weights if w < i]
            owners.append(before[-1] if before else weights[0])
    return tuple(owners)


def _scale(shape: tuple[int, ...], axes: Axes) -> float:
    """``sv(W) = sqrt(d_out / d_in) / sqrt(k)``; 0 for an empty weight (it cannot move)."""
    d_out, d_in = shape[axes[0]], shape[axes[1]]
    k = math.prod(n for i, n in enumerate(shape) if i not in axes)
    return math.sqrt(d_out / d_in) / math.sqrt(k) if d_out * d_in * k else 0.0


def _safe_reciprocal(x: Any, xp: Any) -> Any:
    """1/x where x > 0, else 0: a slice with no gradient does not move."""
    positive = x > 0
    return xp.where(positive, 1 / xp.where(positive, x, xp.ones_like(x)), xp.zeros_like(x))


def _eta_dtype(xp: Any, params: Sequence[Any]) -> Any:
    return xp.float64 if any(compute_dtype(xp, p.dtype) == xp.float64 for p in params) else xp.float32



def agd(
    gain: Any = 1.0,
    *,
    layout: Layout = "torch",
    attach: Sequence[int | None] | None = None,
    skip_nonfinite: bool = True,
) -> Optimizer:
    """Automatic gradient descent: a learning rate ``eta`` from the gradient norms, no tuning.

    Args:
        gain: multiplies every step; 1 is the paper's AGD. A Python float or a 0-d array (a schedule).
        layout: where each weight keeps its output and input axes (see :func:`weight_axes`): ``"torch"``
            (the default), ``"flax"``, an ``(out_axis, in_axis)`` pair, one entry per tensor, or a callable.
            Tensors that are not weights (``ndim < 2``, or a None entry) follow a weight.
        attach: for each tensor that is not a weight, the index of the weight it follows (None: the nearest
            weight before it, or the first one after it when there is none before). Entries for weights are None.
        skip_nonfinite: when any gradient holds NaN or Inf (or is so large that its squared norm overflows, so
            that the step is NaN), leave the parameters and ``eta`` as they were and count the step in
            ``state.skipped``. When False, non-finite values propagate.

    Returns:
        An :class:`Optimizer` pair ``(init, update)``; ``state.eta`` holds the last step's ``eta``.
    """
    check_hyperparameter("gain", gain, low=0.0, high=math.inf, high_open=False)

    def init(params: Sequence[Any], *, xp: Any = None) -> AGDState:
        params = list(params)
        xp = namespace_of(*params, xp=xp)
        check_params(xp, params)
        _owners(weight_axes([tuple(p.shape) for p in params], layout), attach)
        like = params[0]
        return AGDState(
            zeros_beside(xp, like, (), _eta_dtype(xp, params)),
            zeros_beside(xp, like, (), xp.int32),
            zeros_beside(xp, like, (), xp.int32),
        )

    def update(grads: Sequence[Any], state: AGDState, params: Sequence[Any]) -> tuple[list[Any], AGDState]:
        grads, params = list(grads), list(params)
        xp = namespace_of(*params, *grads)
        check_params(xp, params)
        check_gradients(xp, grads, params)
        if not isinstance(state, AGDState):
            raise TypeError(f"state must be an AGDState (from agd(...).init), got {type(state).__name__}")
        axes = weight_axes([tuple(p.shape) for p in params], layout)
        owners = _owners(axes, attach)
        weights = [i for i, a in enumerate(axes) if a is not None]
        dtype = state.eta.dtype
        grads = [xp.astype(g, compute_dtype(xp, p.dtype), copy=False) for g, p in zip(grads, params)]
        scale = {i: _scale(tuple(params[i].shape), axes[i]) for i in weights}  # type: ignore[arg-type]
        norms = {i: xp.sqrt(xp.sum(grads[i] * grads[i], axis=axes[i], keepdims=True)) for i in weights}
        total = sum(scale[i] * xp.astype(xp.sum(norms[i]), dtype) for i in weights) / len(weights)
        eta = xp.log((1 + xp.sqrt(1 + 4 * total)) / 2)
        new_params = []
        for i, (p, g) in enumerate(zip(params, grads)):
            w = owners[i]
            # The weight's own slice norms, or for a tensor that follows it the weight's whole norm.
            norm = norms[w] if i == w else xp.sqrt(xp.sum(norms[w] * norms[w]))
            factor = (gain * eta / len(weights) * scale[w]) * _safe_reciprocal(norm, xp)  # one number per slice
            new_params.append(xp.astype(p - g * factor, p.dtype, copy=False))
        new_state = AGDState(xp.astype(eta, dtype, copy=False), state.count + 1, state.skipped)
        if not skip_nonfinite:
            return new_params, new_state
        # NaN or Inf in a gradient makes its squared norm non-finite, so the norms already taken catch it without
        # another pass over the weights. (A finite gradient whose squared norm overflows is skipped too: its step
        # would be NaN.)
        finite = xp.isfinite(total)
        for g, a in zip(grads, axes):
            if a is None:
                finite = xp.logical_and(finite, xp.isfinite(xp.sum(g * g)))
        return [xp.where(finite, n, o) for n, o in zip(new_params, params)], AGDState(
            xp.where(finite, new_state.eta, state.eta),
            state.count + xp.astype(finite, state.count.dtype),
            state.skipped + xp.astype(xp.logical_not(finite), state.skipped.dtype),
        )

    return Optimizer(init, update)


def _orthogonal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A Haar-random (semi-)orthogonal ``rows x cols`` matrix: every singular value 1."""
    tall = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(tall)
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)  # the sign fix that makes QR of a Gaussian Haar-distributed
    return q if rows >= cols else q.T


def _initial_weight(rng: np.random.Generator, shape: tuple[int, ...], axes: Axes) -> np.ndarray:
    kernel = tuple(n for i, n in enumerate(shape) if i not in axes)
    d_out, d_in = shape[axes[0]], shape[axes[1]]
    slices = [_orthogonal(rng, d_out, d_in) for _ in range(math.prod(kernel))]
    stacked = np.stack(slices, axis=-1) if slices else np.zeros((d_out, d_in, 0))
    canonical = stacked.reshape((d_out, d_in) + kernel) * _scale(shape, axes)
    return np.moveaxis(canonical, (0, 1), axes)


def agd_init(params: Sequence[Any], seed: int = 0, *, layout: Layout = "torch", xp: Any = None) -> list[Any]:
    """New parameters: every ``(out, in)`` slice of every weight (semi-)orthogonal, times ``sv(W)``.

    The random numbers come from ``numpy.random.default_rng(seed)`` on the host, weight by weight in order and
    kernel slice by kernel slice (C order), so a seed gives the same weights on every backend and in either layout.
    They are then moved to each parameter's namespace, device and dtype. Other tensors are returned as they are.
    """
    params = list(params)
    xp = namespace_of(*params, xp=xp)
    check_params(xp, params)
    rng = np.random.default_rng(seed)
    out = []
    for p, axes in zip(params, weight_axes([tuple(p.shape) for p in params], layout)):
        if axes is None:
            out.append(p)
            continue
        host = _initial_weight(rng, tuple(p.shape), axes)
        # float32 on the host unless the parameter is float64: some backends refuse float64 (JAX without x64).
        host = host.astype(np.float64 if p.dtype == xp.float64 else np.float32)
        new = xp.asarray(host, device=device_of(p)) if is_array_api_obj(p) else xp.asarray(host)
        out.append(xp.astype(new, p.dtype, copy=False))
    return out
