"""Nero's update on torch tensors: the reference (the core rule) and the fast steady-state kernel.

Per-parameter state (what ``Nero.state[p]`` holds)::

    step   0-d float32 tensor on the parameter's device: updates taken (like torch Adam's ``step``)
    v      compute dtype, shape ``(neurons,)`` for neuron tensors, the parameter's shape for bias-like ones
    sigma  0-d compute dtype: the tensor's scale, fixed at its first update

The compute dtype is float64 for float64 parameters and float32 otherwise (bf16/fp16 keep float32 state).

The fast kernel is the core's closed form (:mod:`nero_core._closed_form`), not an approximation: for a neuron row
``w`` with gradient ``g`` and ``c = lr * sigma / sqrt(v_hat)``, the core rule's ``balanced(w - c*g)`` is
``scale * w - step * g - shift`` with per-row factors that follow from five row sums of the OLD row, ``sum(w)``,
``|w|^2``, ``<w, g>``, ``sum(g)`` and ``|g|^2``. A steady-state step is two phases: :func:`step_sizes` reads ``g``
once (``|g|^2``, ``sum(g)``, hence ``v`` and ``c`` by the core's :func:`~nero_core._closed_form.step_rate`; the new
``v`` is also the non-finite check), and :func:`apply_step` reads ``w, g`` for the other sums, turns them into the
factors by the core's :func:`~nero_core._closed_form.balance_factors` and writes; under ``torch.compile`` both
happen in one loop over rows. Eagerly, a tensor with a row whose factors would cancel (a step of the order of the
row's norm) is balanced from its actual rows instead. The first update of a tensor (projection of the initial
weights and the choice of sigma) is left to the core rule (:func:`reference_update`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat.torch as xp
import torch
from torch import Tensor

import nero_core
from nero_core._closed_form import balance_factors, step_rate
from nero_core._neurons import balanced_rows

__all__ = [
    "StepSizes", "TensorSpec", "apply_step", "compute_dtype", "reference_update", "sizes_from_sums", "squared_norms",
    "step_sizes",
]


class TensorSpec(NamedTuple):
    """What the kernels need to know about one parameter, all of it static (no tensor values)."""

    axis: int | None  # neuron axis (normalised), or None for a bias-like tensor
    centre: bool
    normalise: bool


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_update(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]], specs: list[TensorSpec], *,
    lr: Any, beta: float, maximize: bool,
) -> None:
    """Call nero_core's rule on these tensors and write the result back in place (params and state).

    Tensors sharing (centre, normalise) go through one core call; every parameter has its own step count.
    """
    for constraint in {(s.centre, s.normalise) for s in specs}:
        idx = [i for i, s in enumerate(specs) if (s.centre, s.normalise) == constraint]
        rule = nero_core.nero(
            lr, beta, centre=constraint[0], normalise=constraint[1],
            neuron_axis=[specs[i].axis for i in idx], skip_nonfinite=False,
        )
        ps = [params[i].detach() for i in idx]
        gs = [-grads[i] if maximize else grads[i] for i in idx]
        state = nero_core.NeroState(
            tuple(states[i]["step"].to(torch.int32) for i in idx),
            tuple(states[i]["v"] for i in idx),
            tuple(states[i]["sigma"] for i in idx),
            torch.zeros((), dtype=torch.int32),
        )
        new_params, new_state = rule.update(gs, state, ps)
        for j, i in enumerate(idx):
            params[i].detach().copy_(new_params[j])
            states[i]["v"].copy_(new_state.v[j])
            states[i]["sigma"].copy_(new_state.sigma[j])
            states[i]["step"].add_(1)


def _rows(x: Tensor, axis: int) -> Tensor:
    """``x`` as ``(neurons, fan_in)``: a view when the neuron axis is 0 and ``x`` is contiguous, else a copy."""
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def squared_norms(g: Tensor, spec: TensorSpec) -> Tensor:
    """``|g_row|^2`` per row (bias-like: ``g*g``) in the state's dtype: finite exactly when ``g`` holds no NaN or
    Inf and its squares fit that dtype, the check for a tensor that has no :class:`StepSizes`."""
    g = g.to(compute_dtype(g.dtype))
    return g * g if spec.axis is None else g.movedim(spec.axis, 0).flatten(1).square().sum(1)  # rows, even none


class StepSizes(NamedTuple):
    """Phase one of a steady-state update, from the gradient alone (one read of it).

    ``c`` is the signed step ``lr * sigma / sqrt(v_hat)`` per row (per element for bias-like tensors); ``sg`` and
    ``gg`` are the row sums of ``g`` and of its square (bias-like: ``g`` and ``g*g``). The new ``v`` is finite
    exactly when the row holds no NaN or Inf and its squares fit the state's dtype, so it doubles as the non-finite
    check at no extra pass.
    """

    v: Tensor
    c: Tensor
    sg: Tensor
    gg: Tensor


def step_sizes(
    g: Tensor, state: dict[str, Tensor], spec: TensorSpec, *, lr: Any, beta: float, maximize: bool
) -> StepSizes:
    """The new ``v`` and the per-row step of one tensor; nothing is written."""
    g = g.to(state["v"].dtype)
    if spec.axis is None:
        return sizes_from_sums(g * g, g, state, rows=False, lr=lr, beta=beta, maximize=maximize)
    rows = _rows(g, spec.axis)
    gg = rows.square().sum(1) if torch.compiler.is_compiling() else torch.linalg.vector_norm(rows, dim=1).square()
    return sizes_from_sums(gg, rows.sum(1), state, rows=True, lr=lr, beta=beta, maximize=maximize)


def sizes_from_sums(
    gg: Tensor, sg: Tensor, state: dict[str, Tensor], *, rows: bool, lr: Any, beta: float, maximize: bool
) -> StepSizes:
    """:func:`step_sizes` from the gradient's sums ``|g_row|^2`` and ``sum(g_row)`` (bias-like, ``rows=False``:
    ``g*g`` and ``g``), wherever they were summed (here, or across the ranks that share a row)."""
    signed_lr = -lr if maximize else lr
    v, c = step_rate(gg, state["v"], state["sigma"], state["step"], lr=signed_lr, beta=beta, xp=xp)
    return StepSizes(v, c, sg, gg)


def apply_step(p: Tensor, g: Tensor, state: dict[str, Tensor], spec: TensorSpec, sizes: StepSizes,
               finite: Tensor | None = None) -> None:
    """Phase two: write the updated ``p`` (and ``v``, ``step``) in place, one pass over ``p`` and ``g``.

    ``finite`` (a 0-d bool tensor) keeps everything as it was where False, without a host sync (for graph
    capture); None means the caller already knows the step is taken.
    """
    dtype = state["v"].dtype
    if finite is None:
        _apply_eager(p, g, spec, sizes, dtype)
        state["v"].copy_(sizes.v)
        state["step"].add_(1)
        return
    # Traced: one expression per tensor, which inductor fuses into a single loop over rows (sums, then write).
    w, grad = p.to(dtype), g.to(dtype)
    if spec.axis is None:
        new = w - sizes.c * grad
    else:
        dims = [d for d in range(p.ndim) if d != spec.axis]
        sums = (w * w).sum(dims), w.sum(dims), (w * grad).sum(dims)
        factors = _balance(*sums, sizes, spec, w.numel())
        scale, step, shift = (_per_row(x, p, spec.axis) for x in factors[:3])
        new = scale * w - step * grad - shift
    p.copy_(torch.where(finite, new, w))
    state["v"].copy_(torch.where(finite, sizes.v, state["v"]))
    state["step"].add_(finite.to(state["step"].dtype))


def _apply_eager(p: Tensor, g: Tensor, spec: TensorSpec, sizes: StepSizes, dtype: torch.dtype) -> None:
    """The eager update, with as few passes over memory as eager torch allows (in place where it can)."""
    if spec.axis is None:
        w = p if p.dtype == dtype else p.to(dtype)
        w.addcmul_(sizes.c, g.to(dtype), value=-1)
    else:
        w, grad = _rows(p.to(dtype), spec.axis), _rows(g.to(dtype), spec.axis)
        sums = torch.linalg.vector_norm(w, dim=1).square(), w.sum(1), (w * grad).sum(1)
        factors = _balance(*sums, sizes, spec, p.numel())
        in_place = w.data_ptr() == p.data_ptr() and spec.axis == 0 and p.is_contiguous()  # w is p, as rows
        if bool(factors.recompute.any()):  # the closed form cancels in some row: balance the actual rows
            w = balanced_rows(w - sizes.c[:, None] * grad, xp, centre=spec.centre, normalise=spec.normalise)
        else:
            scale, step, shift = (x[:, None] for x in factors[:3])
            w = (w if in_place else w.clone()).mul_(scale).addcmul_(grad, step, value=-1).sub_(shift)
        w = w.reshape(p.movedim(spec.axis, 0).shape).movedim(0, spec.axis)
    if w.data_ptr() != p.data_ptr():
        p.copy_(w)


def _per_row(x: Tensor, p: Tensor, axis: int) -> Tensor:
    """Reshape a ``(neurons,)`` vector so that it broadcast along ``p``'s neuron axis."""
    shape = [1] * p.ndim
    shape[axis] = p.shape[axis]
    return x.reshape(shape)


def _balance(ww: Tensor, sw: Tensor, wg: Tensor, sizes: StepSizes, spec: TensorSpec, numel: int) -> Any:
    """The core's factors of ``balanced(w - c*g)`` per row, from the old row's sums and phase one's."""
    k = numel // sizes.c.shape[0]  # zero-size tensors never come here: the core rule takes them
    return balance_factors(
        sw, ww, sizes.sg, sizes.gg, wg, sizes.c, fan_in=k, centre=spec.centre, normalise=spec.normalise, xp=xp
    )


def _row_terms(
    ww: Tensor, sw: Tensor, wg: Tensor, sizes: StepSizes, spec: TensorSpec, numel: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``c, mean, scale`` per row with ``balanced(w - c*g) = (w - c*g - mean) * scale`` (the form the DTensor
    path writes), from the core's factors."""
    factors = _balance(ww, sw, wg, sizes, spec, numel)
    return sizes.c, factors.shift / factors.scale, factors.scale
