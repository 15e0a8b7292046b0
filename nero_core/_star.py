"""STAR, the stabilised learned optimizer (Harrison, Metz & Sohl-Dickstein, NeurIPS 2022), as a pure array-API rule.

Per element of each tensor, with accumulators updated from the gradient ``g`` first (no bias correction):

* momenta ``m_i = b_i*m_i + (1-b_i)*g``, ``b = (0.9, 0.99, 0.999)``; second moment ``v = 0.999*v + 0.001*g*g``;
* Adafactor accumulators at ``(0.9, 0.99, 0.999)`` of ``g*g + 1e-30``: for ``ndim >= 2`` a row accumulator (the mean
  over the largest axis ``d0``) and a column accumulator (the mean over the second largest ``d1``); a full,
  elementwise one for ``ndim <= 1``. The Adafactor-normalised gradient is ``g * rowfac * colfac`` with
  ``rowfac = rsqrt(max(row / (mean_d1(row) + 1e-9), 1e-9))``, ``colfac = rsqrt(max(col, 1e-9))``
  (``g * rsqrt(max(full + 1e-9, 1e-9))`` unfactored);
* 28 feature channels: ``g, p, m_1..3, v, m_i*rsqrt(v+1e-6), rsqrt(v+1e-6), adafactor g_1..3, row_1..3, col_1..3,
  rsqrt(row_i+1e-8), rsqrt(col_i+1e-8), m_i*rowfac_i*colfac_i`` (unfactored: row = col = full and the last is
  ``m_i*rsqrt(full_i+1e-6)``), each divided by ``sqrt(mean over the tensor of its square + 1e-5)``, then 11 time
  features ``tanh(t/tau - 1)``, ``tau in (1, 3, 10, ..., 1e5)``, with ``t`` the number of updates taken before;
* an MLP ``39 -> 4 -> 4 -> 4`` (ReLU) gives per element the direction ``d``, magnitude ``mu``, nominal magnitude
  ``nu`` and regularisation ``rho``. With the nominal (AdamAggMo) direction ``a = mean_i(m_i) * rsqrt(v+1e-6)``,
  ``|a|_rms`` its root mean square over the tensor and ``e(x) = exp(clip(1e-3*x, -1, 1))``, the update is
  ``p <- r*p - s - n`` with
  ``s = step_mult * |a|_rms * tanh(d) * e(mu)`` (the learned step),
  ``n = nominal_stepsize * e(nu) * a`` (the nominal step) and ``r = 1 - weight_decay * e(rho)``.

The learned step is bounded relative to the nominal one: per element ``|s| <= e * step_mult * |a|_rms``, so per
tensor ``rms(s) <= e**2 * (step_mult / nominal_stepsize) * rms(n)``, at every step and whatever the gradients'
scale. (The paper's ``MLPNomLOpt`` takes ``s = step_mult * d * exp(1e-3*mu)``, optionally times ``rsqrt(v+1e-6)``;
with ``v`` far below ``1e-6``, as for the small gradients of a deep network, that factor is about 1000 and the
learned step swamps the nominal one: see docs/algorithms/star.md.) With the MLP's output layer at zero the rule is
exactly AdamAggMo with decoupled weight decay. The Adafactor details the design leaves open (the ``1e-30``, ``1e-9``
guards, which axes are "row" and "column", ties between equal axes broken towards the later axis) follow
``learned_optimization``'s ``MLPNomLOpt``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, NamedTuple

import numpy as np

from ._base import Optimizer, check_gradients, check_hyperparameter, check_params, compute_dtype, device_of
from ._base import namespace_of
from ._base import zeros_beside
from ._branch import blas_flags_quiet

__all__ = ["StarState", "factored_axes", "load_star_config", "load_star_params", "star"]

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAY = 0.999
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
EXP_MULT = 1e-3
MAX_LOG_SCALE = 1.0  # the learned log-scales 1e-3*(mu, nu, rho) are clipped to [-1, 1]
NUM_FEATURES = 28 + len(TIMESCALES)
NUM_OUTPUTS = 4  # direction, magnitude, nominal magnitude, regularisation
MLP_KEYS = ("w1", "b1", "w2", "b2", "w3", "b3")
DEFAULT_PARAMS = "star_v2"  # (docs/algorithms/star.md: its held-out suite and record)


class StarState(NamedTuple):
    """STAR's state; every tuple has one entry per parameter tensor, in the compute dtype (float32 for half).

    count:   0-d int32, updates taken so far (skipped steps excluded); the time features read it.
    m:       shape ``(3, *p.shape)``, momenta at decays 0.9, 0.99, 0.999.
    v:       the parameter's shape, second moment at decay 0.999.
    fac_row: ``(3, *p.shape without axis d0)``; for ``ndim <= 1`` the full accumulator ``(3, *p.shape)``.
    fac_col: ``(3, *p.shape without axis d1)``; for ``ndim <= 1`` empty, ``(3, 0)``.
    skipped: 0-d int32, updates skipped because a gradient was not finite.
    """

    count: Any
    m: tuple[Any, ...]
    v: tuple[Any, ...]
    fac_row: tuple[Any, ...]
    fac_col: tuple[Any, ...]
    skipped: Any


def factored_axes(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(d1, d0)``: the second largest and the largest axis (ties go to the later axis), or None for ``ndim <= 1``."""
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    return order[-2], order[-1]


def _accumulator_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    axes = factored_axes(shape)
    if axes is None:
        return (3, *shape), (3, 0)
    d1, d0 = axes
    row = tuple(n for i, n in enumerate(shape) if i != d0)
    col = tuple(n for i, n in enumerate(shape) if i != d1)
    return (3, *row), (3, *col)


def load_star_params(name: str = DEFAULT_PARAMS) -> dict[str, np.ndarray]:
    """The shipped meta-parameters ``nero_core/data/<name>.npz`` as float64 NumPy arrays (keys w1, b1, ..., b3)."""
    ref = resources.files("nero_core").joinpath("data", f"{name}.npz")
    if not ref.is_file():
        raise FileNotFoundError(f"no shipped STAR meta-parameters called {name!r} (looked for {ref})")
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k], dtype=np.float64) for k in MLP_KEYS}


def load_star_config(name: str = DEFAULT_PARAMS) -> dict[str, Any]:
    """The JSON record (command, configuration, hyperparameters) shipped beside ``<name>.npz``."""
    ref = resources.files("nero_core").joinpath("data", f"{name}.json")
    return json.loads(ref.read_text())


def _check_meta_params(meta: Mapping[str, Any]) -> None:
    missing = [k for k in MLP_KEYS if k not in meta]
    if missing:
        raise ValueError(f"meta_params is missing {missing}; it needs {list(MLP_KEYS)}")
    shapes = {k: tuple(meta[k].shape) if hasattr(meta[k], "shape") else np.shape(meta[k]) for k in MLP_KEYS}
    width_in = NUM_FEATURES
    for layer in ("1", "2", "3"):
        w, b = shapes["w" + layer], shapes["b" + layer]
        if len(w) != 2 or w[0] != width_in or b != (w[1],):
            raise ValueError(f"meta_params w{layer} {w} / b{layer} {b} do not continue a layer of width {width_in}")
        width_in = w[1]
    if width_in != NUM_OUTPUTS:
        raise ValueError(f"the MLP must end in {NUM_OUTPUTS} outputs, got {width_in}")


def _meta_arrays(meta: Mapping[str, Any], xp: Any, dtype: Any, like: Any) -> dict[str, Any]:
    """The MLP weights in ``xp`` and ``dtype`` on ``like``'s device (NumPy input converted, arrays of ``xp`` kept)."""
    np_dtype = np.float64 if dtype == xp.float64 else np.float32
    out = {}
    for k in MLP_KEYS:
        a = meta[k]
        if isinstance(a, (np.ndarray, np.generic, list, tuple, float, int)):
            a = xp.asarray(np.asarray(a, dtype=np_dtype), device=device_of(like))
        out[k] = xp.astype(a, dtype, copy=False)
    return out


def _column(values: Sequence[float], xp: Any, dtype: Any, ndim: int, like: Any) -> Any:
    """``values`` as an array of shape ``(len, 1, ..., 1)`` broadcasting against a leading decay axis."""
    np_dtype = np.float64 if dtype == xp.float64 else np.float32
    arr = xp.asarray(np.asarray(values, dtype=np_dtype), device=device_of(like))
    return xp.reshape(arr, (len(values),) + (1,) * ndim)


def _rsqrt(x: Any, xp: Any) -> Any:
    return 1 / xp.sqrt(x)  # not x**-0.5: XLA's CPU power is four times slower


def _safe_rsqrt(x: Any, xp: Any) -> Any:
    return 1 / xp.sqrt(xp.maximum(x, xp.full_like(x, 1e-9)))


def _adafactor_accumulate(g: Any, row: Any, col: Any, xp: Any) -> tuple[Any, Any]:
    """The Adafactor accumulators after gradient ``g``: row and column means of ``g*g + 1e-30`` (or the full,
    elementwise, accumulator with ``col`` untouched for ``ndim <= 1``), each at the three decays."""
    shape = tuple(g.shape)
    axes = factored_axes(shape)
    if axes is None:
        decays = _column(ADAFACTOR_DECAYS, xp, g.dtype, len(shape), g)
        return decays * row + (1 - decays) * xp.expand_dims(g * g + 1e-30, axis=0), col
    decays = _column(ADAFACTOR_DECAYS, xp, g.dtype, len(shape) - 1, g)

    def mean_square(axis: int) -> Any:  # mean(g*g + 1e-30) over one axis, without a g*g temporary
        return xp.linalg.vector_norm(g, axis=axis) ** 2 / shape[axis] + 1e-30

    d1, d0 = axes
    row = decays * row + (1 - decays) * xp.expand_dims(mean_square(d0), axis=0)
    col = decays * col + (1 - decays) * xp.expand_dims(mean_square(d1), axis=0)
    return row, col


def _adafactor_factors(row: Any, col: Any, shape: tuple[int, ...], xp: Any) -> tuple[Any, ...]:
    """From the Adafactor accumulators: the factors whose product scales ``g`` (``(rowfac, colfac)``, each
    broadcasting against ``(3, *shape)``, or one full factor unfactored), the row and column feature channels
    (broadcasting likewise), and the factors that scale the momenta."""
    axes = factored_axes(shape)
    if axes is None:
        return (_safe_rsqrt(row + 1e-9, xp),), row, row, (_rsqrt(row + 1e-6, xp),)
    d1, d0 = axes
    d1_in_row = 1 + (d1 - 1 if d1 > d0 else d1)
    row_mean = xp.mean(row, axis=d1_in_row, keepdims=True)
    rowfac = xp.expand_dims(_safe_rsqrt(row / (row_mean + 1e-9), xp), axis=d0 + 1)
    colfac = xp.expand_dims(_safe_rsqrt(col, xp), axis=d1 + 1)
    factors = (rowfac, colfac)
    return factors, xp.expand_dims(row, axis=d0 + 1), xp.expand_dims(col, axis=d1 + 1), factors


# Rows of the MLP's first layer, by feature channel (the order of the module docstring's list).
_ELEMENT_ROWS = (*range(0, 13), 25, 26, 27)  # g, p, m, v, m*rsqrt(v), rsqrt(v), adafactor g, m*rowfac*colfac
_ROW_ROWS = (*range(13, 16), *range(19, 22))  # the row accumulators and their inverse square roots
_COL_ROWS = (*range(16, 19), *range(22, 25))  # the same for the columns


def _square_sums(arrays: Sequence[tuple[Any, int]], xp: Any) -> Any:
    """Sums of squares, one per row of each ``(array, rows)`` with the array viewed as ``(rows, -1)``."""
    return xp.concat([xp.linalg.vector_norm(xp.reshape(a, (rows, -1)), axis=1) for a, rows in arrays]) ** 2


def _scaled_rows(w1: Any, rows: tuple[int, ...], mean_squares: Any, xp: Any) -> Any:
    """``w1``'s rows for these channels, each divided by its channel's root mean square (the normalisation)."""
    picked = xp.take(w1, xp.asarray(rows, device=device_of(w1)), axis=0)
    return picked / xp.sqrt(mean_squares + 1e-5)[:, None]


def _derived_channels(g: Any, m: Any, v: Any, scale: Sequence[Any], mom_scale: Sequence[Any],
                      xp: Any) -> tuple[Any, ...]:
    """The per-element channels computed from the accumulators: ``m*rsqrt(v+1e-6)`` ``(3, ...)``,
    ``rsqrt(v+1e-6)``, ``g*rowfac*colfac`` and ``m*rowfac*colfac`` ``(3, ...)`` (the products of the factors in
    ``scale`` and ``mom_scale``); and the nominal (AdamAggMo) direction ``mean_i(m_i) * rsqrt(v + 1e-6)``."""
    rsqrt_v = _rsqrt(v + 1e-6, xp)
    adam = m * rsqrt_v
    factor = _product(scale)
    mom_factor = factor if mom_scale is scale else _product(mom_scale)
    direction = (adam[0, ...] + adam[1, ...] + adam[2, ...]) / 3  # not a mean over axis 0: 20x slower in XLA on CPU
    return adam, rsqrt_v, xp.expand_dims(g, axis=0) * factor, m * mom_factor, direction


def _product(factors: Sequence[Any]) -> Any:
    out = factors[0]
    for f in factors[1:]:
        out = out * f
    return out


def _factored_part(channels: Any, rows: tuple[int, ...], w1: Any, xp: Any) -> Any:
    """The first layer's share ``(4, *channels.shape[1:])`` from channels that are constant along an axis (rows or
    columns of the Adafactor accumulators), computed at their own, smaller, shape. A broadcast channel's mean square
    over the tensor is its mean square over its own elements."""
    flat = xp.reshape(channels, (channels.shape[0], -1))
    mean_squares = _square_sums([(flat, flat.shape[0])], xp) / flat.shape[1]
    part = xp.matmul(xp.matrix_transpose(_scaled_rows(w1, rows, mean_squares, xp)), flat)
    return xp.reshape(part, (NUM_OUTPUTS, *channels.shape[1:]))


def _log_scale(a: Any, xp: Any) -> Any:
    """``exp(clip(1e-3 * a, -1, 1))``: a learned scale, kept within a factor e either way."""
    return xp.exp(xp.clip(EXP_MULT * a, min=-MAX_LOG_SCALE, max=MAX_LOG_SCALE))


def _block_rows(shape: tuple[int, ...], block_size: int | None) -> list[tuple[int, int]] | None:
    """Ranges of axis 0 holding about ``block_size`` elements each, or None for the whole tensor at once."""
    size = math.prod(shape)
    if block_size is None or not shape or size <= block_size:
        return None
    rows = max(1, block_size // (size // shape[0]))
    return [(i, min(i + rows, shape[0])) for i in range(0, shape[0], rows)]


def _rows_of(a: Any, lead: int, block: tuple[int, int] | None) -> Any:
    """Axis ``lead`` of ``a`` (the tensor's axis 0 after ``lead`` leading axes) cut to ``block``; an axis of
    length 1 (broadcast) is kept whole."""
    if block is None or a.shape[lead] == 1:
        return a
    index = (slice(None),) * lead + (slice(*block), ...)
    return a[index]


def _moments(g: Any, m: Any, v: Any, xp: Any) -> tuple[Any, Any]:
    """The momenta ``(3, *shape)`` and the second moment after gradient ``g``."""
    decays = _column(MOMENTUM_DECAYS, xp, v.dtype, g.ndim, v)
    return decays * m + (1 - decays) * xp.expand_dims(g, axis=0), RMS_DECAY * v + (1 - RMS_DECAY) * (g * g)


def _update_tensor(p, g, t, m, v, row, col, w, *, step_mult, nominal_stepsize, weight_decay, block_size, xp):
    """One tensor's update: the new parameter (in the compute dtype) and accumulators."""
    grad = xp.astype(g, v.dtype, copy=False)
    m, v = _moments(grad, m, v, xp)
    row, col = _adafactor_accumulate(grad, row, col, xp)
    x = _step(p, grad, t, m, v, row, col, w, step_mult=step_mult, nominal_stepsize=nominal_stepsize,
              weight_decay=weight_decay, block_size=block_size, xp=xp)
    return x, m, v, row, col


def _step(p, grad, t, m, v, row, col, w, *, step_mult, nominal_stepsize, weight_decay, block_size, xp):
    """The new parameter from the accumulators already updated with ``grad`` (in ``v``'s dtype).

    Two passes over the tensor: the mean squares of the channels (the normalisation), then the MLP and the update.
    With ``block_size`` each pass runs over blocks of rows and the MLP's layers are matrix products over stacked
    channels (few, large kernels: what an eager backend runs fast); without, each tensor runs whole and the layers
    are written as sums of products per element (what a compiler fuses into one loop: ``jax.jit``).
    """
    shape = tuple(p.shape)
    x = xp.astype(p, v.dtype, copy=False)
    scale, row_f, col_f, mom_scale = _adafactor_factors(row, col, shape, xp)

    def channels(block):  # the 16 per-element channels (of the block) and the nominal direction
        factors = [_rows_of(f, 1, block) for f in scale]
        mom_factors = factors if mom_scale is scale else [_rows_of(f, 1, block) for f in mom_scale]
        gb, mb, vb = _rows_of(grad, 0, block), _rows_of(m, 1, block), _rows_of(v, 0, block)
        adam, rsqrt_v, g_scaled, m_scaled, direction = _derived_channels(gb, mb, vb, factors, mom_factors, xp)
        return [gb, _rows_of(x, 0, block), mb, vb, adam, rsqrt_v, g_scaled, m_scaled], direction

    blocks = _block_rows(shape, block_size) or [None]
    stored = _square_sums([(grad, 1), (x, 1), (m, 3), (v, 1)], xp)
    computed = None
    for block in blocks:
        (_, _, _, _, adam, rsqrt_v, g_scaled, m_scaled), direction = channels(block)
        part = _square_sums([(adam, 3), (rsqrt_v, 1), (g_scaled, 3), (m_scaled, 3), (direction, 1)], xp)
        computed = part if computed is None else computed + part
    mean_squares = xp.concat([stored, computed]) / math.prod(shape)
    nominal_rms = xp.sqrt(mean_squares[16])
    w1 = _scaled_rows(w["w1"], _ELEMENT_ROWS, mean_squares[:16], xp)  # (16, 4)
    row_part, col_part = _factored_parts(row_f, col_f, t, w, xp)

    def update(xb, direction, out):
        d, mu, nu, rho = out
        learned = step_mult * nominal_rms * xp.tanh(d) * _log_scale(mu, xp)
        nominal = nominal_stepsize * _log_scale(nu, xp) * direction
        if isinstance(weight_decay, (int, float)) and weight_decay == 0:  # a Python 0: no regularisation to compute
            return xb - learned - nominal
        return (1 - weight_decay * _log_scale(rho, xp)) * xb - learned - nominal

    if block_size is None:
        chans, direction = channels(None)
        rows = [c for group in chans for c in ([group[i, ...] for i in range(3)] if group.ndim > len(shape) else
                                                [group])]
        hidden = [row_part[j, ...] + col_part[j, ...] + sum(w1[c, j] * rows[c] for c in range(16))
                  for j in range(NUM_OUTPUTS)]
        return update(x, direction, _mlp_tail(hidden, w, xp))
    new = []
    for block in blocks:
        chans, direction = channels(block)
        n = math.prod(tuple(direction.shape))
        element = xp.concat([xp.reshape(c, (-1, n)) for c in chans], axis=0)  # (16, n)
        hidden = xp.reshape(xp.matmul(xp.matrix_transpose(w1), element), (NUM_OUTPUTS, *direction.shape))
        hidden = xp.reshape(hidden + _rows_of(row_part, 1, block) + _rows_of(col_part, 1, block), (NUM_OUTPUTS, n))
        hidden = xp.clip(hidden, min=0.0)
        hidden = xp.clip(xp.matmul(xp.matrix_transpose(w["w2"]), hidden) + w["b2"][:, None], min=0.0)
        out = xp.matmul(xp.matrix_transpose(w["w3"]), hidden) + w["b3"][:, None]
        new.append(update(chans[1], direction, [xp.reshape(out[i, ...], direction.shape) for i in range(NUM_OUTPUTS)]))
    return new[0] if len(new) == 1 else xp.concat(new, axis=0)


def _factored_parts(row_f: Any, col_f: Any, t: Any, w: Mapping[str, Any], xp: Any) -> tuple[Any, Any]:
    """The first layer's shares from the row and from the column channels, ``(4, *broadcastable to the tensor)``,
    the row share with ``b1`` and the time features (constant over the tensor) added."""
    dtype = row_f.dtype
    taus = xp.asarray(np.asarray(TIMESCALES, dtype=np.float64 if dtype == xp.float64 else np.float32),
                      device=device_of(row_f))
    bias = w["b1"] + xp.matmul(xp.tanh(xp.astype(t, dtype) / taus - 1), w["w1"][28:, ...])
    row_part = _factored_part(xp.concat([row_f, _rsqrt(row_f + 1e-8, xp)], axis=0), _ROW_ROWS, w["w1"], xp)
    row_part = row_part + xp.reshape(bias, (NUM_OUTPUTS,) + (1,) * (row_f.ndim - 1))
    col_part = _factored_part(xp.concat([col_f, _rsqrt(col_f + 1e-8, xp)], axis=0), _COL_ROWS, w["w1"], xp)
    return row_part, col_part


def _mlp_tail(hidden: Sequence[Any], w: Mapping[str, Any], xp: Any) -> list[Any]:
    """The MLP after the first layer's pre-activations, one array per unit, as sums of products per element."""
    hidden = [xp.clip(h, min=0.0) for h in hidden]
    hidden = [xp.clip(sum(w["w2"][k, j] * hidden[k] for k in range(NUM_OUTPUTS)) + w["b2"][j], min=0.0)
              for j in range(NUM_OUTPUTS)]
    return [sum(w["w3"][k, j] * hidden[k] for k in range(NUM_OUTPUTS)) + w["b3"][j] for j in range(NUM_OUTPUTS)]


def _all_finite(grads: Sequence[Any], xp: Any) -> Any:
    finite = xp.asarray(True)
    for g in grads:
        finite = xp.logical_and(finite, xp.all(xp.isfinite(g)))
    return finite


def _check_state(state: StarState, params: Sequence[Any]) -> None:
    if not isinstance(state, StarState):
        raise TypeError(f"state must be a StarState (from star(...).init), got {type(state).__name__}")
    if len(state.v) != len(params):
        raise ValueError(f"state holds {len(state.v)} tensors but there are {len(params)} parameters")
    for i, (p, v) in enumerate(zip(params, state.v)):
        if tuple(v.shape) != tuple(p.shape):
            raise ValueError(f"state.v[{i}] has shape {tuple(v.shape)} but params[{i}] has shape {tuple(p.shape)}")


def star(
    meta_params: Mapping[str, Any] | str | None = None,
    *,
    step_mult: Any = 1e-3,
    nominal_stepsize: Any = 1e-3,
    weight_decay: Any = 0.0,
    skip_nonfinite: bool = True,
    block_size: int | None = None,
) -> Optimizer:
    """STAR: a small per-element MLP on 39 gradient features, stabilised by an AdamAggMo nominal term.

    Args:
        meta_params: the MLP weights, a mapping with ``w1 (39, 4), b1 (4,), w2 (4, 4), b2 (4,), w3 (4, 4), b3 (4,)``
            (NumPy arrays, or arrays of the parameters' namespace, traced ones included); a name of a shipped set
            (``"star_v2"``, ``"star_v1"``; ``"star_nonom_v2"`` and ``"star_nonom_v1"``, meta-trained for
            ``nominal_stepsize=0``); None loads ``"star_v2"``.
        step_mult: scale of the learned (blackbox) step; 0 turns STAR into AdamAggMo.
        nominal_stepsize: learning rate of the AdamAggMo nominal term; 0 removes it (the small_fc_lopt baseline).
        weight_decay: decoupled weight decay, modulated per element by ``exp(1e-3*rho)``.
        skip_nonfinite: when any gradient holds NaN or Inf, leave parameters and state as they were and count the
            step in ``state.skipped``.
        block_size: run the per-element MLP over blocks of about this many elements (whole slices of axis 0), so
            that its temporaries (about 40 numbers per element) stay small and in cache; the result is the same.
            For eager backends (torch, NumPy); None (the default) takes each tensor whole, which suits ``jax.jit``.

    Returns:
        An :class:`Optimizer` pair ``(init, update)``.
    """
    if meta_params is None or isinstance(meta_params, str):
        meta_params = load_star_params(meta_params or DEFAULT_PARAMS)
    _check_meta_params(meta_params)
    check_hyperparameter("step_mult", step_mult, low=0.0, high=math.inf, high_open=False)
    check_hyperparameter("nominal_stepsize", nominal_stepsize, low=0.0, high=math.inf, high_open=False)
    check_hyperparameter("weight_decay", weight_decay, low=0.0, high=1.0, high_open=True)
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")

    def init(params: Sequence[Any], *, xp: Any = None) -> StarState:
        params = list(params)
        xp = namespace_of(*params, xp=xp)
        check_params(xp, params)
        m, v, row, col = [], [], [], []
        for p in params:
            dtype = compute_dtype(xp, p.dtype)
            shape = tuple(p.shape)
            row_shape, col_shape = _accumulator_shapes(shape)
            m.append(zeros_beside(xp, p, (3, *shape), dtype))
            v.append(zeros_beside(xp, p, shape, dtype))
            row.append(zeros_beside(xp, p, row_shape, dtype))
            col.append(zeros_beside(xp, p, col_shape, dtype))
        first = params[0] if params else None
        count = zeros_beside(xp, first, (), xp.int32)
        return StarState(count, tuple(m), tuple(v), tuple(row), tuple(col), zeros_beside(xp, first, (), xp.int32))

    def update(grads: Sequence[Any], state: StarState, params: Sequence[Any]) -> tuple[list[Any], StarState]:
        grads, params = list(grads), list(params)
        xp = namespace_of(*params, *grads)
        check_params(xp, params)
        check_gradients(xp, grads, params)
        _check_state(state, params)
        weights: dict[Any, dict[str, Any]] = {}
        new_params, new_m, new_v, new_row, new_col = [], [], [], [], []
        for p, g, m, v, row, col in zip(params, grads, state.m, state.v, state.fac_row, state.fac_col):
            if math.prod(p.shape) == 0:  # nothing to update; the mean over an empty tensor is undefined
                x = p
            else:
                if v.dtype not in weights:
                    weights[v.dtype] = _meta_arrays(meta_params, xp, v.dtype, v)
                with blas_flags_quiet(xp):
                    x, m, v, row, col = _update_tensor(
                        p, g, state.count, m, v, row, col, weights[v.dtype], step_mult=step_mult,
                        nominal_stepsize=nominal_stepsize, weight_decay=weight_decay,
                        block_size=block_size, xp=xp,
                    )
            new_params.append(xp.astype(x, p.dtype, copy=False))
            new_m.append(m)
            new_v.append(v)
            new_row.append(row)
            new_col.append(col)
        new_state = StarState(
            state.count + 1, tuple(new_m), tuple(new_v), tuple(new_row), tuple(new_col), state.skipped
        )
        if not skip_nonfinite:
            return new_params, new_state
        finite = _all_finite(grads, xp)

        def keep(new: Any, old: Any) -> Any:
            return xp.where(finite, new, old)

        def keep_all(new: tuple[Any, ...], old: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(keep(n, o) for n, o in zip(new, old))

        return [keep(n, o) for n, o in zip(new_params, params)], StarState(
            keep(new_state.count, state.count),
            keep_all(new_state.m, state.m),
            keep_all(new_state.v, state.v),
            keep_all(new_state.fac_row, state.fac_row),
            keep_all(new_state.fac_col, state.fac_col),
            state.skipped + xp.astype(xp.logical_not(finite), state.skipped.dtype),
        )

    return Optimizer(init, update)
