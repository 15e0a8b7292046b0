"""Nero's step of one neuron from five sums of its old row: the per-row maths every fast path shares.

For a row ``w`` of fan-in ``n`` with gradient ``g``, state ``v`` and the tensor's scale ``sigma``, at step count
``t`` (updates taken before this one), Nero's step is::

    first update (t == 0) only:  w0 = (w - m) * a     m = mean(w) if centre,  a = 1 / |w - m| if normalise
    (later steps: w0 = w)                              (m = 0, a = 1 where off; a zero row stays zero)
    v'  = beta * v + (1 - beta) * |g|^2
    c   = lr * sigma / sqrt(v' / (1 - beta**(t + 1)))          (c = 0 where v' == 0)
    r   = w0 - c * g
    out = (r - mr) * s       mr = mean(r) if centre,  s = 1 / |r - mr| if normalise

Every mean and norm above is a function of five sums of the OLD row, ``sum(w)``, ``|w|^2``, ``sum(g)``, ``|g|^2``
and ``<w, g>``::

    |w - m|^2 = |w|^2 - m sum(w)         (m = sum(w) / n)
    sum(w0) = a (sum(w) - n m)           |w0|^2 = a^2 |w - m|^2          <w0, g> = a (<w, g> - m sum(g))
    sum(r)  = sum(w0) - c sum(g)         |r|^2 = |w0|^2 - 2 c <w0, g> + (c |g|)^2
    |r - mr|^2 = |r|^2 - sum(r) mr

so the step is one affine write per element with three factors per row,
``out = scale * w - step * g - shift``, ``scale = s a``, ``step = s c``, ``shift = s (a m + mr)``: the first
update's projection is folded into the factors, and no pass over memory is spent on it.

Where the closed form loses precision, :func:`row_factors` says so (``recompute``) and the caller computes those
rows from the actual arrays instead: a difference of sums cancels when most of the row's square norm is a common
offset (``|w - m|^2 < |w|^2 / 2`` at a centred first update: weights initialised around a large mean) or when
the step cancels most of the row (``|r - mr|^2`` under half the terms it is computed from, possible only for
steps of the order of the row's norm). Elsewhere the factors are exact to a few roundings of the row's own scale.

:func:`row_factors` is all of it, the reference every kernel is tested against; :func:`step_rate` (``v'`` and ``c``,
from the gradient's sums alone) and :func:`balance_factors` (a steady-state row's factors, given ``c``) are its two
halves, for a caller that reads the gradient before the weights.

Sigma is fixed at the first update: 1 for normalised neuron tensors (their rows have unit norm), else the mean norm
of the projected rows; a tensor whose rows are all zero (an output head initialised to zero) also gets 1, the
row norm every normalised neuron has and the one a LeCun initialisation (variance ``1/fan_in``) gives, so that it
moves by about ``lr`` per row and step as every other neuron does. Bias-like tensors keep the paper's rule, mean
``|p|`` and 0.01 where that is 0 (:func:`start_sigma`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = [
    "BIAS_SIGMA_FLOOR", "Balance", "NEURON_SIGMA_FLOOR", "RowFactors", "balance_factors", "inverse_rms", "row_factors",
    "segment_means",
    "start_sigma", "step_rate",
]

BIAS_SIGMA_FLOOR = 0.01  # sigma of a bias-like tensor that starts at zero: the paper's default
NEURON_SIGMA_FLOOR = 1.0  # sigma of a neuron tensor whose rows all start at zero: a normalised row's norm

# A difference of sums is trusted while it keeps at least this fraction of the terms it is computed from: its
# relative error is then at most a few roundings (2 / CANCELLATION ulps per term).
CANCELLATION = 0.5


class RowFactors(NamedTuple):
    """One Nero step per row: ``new_row = scale * old_row - step * grad_row - shift``.

    scale, step, shift: per-row factors of the affine write.
    v:         the new second moment per row.
    sigma:     the tensor's scale after this step, per row (or 0-d, as ``sigma`` was given).
    rate:      ``c = lr * sigma / sqrt(v_hat)`` per row: the step before the rows are balanced again.
    recompute: per-row bool, True where the closed form cancels (see the module docstring): compute these rows
               from the actual arrays, not from the factors.
    """

    scale: Any
    step: Any
    shift: Any
    v: Any
    sigma: Any
    rate: Any
    recompute: Any


def inverse_rms(v: Any, bias_correction: Any, xp: Any) -> Any:
    """``1 / sqrt(v / bias_correction)`` where ``v > 0``, else 0: the 0/0 guard, without eps.

    The form matters: ``sqrt(bias_correction / v)`` overflows float32 for a subnormal ``v`` (a neuron whose
    gradients died out; GPUs keep subnormals), and ``0 * inf`` would then write NaN into its row.
    """
    positive = v > 0
    safe = xp.where(positive, v, xp.ones_like(v))
    return xp.where(positive, 1 / xp.sqrt(safe / bias_correction), xp.zeros_like(v))


def start_sigma(mean_magnitude: Any, *, neuron: bool, xp: Any) -> Any:
    """A tensor's sigma from its initial mean row norm (neuron tensors) or mean ``|p|`` (bias-like), where it is 0:
    :data:`NEURON_SIGMA_FLOOR` or :data:`BIAS_SIGMA_FLOOR`."""
    floor = NEURON_SIGMA_FLOOR if neuron else BIAS_SIGMA_FLOOR
    return xp.where(mean_magnitude > 0, mean_magnitude, xp.full_like(mean_magnitude, floor))


def _safe_rsqrt(x: Any, xp: Any) -> Any:
    """``1 / sqrt(x)`` where ``x > 0``, else 1 (a zero row stays zero); an expanded square rounding below 0 is 0."""
    positive = x > 0
    return xp.where(positive, 1 / xp.sqrt(xp.where(positive, x, xp.ones_like(x))), xp.ones_like(x))


def segment_means(x: Any, segments: Sequence[int] | None, xp: Any) -> Any:
    """The mean of ``x`` over all rows (0-d), or per segment of consecutive rows, broadcast back to its rows."""
    if segments is None:
        return xp.mean(x)
    parts, start = [], 0
    for rows in segments:
        part = x[start:start + rows]
        parts.append(xp.broadcast_to(xp.mean(part), (rows,)) if rows else part)
        start += rows
    return xp.concat(parts) if len(parts) > 1 else parts[0]


def step_rate(sgg: Any, v: Any, sigma: Any, count: Any, *, lr: Any, beta: Any, xp: Any) -> tuple[Any, Any]:
    """The second moment after this step and the step per unit of gradient, per row (or element):
    ``v' = beta v + (1 - beta) |g|^2`` and ``c = lr * sigma / sqrt(v' / (1 - beta**(count + 1)))``, 0 where
    ``v' == 0``, both in the dtype of ``v``. A negative ``lr`` ascends."""
    dtype = v.dtype
    v = xp.astype(beta * v + (1 - beta) * sgg, dtype, copy=False)
    bias_correction = xp.astype(1 - beta ** xp.astype(count + 1, dtype), dtype, copy=False)
    return v, xp.astype(lr * sigma * inverse_rms(v, bias_correction, xp), dtype, copy=False)


class Balance(NamedTuple):
    """``balanced(w - c g) = scale * w - step * g - shift`` per row, and where that form cancels."""

    scale: Any
    step: Any
    shift: Any
    recompute: Any


def balance_factors(
    sw: Any, sww: Any, sg: Any, sgg: Any, swg: Any, rate: Any, *, fan_in: Any, centre: bool, normalise: bool, xp: Any
) -> Balance:
    """The factors of ``balanced(w - c g)`` (centred if ``centre``, normalised if ``normalise``) from the row sums
    of ``w`` and ``g`` (as in :func:`row_factors`) and the step ``c = rate`` per row: the steady-state step, where
    ``w`` needs no projection. ``recompute`` flags the rows whose ``|r - mean(r)|^2`` keeps less than half the
    terms it is computed from."""
    n = fan_in
    cg = rate * xp.sqrt(sgg)  # c|g|, squared below: c*c*|g|^2 overflows for tiny gradients (c ~ lr / |g|)
    sr = sw - rate * sg
    square = sww - 2 * rate * swg + cg * cg  # |r|^2
    mean = sr / n if centre else xp.zeros_like(sr)
    if centre:
        square = square - sr * mean
    if not normalise:
        return Balance(xp.ones_like(sr), rate, mean, xp.zeros_like(sr, dtype=xp.bool))
    s = _safe_rsqrt(square, xp)
    return Balance(s, s * rate, s * mean, square < CANCELLATION * (sww + cg * cg))


def row_factors(
    sw: Any, sww: Any, sg: Any, sgg: Any, swg: Any, v: Any, sigma: Any, count: Any, *,
    fan_in: Any, lr: Any, beta: Any, centre: bool, normalise: bool, segments: Sequence[int] | None = None, xp: Any,
) -> RowFactors:
    """Nero's per-row factors from the row sums of the OLD row: ``new = scale * w - step * g - shift``.

    Args:
        sw, sww, sg, sgg, swg: per row (shape ``(rows,)``, the state's dtype): ``sum(w)``, ``|w|^2``, ``sum(g)``,
            ``|g|^2`` and ``<w, g>`` of the weights as stored before this step and their gradient.
        v: per row, the second moment before this step.
        sigma: the tensor's scale before this step (ignored at the first update, which fixes it): 0-d, or per row.
        count: updates taken before this one (0 at the first update, which projects the rows and fixes sigma);
            0-d, or per row.
        fan_in: the row length ``n``: a number, or per row.
        lr, beta: the step size (a number or 0-d array; negative to ascend) and the second moment's decay.
        centre, normalise: the tensor's constraints.
        segments: when the rows belong to several tensors, their row counts in order: sigma's first value is then
            taken per tensor. None: one tensor.
        xp: the array namespace.

    Returns:
        :class:`RowFactors`, in the dtype of ``v``. Where ``recompute`` is True the factors have lost precision to
        cancellation and the row must be computed from the actual arrays; there, and only there, they are not to
        be used.
    """
    n = fan_in
    first = count == 0
    zero = xp.zeros_like(sw)
    # The first update's projection, as per-row factors: w0 = (w - m) * a.
    m = xp.where(first, sw / n, zero) if centre else zero
    centred = sww - m * sw  # |w - m|^2
    a = xp.where(first, _safe_rsqrt(centred, xp), xp.ones_like(sw)) if normalise else xp.ones_like(sw)
    s0, q0, x0 = a * (sw - n * m), a * a * xp.maximum(centred, zero), a * (swg - m * sg)
    if sw.shape[0]:  # (a tensor with no rows keeps its sigma)
        if normalise:
            start = xp.ones_like(segment_means(sw, segments, xp))
        else:
            start = start_sigma(segment_means(xp.sqrt(q0), segments, xp), neuron=True, xp=xp)
        sigma = xp.where(first, start, sigma)
    v, c = step_rate(sgg, v, sigma, count, lr=lr, beta=beta, xp=xp)
    b = balance_factors(s0, q0, sg, sgg, x0, c, fan_in=n, centre=centre, normalise=normalise, xp=xp)
    recompute = b.recompute
    if centre:  # |w - m|^2 from |w|^2 cancels when the rows share a large offset
        recompute = xp.logical_or(recompute, xp.logical_and(first, centred < CANCELLATION * sww))
    # balanced(w0 - c g) with w0 = a (w - m): scale a, shift a m more.
    return RowFactors(b.scale * a, b.step, b.scale * a * m + b.shift, v, sigma, c, recompute)
