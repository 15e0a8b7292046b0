"""Nero's neuron-tensor step in JAX from per-row sums: reductions, then one read-and-write pass.

For a row ``w`` (one neuron) with gradient ``g`` and fan-in ``n``, the core rule is

    at t == 0 (constrained):  w0 = (w - m) * a      m = mean(w) if centre,  a = 1/|w - m| if normalise
    r = w0 - c * g            c = lr * sigma / sqrt(v_hat)
    out = (r - mean(r)) * s   s = 1/|r - mean(r)| if normalise (mean(r) only if centre)

Every mean and norm above is a function of five row sums of the *old* row, ``sum(w)``, ``|w|^2``, ``sum(g)``,
``|g|^2`` and ``<w, g>``, and the first two are known (0 and 1) once the kernel has balanced the row itself:

    |w - m|^2 = |w|^2 - 2 m sum(w) + n m^2        sum(w0) = a (sum(w) - n m)      <w0, g> = a (<w, g> - m sum(g))
    sum(r) = sum(w0) - c sum(g)                    |r|^2 = a^2 |w - m|^2 - 2 c <w0, g> + c^2 |g|^2
    |r - mean(r)|^2 = |r|^2 - sum(r)^2 / n

so a step reduces ``g``, ``g*g`` and ``w*g`` per row (one read of ``g`` and ``w`` with the CPU custom call of
``_native``; XLA alone runs each reduction as its own pass) and then reads ``w`` and ``g`` once more to write
``out = s (a (w - m) - c g - mean(r)) = scale * w - step * g - shift``, three per-row factors computed once per
row (inside ``lax.cond``, which keeps XLA from fusing their maths into the elementwise pass and redoing it for
every element). The t == 0 projection is folded into the per-row scalars ``(m, a)`` (``(0, 1)`` afterwards), so
no step pays for it twice. Sums run over every axis but the neuron axis in place: no transpose, whatever the
layout.

Known limit: a row that is exactly zero after a step although it had a gradient (a zero row whose gradient was
constant along the row, which centring cancels) is taken as unit-norm at the next step; the core rule would
normalise it when it first moves. Zero rows that never had a gradient (``v == 0``) are handled exactly.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from . import _native

__all__ = ["neuron_step"]

SIGMA_FLOOR = 0.01  # the core's sigma for a tensor that starts at zero


def _safe_reciprocal(x: Any) -> Any:
    """1/x where x > 0, else 1 (a zero row stays zero)."""
    positive = x > 0
    return jnp.where(positive, 1 / jnp.where(positive, x, 1), 1)


def _inverse_rms(v: Any, bias_correction: Any) -> Any:
    """``1 / sqrt(v / bias_correction)`` where ``v > 0``, else 0."""
    positive = v > 0
    return jnp.where(positive, jnp.sqrt(bias_correction / jnp.where(positive, v, 1)), 0)


def _norm(squared: Any) -> Any:
    return jnp.sqrt(jnp.maximum(squared, 0))  # an expanded square can round below zero


def _with_weight_sums(
    per_row: Any, w: Any, fresh: Any, v: Any, others: tuple[int, ...], *, centre: bool, normalise: bool,
    stored_exactly: bool,
) -> Any:
    """``per_row(sum(w), |w|^2)``, the two row sums read from memory only when they are not known already.

    After its first update every row this kernel wrote is balanced: zero-mean if ``centre``, unit-norm if
    ``normalise``. The exceptions, where rows are read (under ``lax.cond``, so other steps skip the reads):
    ``fresh``, the first two steps (the first update, as ``p + (new - p)``, is exact only to the rounding of the
    initial weights' magnitude, which may be far from a unit row's); a row still zero from a zero projection,
    whose ``v`` is 0 (it never had a gradient); and rows stored in a narrower dtype than the maths (bf16, fp16),
    balanced only to its rounding, which trusted sums would let random-walk (3.5% in bf16 row norms after 3000
    steps), so they are read at every step.

    ``per_row`` runs inside the branches, so its results (per-row vectors) are materialised once: were they
    computed outside, XLA would fuse their maths into the elementwise pass that consumes them and redo it for
    every element of the row.
    """

    def read(w: Any) -> Any:
        return per_row(jnp.sum(w, axis=others), jnp.sum(w * w, axis=others))

    if not (centre or normalise) or not stored_exactly:
        return read(w)

    def known(w: Any) -> Any:
        sw = jnp.zeros(v.shape, w.dtype) if centre else jnp.sum(w, axis=others)
        sww = jnp.ones(v.shape, w.dtype) if normalise else jnp.sum(w * w, axis=others)
        return per_row(sw, sww)

    return jax.lax.cond(fresh | jnp.any(v == 0), read, known, w)


def neuron_step(
    p: Any, g: Any, t: Any, v: Any, sigma: Any, *, axis: int, lr: Any, beta: Any, centre: bool, normalise: bool
) -> tuple[Any, Any, Any, Any]:
    """One Nero step for a neuron tensor; returns ``(new p in p's dtype, v, sigma, sums)``, ``v`` of shape
    ``(neurons,)``. ``sums`` (the gradient's per-row sums and sums of squares) are finite unless ``g`` holds NaN
    or Inf (or a row's sum of squares overflows): the caller checks them, without another pass over ``g``."""
    dtype = v.dtype
    w, grad = p.astype(dtype), g.astype(dtype)
    others = tuple(i for i in range(p.ndim) if i != axis)
    n = math.prod(p.shape[i] for i in others)
    if g.dtype == dtype and _native.applies(w, axis):  # one read of g and w (XLA would read g three times)
        sg, sgg, swg = _native.sums(grad, w, axis)
    else:
        sg, sgg, swg = (jnp.sum(x, axis=others) for x in (grad, grad * grad, w * grad))
    first = t == 0

    def per_row(sw: Any, sww: Any) -> tuple[Any, ...]:
        m = jnp.where(first, sw / n, 0) if centre else jnp.zeros_like(sw)
        centred = sww - 2 * m * sw + n * m * m
        a = jnp.where(first, _safe_reciprocal(_norm(centred)), 1) if normalise else jnp.ones_like(sw)
        s0, q0, x0 = a * (sw - n * m), a * a * centred, a * (swg - m * sg)

        if normalise:
            start = jnp.ones_like(sigma)
        else:
            mean_norm = jnp.mean(_norm(q0)) if sw.shape[0] else sigma
            start = jnp.where(mean_norm > 0, mean_norm, SIGMA_FLOOR)
        new_sigma = jnp.where(first, start, sigma).astype(dtype)

        new_v = (beta * v + (1 - beta) * sgg).astype(dtype)
        bias_correction = (1 - beta ** (t + 1).astype(dtype)).astype(dtype)
        c = lr * new_sigma * _inverse_rms(new_v, bias_correction)

        sr = s0 - c * sg
        qr = q0 - 2 * c * x0 + c * c * sgg
        mr = sr / n if centre else jnp.zeros_like(sr)
        if centre:
            qr = qr - sr * mr
        s = _safe_reciprocal(_norm(qr)) if normalise else jnp.ones_like(qr)
        # out = s (a (w - m) - c g - mr) = scale w - step g - shift
        return s * a, s * c, s * (a * m + mr), new_v, new_sigma

    scale, step, shift, v, sigma = _with_weight_sums(
        per_row, w, t <= 1, v, others, centre=centre, normalise=normalise, stored_exactly=p.dtype == dtype
    )

    def along(x: Any) -> Any:  # a per-row scalar, broadcast along the neuron axis
        return jnp.expand_dims(x, others)

    out = along(scale) * w - along(step) * grad - along(shift)
    return out.astype(p.dtype), v, sigma, jnp.concatenate([sg, sgg])
