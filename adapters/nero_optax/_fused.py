"""Nero's neuron-tensor step in JAX from per-row sums: reductions, then one read-and-write pass.

For each neuron (a row ``w`` of fan-in ``n``, gradient ``g``) the step needs five sums of the OLD row, ``sum(w)``,
``|w|^2``, ``sum(g)``, ``|g|^2`` and ``<w, g>``: one read of ``g`` and ``w`` with the CPU custom call of ``_native``
(XLA alone runs each reduction as its own pass). nero_core's :func:`~nero_core._closed_form.row_factors` turns them
into three factors per row, the first update's projection and sigma folded in, and one more pass over ``w`` and
``g`` writes ``out = scale * w - step * g - shift``. The weights' sums are read at every step, never assumed from
the last step's balance: rounding would otherwise random-walk the rows' norms away from 1 (5e-5 in float32 over
tens of thousands of steps; 3.5% in bf16 storage after 3000). Sums run over every axis but the neuron axis in
place: no transpose, whatever the layout.

Everything between the sums and the write is nero_core's :func:`~nero_core._nero.neuron_factors`, the core rule's
own phase one: where the closed form would cancel in some row (weights that start around a large common offset, a
step of the order of a row's norm), it takes that step's factors from the actual arrays instead, under a
``lax.cond`` that other steps skip; the write is then ``scale * (w - offset) - step * g - shift``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from nero_core._nero import neuron_factors
from nero_core._neurons import neuron_sums

from . import _native

__all__ = ["neuron_steps"]


def neuron_steps(
    ps: list, gs: list, t: Any, vs: list, sigmas: list, *, axes: list[int], lr: Any, beta: Any, centre: bool,
    normalise: bool,
) -> tuple[list, list, list, Any]:
    """One Nero step for neuron tensors whose state shares a dtype; returns ``(new ps in their dtypes, vs, sigmas,
    sums)``, each ``v`` of shape ``(neurons,)``. ``sums`` (every gradient row's sum and sum of squares) is finite
    unless a gradient holds NaN or Inf (or a row's sum of squares overflows): the caller checks it, without
    another pass over the gradients.

    The per-row factors come out of a ``lax.cond`` (their choice between the closed form and the arrays), so XLA
    materialises them once: computed in the final pass, their maths would be fused into it and redone for every
    element.
    """
    dtype = vs[0].dtype
    ws = [p.astype(dtype) for p in ps]
    grads = [g.astype(dtype) for g in gs]
    sums = [
        _native.sums(g, w, axis) if p.dtype == dtype and _native.applies(w, axis) else neuron_sums(w, g, axis, jnp)
        for g, w, p, axis in zip(grads, ws, gs, axes)  # the custom call reads g and w once (XLA: each three times)
    ]
    n = len(ps)
    found = neuron_factors(
        ws, grads, [t] * n, vs, sigmas, [lr] * n, axes=axes, beta=beta, centre=centre, normalise=normalise, xp=jnp,
        sums=sums,
    )
    new_ps = []
    for p, w, g, axis, f in zip(ps, ws, grads, axes, found):
        def along(x: Any) -> Any:  # per-row factors, broadcast along the neuron axis
            return jnp.expand_dims(x, tuple(i for i in range(p.ndim) if i != axis))

        x = w if f.offset is None else w - along(f.offset)  # (no offset: the factors took the closed form)
        new_ps.append((along(f.scale) * x - along(f.step) * g - along(f.shift)).astype(p.dtype))
    checks = jnp.concatenate([x for s in sums for x in s[2:4]]) if sums else jnp.zeros((0,), dtype)
    return new_ps, [f.v for f in found], [f.sigma for f in found], checks
