"""Nero, the neuronal rotator (Liu, Bernstein, Meister & Yue, ICML 2021), as a pure array-API rule.

Per parameter tensor ``p`` with gradient ``g``, with state ``(t, v, sigma)``:

* neuron tensors (``ndim >= 2``, fan-in ``>= 2``) are viewed as rows ``W`` of shape ``(neurons, fan_in)``;
  ``v`` has one entry per neuron, ``v = beta*v + (1-beta)*|g_row|^2``;
* bias-like tensors are elementwise: ``v = beta*v + (1-beta)*g*g``;
* the update is ``p -= lr * sigma * g / sqrt(v / (1 - beta**t))`` (zero where ``v == 0``), and constrained
  neuron tensors are then projected back to zero-mean (``centre``), unit-norm (``normalise``) rows;
* at the first update (``t == 0``) constrained rows are projected first and ``sigma`` is fixed: 1 for
  normalised neuron tensors, else the mean row norm (neuron tensors) or mean ``|p|`` (bias-like), 0.01 where
  that is 0.

Nothing branches on array values (``where`` instead), so the rule traces under ``jax.jit``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple


from ._base import (
    Optimizer,
    check_gradients,
    check_hyperparameter,
    check_params,
    compute_dtype,
    namespace_of,
    zeros_beside,
)
from ._neurons import NeuronAxis, as_rows, balanced_rows, from_rows, neuron_axes, row_norm, row_sum

__all__ = ["NeroState", "balanced", "nero"]

SIGMA_FLOOR = 0.01  # sigma where a tensor starts at zero: the paper's default scale


class NeroState(NamedTuple):
    """Nero's state, one entry per parameter tensor in each tuple.

    count:   0-d int32, updates taken so far (skipped steps excluded).
    v:       float, shape ``(neurons,)`` for neuron tensors, the parameter's shape for bias-like ones.
    sigma:   0-d float, the tensor's scale, fixed at its first update.
    skipped: 0-d int32, steps in which a gradient (or its square) was not finite: skipped whole, or with
             ``skip_nonfinite="neuron"`` held back for the neurons concerned.
    """

    count: tuple[Any, ...]  # type: ignore[assignment]  # optax's name for it; shadows tuple.count
    v: tuple[Any, ...]
    sigma: tuple[Any, ...]
    skipped: Any



def _state_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    return shape if axis is None else (shape[axis],)


def _with_floor(scale: Any, xp: Any) -> Any:
    return xp.where(scale > 0, scale, xp.full_like(scale, SIGMA_FLOOR))


def _inverse_rms(v: Any, bias_correction: Any, xp: Any) -> Any:
    """``1 / sqrt(v / bias_correction)`` where ``v > 0``, else 0: the 0/0 guard, without eps."""
    positive = v > 0
    safe = xp.where(positive, v, xp.ones_like(v))
    # 1/sqrt(v/bc), not sqrt(bc/v): bc/v overflows float32 for tiny v (gradients ~1e-20), this cannot.
    return xp.where(positive, 1 / xp.sqrt(safe / bias_correction), xp.zeros_like(v))


def _bias_correction(beta: Any, t: Any, dtype: Any, xp: Any) -> Any:
    return xp.astype(1 - beta ** xp.astype(t, dtype), dtype, copy=False)


def _update_neurons(
    p: Any, g: Any, t: Any, v: Any, sigma: Any, *, axis: int, lr: Any, beta: Any, centre: bool, normalise: bool, xp: Any
) -> tuple[Any, Any, Any]:
    dtype = v.dtype
    rows = as_rows(xp.astype(p, dtype, copy=False), axis, xp)
    grad = as_rows(xp.astype(g, dtype, copy=False), axis, xp)
    first = t == 0
    if centre or normalise:
        rows = xp.where(first, balanced_rows(rows, xp, centre=centre, normalise=normalise), rows)
    start = xp.ones_like(sigma) if normalise else _with_floor(xp.mean(row_norm(rows, xp)) if rows.shape[0] else sigma, xp)
    sigma = xp.where(first, start, sigma)
    t = t + 1
    v = xp.astype(beta * v + (1 - beta) * row_sum(grad * grad, xp)[:, 0], dtype, copy=False)
    scale = xp.expand_dims(_inverse_rms(v, _bias_correction(beta, t, dtype, xp), xp), axis=1)
    rows = rows - (lr * sigma) * (grad * scale)
    if centre or normalise:
        rows = balanced_rows(rows, xp, centre=centre, normalise=normalise)
    return from_rows(rows, tuple(p.shape), axis, xp), v, sigma


def _update_elementwise(p: Any, g: Any, t: Any, v: Any, sigma: Any, *, lr: Any, beta: Any, xp: Any) -> tuple[Any, Any, Any]:
    dtype = v.dtype
    x = xp.astype(p, dtype, copy=False)
    grad = xp.astype(g, dtype, copy=False)
    size = math.prod(x.shape)
    start = _with_floor(xp.sum(xp.abs(x)) / size if size else sigma, xp)
    sigma = xp.where(t == 0, start, sigma)
    t = t + 1
    v = xp.astype(beta * v + (1 - beta) * (grad * grad), dtype, copy=False)
    x = x - (lr * sigma) * (grad * _inverse_rms(v, _bias_correction(beta, t, dtype, xp), xp))
    return x, v, sigma


def _all_finite(arrays: Sequence[Any], xp: Any) -> Any:
    finite = xp.asarray(True)
    for a in arrays:
        finite = xp.logical_and(finite, xp.all(xp.isfinite(a)))
    return finite


def skip_mode(skip_nonfinite: Any) -> str | None:
    """``"step"``, ``"neuron"`` or None (propagate) from a ``skip_nonfinite`` argument, or a clear error."""
    if skip_nonfinite is True or skip_nonfinite == "step":
        return "step"
    if skip_nonfinite is False:
        return None
    if skip_nonfinite == "neuron":
        return "neuron"
    raise ValueError(f"skip_nonfinite must be True, False, 'step' or 'neuron', got {skip_nonfinite!r}")


def _keep_finite_neurons(
    new_params: list[Any], new: NeroState, params: Sequence[Any], old: NeroState, axes: Sequence[int | None], xp: Any
) -> tuple[list[Any], NeroState]:
    """Hold back, per neuron, the updates whose new ``v`` is not finite; count the step where any was."""
    kept_params, kept_v, held = [], [], xp.asarray(False)
    for x, p, v_new, v_old, axis in zip(new_params, params, new.v, old.v, axes):
        finite = xp.isfinite(v_new)
        held = xp.logical_or(held, xp.logical_not(xp.all(finite)))
        if axis is not None:
            shape = [1] * len(p.shape)
            shape[axis] = p.shape[axis]
            finite_p = xp.reshape(finite, tuple(shape))
        else:
            finite_p = finite
        kept_params.append(xp.where(finite_p, x, p))
        kept_v.append(xp.where(finite, v_new, v_old))
    skipped = old.skipped + xp.astype(held, old.skipped.dtype)
    return kept_params, NeroState(new.count, tuple(kept_v), new.sigma, skipped)


def _check_state(state: NeroState, params: Sequence[Any], axes: Sequence[int | None]) -> None:
    if not isinstance(state, NeroState):
        raise TypeError(f"state must be a NeroState (from nero(...).init), got {type(state).__name__}")
    if len(state.v) != len(params):
        raise ValueError(f"state holds {len(state.v)} tensors but there are {len(params)} parameters")
    for i, (p, v, axis) in enumerate(zip(params, state.v, axes)):
        expected = _state_shape(tuple(p.shape), axis)
        if tuple(v.shape) != expected:
            raise ValueError(
                f"state.v[{i}] has shape {tuple(v.shape)} but params[{i}] of shape {tuple(p.shape)} needs {expected}"
            )


def nero(
    lr: Any = 0.01,
    beta: Any = 0.999,
    *,
    centre: bool = True,
    normalise: bool = True,
    neuron_axis: NeuronAxis = 0,
    skip_nonfinite: bool | str = True,
) -> Optimizer:
    """Nero: per-neuron relative updates on balanced (zero-mean, unit-norm) neurons.

    Args:
        lr: step size; each balanced neuron turns by about ``lr`` radians per step. A Python float, or a
            0-d array (a schedule or ``inject_hyperparams``).
        beta: decay of the per-neuron second moment, in ``[0, 1)``.
        centre: keep every neuron's weights zero-mean.
        normalise: keep every neuron's weights unit-norm.
        neuron_axis: which axis indexes neurons: an int for every tensor, None (all bias-like), a sequence
            with one entry per parameter, or a callable ``shape -> int | None``.
        skip_nonfinite: what a gradient holding NaN or Inf (or so large that its square overflows the state's
            dtype) does. True or ``"step"``: the whole step is skipped, parameters and state stay exactly as they
            were. ``"neuron"``: only the neurons (rows of neuron tensors, elements of bias-like ones) whose new
            ``v`` is not finite keep their weights and ``v``; the rest update and every count advances (what
            ``nero_torch.Nero``'s one-pass kernel does). Either way the step is counted in ``state.skipped``.
            False: non-finite values propagate.

    Returns:
        An :class:`Optimizer` pair ``(init, update)``.
    """
    check_hyperparameter("lr", lr, low=0.0, high=math.inf, high_open=False)
    check_hyperparameter("beta", beta, low=0.0, high=1.0, high_open=True)
    skip = skip_mode(skip_nonfinite)

    def init(params: Sequence[Any], *, xp: Any = None) -> NeroState:
        params = list(params)
        xp = namespace_of(*params, xp=xp)
        check_params(xp, params)
        axes = neuron_axes([tuple(p.shape) for p in params], neuron_axis)
        count, v, sigma = [], [], []
        for p, axis in zip(params, axes):
            dtype = compute_dtype(xp, p.dtype)
            count.append(zeros_beside(xp, p, (), xp.int32))
            v.append(zeros_beside(xp, p, _state_shape(tuple(p.shape), axis), dtype))
            sigma.append(zeros_beside(xp, p, (), dtype))
        skipped = zeros_beside(xp, params[0], (), xp.int32) if params else xp.zeros((), dtype=xp.int32)
        return NeroState(tuple(count), tuple(v), tuple(sigma), skipped)

    def update(grads: Sequence[Any], state: NeroState, params: Sequence[Any]) -> tuple[list[Any], NeroState]:
        grads, params = list(grads), list(params)
        xp = namespace_of(*params, *grads)
        check_params(xp, params)
        check_gradients(xp, grads, params)
        axes = neuron_axes([tuple(p.shape) for p in params], neuron_axis)
        _check_state(state, params, axes)
        new_params, new_v, new_sigma = [], [], []
        for p, g, t, v, sigma, axis in zip(params, grads, state.count, state.v, state.sigma, axes):
            if axis is None:
                x, v, sigma = _update_elementwise(p, g, t, v, sigma, lr=lr, beta=beta, xp=xp)
            else:
                x, v, sigma = _update_neurons(
                    p, g, t, v, sigma, axis=axis, lr=lr, beta=beta, centre=centre, normalise=normalise, xp=xp
                )
            new_params.append(xp.astype(x, p.dtype, copy=False))
            new_v.append(v)
            new_sigma.append(sigma)
        new_count = [t + 1 for t in state.count]
        new_state = NeroState(tuple(new_count), tuple(new_v), tuple(new_sigma), state.skipped)
        if skip is None:
            return new_params, new_state
        if skip == "neuron":
            return _keep_finite_neurons(new_params, new_state, params, state, axes, xp)
        # NaN or Inf in a gradient reaches its v, and so does a finite gradient whose square overflows the state's
        # dtype: checking the new v (one entry per neuron) catches both without another pass over the gradients.
        finite = _all_finite(new_v, xp)

        def keep(new: Any, old: Any) -> Any:
            return xp.where(finite, new, old)

        return [keep(n, o) for n, o in zip(new_params, params)], NeroState(
            tuple(keep(n, o) for n, o in zip(new_count, state.count)),
            tuple(keep(n, o) for n, o in zip(new_v, state.v)),
            tuple(keep(n, o) for n, o in zip(new_sigma, state.sigma)),
            state.skipped + xp.astype(xp.logical_not(finite), state.skipped.dtype),
        )

    return Optimizer(init, update)


def balanced(
    params: Sequence[Any],
    neuron_axis: NeuronAxis = 0,
    *,
    centre: bool = True,
    normalise: bool = True,
    xp: Any = None,
) -> list[Any]:
    """Project every neuron tensor to zero-mean, unit-norm rows; bias-like tensors are returned as they are."""
    params = list(params)
    xp = namespace_of(*params, xp=xp)
    check_params(xp, params)
    out = []
    for p, axis in zip(params, neuron_axes([tuple(p.shape) for p in params], neuron_axis)):
        if axis is None:
            out.append(p)
            continue
        rows = as_rows(xp.astype(p, compute_dtype(xp, p.dtype), copy=False), axis, xp)
        rows = balanced_rows(rows, xp, centre=centre, normalise=normalise)
        out.append(xp.astype(from_rows(rows, tuple(p.shape), axis, xp), p.dtype, copy=False))
    return out
