"""A check that Nero's updates reach the parameters as Nero made them: ``optax.chain(nero, clip)`` is the wrong order.

What Nero's update receives cannot tell whether the gradients were transformed before it (``chain(clip, nero)`` is
right, and undetectable in general, since any array may be a gradient). What a transformation *after* Nero does
shows in the parameters: Nero's first update leaves every constrained neuron balanced (zero-mean, unit-norm rows,
exactly to rounding, whatever the gradient), and a later ``clip_by_global_norm``, ``scale`` or schedule changes
that update, so at Nero's second update the rows are off balance. The check runs at that update only, inside a
``lax.cond`` (one more read of the constrained weights, once), and warns through ``jax.debug.callback``.

Not caught: an update scaled after Nero where the parameters started balanced (the first update then moves rows by
about ``lr`` radians, and a rescaled turn of a unit row stays within rounding of unit norm to first order), and
anything done after the second update.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nero_core._audit import warn_from_user_code

__all__ = ["check_balanced_after_first_update"]


def _tolerance(dtype: Any) -> float:
    """How far from balanced a row stored in ``dtype`` may be from rounding alone (float32: 1e-3; bfloat16: 0.06)."""
    return max(1e-3, 8 * float(jnp.finfo(dtype).eps))


def _off_balance(p: Any, axis: int, *, centre: bool, normalise: bool) -> Any:
    """The largest departure of a row of ``p`` from balanced: ``| |w|^2 - 1 |`` (zero rows allowed), and the row
    mean relative to the row's rms."""
    # Reductions over the other axes, not a reshape to rows: under explicit sharding jax refuses a reshape that
    # merges a sharded axis (a conv kernel sharded on its input channels) unless told the output's sharding.
    others = tuple(i for i in range(p.ndim) if i != axis)
    x = p.astype(jnp.float32)
    squares = jnp.sum(x * x, axis=others)
    worst = jnp.zeros((), jnp.float32)
    if normalise:
        worst = jnp.maximum(worst, jnp.max(jnp.where(squares > 0, jnp.abs(squares - 1), 0.0)))
    if centre:
        n = p.size // p.shape[axis]
        rms = jnp.sqrt(jnp.maximum(squares / n, jnp.finfo(jnp.float32).tiny))
        worst = jnp.maximum(worst, jnp.max(jnp.abs(jnp.mean(x, axis=others)) / rms))
    return worst


def check_balanced_after_first_update(
    ps: Sequence[Any], axes: Sequence[int | None], count: Any, names: Sequence[str], *, centre: bool, normalise: bool
) -> None:
    """At Nero's second update (``count == 1``), warn when a constrained neuron tensor is not balanced."""
    if not (centre or normalise):
        return
    checked = [(p, a, n) for p, a, n in zip(ps, axes, names) if a is not None and p.size]
    if not checked:
        return

    def check() -> None:
        off = [_off_balance(p, a, centre=centre, normalise=normalise) for p, a, _ in checked]
        bad = jnp.stack([o > _tolerance(p.dtype) for o, (p, _, _) in zip(off, checked)])
        jax.debug.callback(functools.partial(_report, names=[n for _, _, n in checked]), bad, jnp.stack(off))

    jax.lax.cond(count == 1, check, lambda: None)


def _report(bad: Any, off: Any, *, names: list[str]) -> None:
    flagged = [f"{n} (off by {float(o):.2g})" for n, o, b in zip(names, off, bad) if b]
    if flagged:
        shown = ", ".join(flagged[:4]) + (f" and {len(flagged) - 4} more" if len(flagged) > 4 else "")
        warn_from_user_code(
            f"nero_optax.nero: after its first update, the neurons of {shown} are not balanced (zero-mean, unit-norm "
            "rows), as that update left them: something changed Nero's updates before they reached the parameters, "
            "such as a transformation after nero in optax.chain (clipping, scaling, a schedule). Put nero last, "
            "e.g. optax.chain(optax.clip_by_global_norm(1.0), nero_optax.nero()), and give a schedule as "
            "nero_optax.nero(learning_rate=schedule)",
            ("jax", "jaxlib", "optax", "flax", "nero_optax"),
        )
