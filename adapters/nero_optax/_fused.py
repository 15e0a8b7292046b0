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

__all__ = ["neuron_steps"]

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


def _weight_sums(w: Any, others: tuple[int, ...]) -> tuple[Any, Any]:
    return jnp.sum(w, axis=others), jnp.sum(w * w, axis=others)


def neuron_steps(
    ps: list, gs: list, t: Any, vs: list, sigmas: list, *, axes: list[int], lr: Any, beta: Any, centre: bool,
    normalise: bool,
) -> tuple[list, list, list, Any]:
    """One Nero step for neuron tensors whose state shares a dtype; returns ``(new ps in their dtypes, vs, sigmas,
    sums)``, each ``v`` of shape ``(neurons,)``. ``sums`` (every gradient row's sum and sum of squares) is finite
    unless a gradient holds NaN or Inf (or a row's sum of squares overflows): the caller checks it, without
    another pass over the gradients.

    The per-row maths runs once over all the tensors' rows (their sums concatenated), not tensor by tensor:
    on CPU a few dozen small XLA operations per tensor, run one after another between the sums and the final
    pass, cost about a millisecond a step. It runs under one ``lax.cond``, so its results (three factors per row)
    are materialised once: computed outside, XLA would fuse their maths into the elementwise pass that consumes
    them and redo it for every element.

    The weights' row sums ``sum(w)`` and ``|w|^2`` are read from memory only when they are not known already.
    After its first update every row this kernel wrote is balanced: zero-mean if ``centre``, unit-norm if
    ``normalise``. The exceptions, where a tensor's rows are read (under its own ``lax.cond``, so other steps skip
    the reads): ``fresh``, the first two steps (the first update, as ``p + (new - p)``, is exact only to the
    rounding of the initial weights' magnitude, which may be far from a unit row's); a row still zero from a zero
    projection, whose ``v`` is 0 (it never had a gradient); and rows stored in a narrower dtype than the maths
    (bf16, fp16), balanced only to its rounding, which trusted sums would let random-walk (3.5% in bf16 row norms
    after 3000 steps), so they are read at every step.
    """
    dtype = vs[0].dtype
    ws = [p.astype(dtype) for p in ps]
    grads = [g.astype(dtype) for g in gs]
    others = [tuple(i for i in range(p.ndim) if i != axis) for p, axis in zip(ps, axes)]
    fan_in = [math.prod(p.shape[i] for i in o) for p, o in zip(ps, others)]
    rows = [v.shape[0] for v in vs]
    sums: list[tuple[Any, ...]] = []
    for g, w, p, axis, o in zip(grads, ws, gs, axes, others):
        if p.dtype == dtype and _native.applies(w, axis):  # one read of g and w (XLA would read g three times)
            sums.append(_native.sums(g, w, axis))
        else:
            sums.append(tuple(jnp.sum(x, axis=o) for x in (g, g * g, w * g)))

    def cat(parts: list) -> Any:
        return jnp.concatenate(parts) if len(parts) > 1 else parts[0]

    sg, sgg, swg = (cat([x[k] for x in sums]) for k in range(3))
    v = cat(list(vs))
    n = cat([jnp.full((r,), f, dtype) for r, f in zip(rows, fan_in)])
    first = t == 0
    fresh = t <= 1
    trusted = centre or normalise
    exact = [trusted and p.dtype == dtype for p in ps]  # tensors whose balanced row sums may be taken as known

    def known(i: int) -> tuple[Any, Any]:
        sw = jnp.zeros((rows[i],), dtype) if centre else jnp.sum(ws[i], axis=others[i])
        sww = jnp.ones((rows[i],), dtype) if normalise else jnp.sum(ws[i] * ws[i], axis=others[i])
        return sw, sww

    def per_row(read: bool) -> tuple[Any, ...]:
        parts = []
        for i in range(len(ps)):
            if not exact[i]:
                parts.append(_weight_sums(ws[i], others[i]))
            elif read:
                parts.append(jax.lax.cond(
                    fresh | jnp.any(vs[i] == 0), lambda w, o=others[i]: _weight_sums(w, o),
                    lambda w, i=i: known(i), ws[i],
                ))
            else:
                parts.append(known(i))
        sw, sww = cat([x[0] for x in parts]), cat([x[1] for x in parts])
        m = jnp.where(first, sw / n, 0) if centre else jnp.zeros_like(sw)
        centred = sww - 2 * m * sw + n * m * m
        a = jnp.where(first, _safe_reciprocal(_norm(centred)), 1) if normalise else jnp.ones_like(sw)
        s0, q0, x0 = a * (sw - n * m), a * a * centred, a * (swg - m * sg)

        if normalise:
            new_sigmas = [jnp.where(first, jnp.ones_like(x), x).astype(dtype) for x in sigmas]
        else:  # each tensor's sigma starts at the mean norm of its (projected) rows
            new_sigmas, start = [], 0
            for r, x in zip(rows, sigmas):
                mean_norm = jnp.mean(_norm(q0[start:start + r])) if r else x
                new_sigmas.append(jnp.where(first, jnp.where(mean_norm > 0, mean_norm, SIGMA_FLOOR), x).astype(dtype))
                start += r
        sigma = cat([jnp.broadcast_to(x, (r,)) for x, r in zip(new_sigmas, rows)])

        new_v = (beta * v + (1 - beta) * sgg).astype(dtype)
        bias_correction = (1 - beta ** (t + 1).astype(dtype)).astype(dtype)
        c = lr * sigma * _inverse_rms(new_v, bias_correction)

        sr = s0 - c * sg
        qr = q0 - 2 * c * x0 + c * c * sgg
        mr = sr / n if centre else jnp.zeros_like(sr)
        if centre:
            qr = qr - sr * mr
        s = _safe_reciprocal(_norm(qr)) if normalise else jnp.ones_like(qr)
        # out = s (a (w - m) - c g - mr) = scale w - step g - shift
        return s * a, s * c, s * (a * m + mr), new_v, new_sigmas

    # Rows are read in the first branch only: in the common case (no tensor fresh or with a zero v) the second
    # runs, with every tensor's row sums known. Where no tensor's sums can be known, both branches are the same
    # (the cond still keeps the per-row factors materialised).
    any_read = jnp.any(jnp.asarray([fresh | jnp.any(x == 0) for x, e in zip(vs, exact) if e])) if any(exact) else t >= 0
    scale, step, shift, v, new_sigmas = jax.lax.cond(any_read, lambda: per_row(True), lambda: per_row(False))

    new_ps, new_vs, start = [], [], 0
    for p, w, g, o, r in zip(ps, ws, grads, others, rows):
        def along(x: Any) -> Any:  # this tensor's per-row factors, broadcast along its neuron axis
            return jnp.expand_dims(x[start:start + r], o)

        out = along(scale) * w - along(step) * g - along(shift)
        new_ps.append(out.astype(p.dtype))
        new_vs.append(v[start:start + r])
        start += r
    return new_ps, new_vs, list(new_sigmas), cat([sg, sgg])
