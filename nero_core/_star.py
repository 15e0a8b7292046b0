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
  ``nu`` and regularisation ``rho``; the update is ``p <- r*p - s - n`` with
  ``s = step_mult * d * exp(1e-3*mu) * rsqrt(v+1e-6)``,
  ``n = nominal_stepsize * exp(1e-3*nu) * mean_i(m_i) * rsqrt(v+1e-6)`` (AdamAggMo) and
  ``r = 1 - weight_decay * exp(1e-3*rho)``.

With the MLP's output layer at zero the rule is exactly AdamAggMo with decoupled weight decay. The Adafactor details
the design leaves open (the ``1e-30``, ``1e-9`` guards, which axes are "row" and "column", ties between equal axes
broken towards the later axis) follow ``learned_optimization``'s ``MLPNomLOpt``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import device as device_of

from ._base import Optimizer, check_gradients, check_hyperparameter, check_params, compute_dtype, namespace_of
from ._base import zeros_beside

__all__ = ["StarState", "factored_axes", "load_star_config", "load_star_params", "star"]

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAY = 0.999
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
EXP_MULT = 1e-3
NUM_FEATURES = 28 + len(TIMESCALES)
NUM_OUTPUTS = 4  # direction, magnitude, nominal magnitude, regularisation
MLP_KEYS = ("w1", "b1", "w2", "b2", "w3", "b3")
DEFAULT_PARAMS = "star_v1"


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
    return 1 / xp.sqrt(x)


def _safe_rsqrt(x: Any, xp: Any) -> Any:
    return 1 / xp.sqrt(xp.maximum(x, xp.full_like(x, 1e-9)))


def _adafactor(g: Any, row: Any, col: Any, shape: tuple[int, ...], xp: Any, like: Any) -> tuple[Any, ...]:
    """New row/column (or full) accumulators and the three per-element factors ``rowfac*colfac`` and features."""
    ndim = len(shape)
    decays = _column(ADAFACTOR_DECAYS, xp, g.dtype, ndim, like)
    g2 = g * g + 1e-30
    axes = factored_axes(shape)
    if axes is None:
        row = decays * row + (1 - decays) * g2
        scale = _safe_rsqrt(row + 1e-9, xp)
        return row, col, scale, row, row, _rsqrt(row + 1e-6, xp)
    d1, d0 = axes
    row_decays = xp.reshape(decays, (3,) + (1,) * (ndim - 1))
    row = row_decays * row + (1 - row_decays) * xp.expand_dims(xp.mean(g2, axis=d0), axis=0)
    col = row_decays * col + (1 - row_decays) * xp.expand_dims(xp.mean(g2, axis=d1), axis=0)
    d1_in_row = 1 + (d1 - 1 if d1 > d0 else d1)
    row_mean = xp.mean(row, axis=d1_in_row, keepdims=True)
    row_wide = xp.expand_dims(row, axis=d0 + 1)
    col_wide = xp.expand_dims(col, axis=d1 + 1)
    rowfac = xp.expand_dims(_safe_rsqrt(row / (row_mean + 1e-9), xp), axis=d0 + 1)
    colfac = xp.expand_dims(_safe_rsqrt(col, xp), axis=d1 + 1)
    scale = rowfac * colfac
    return row, col, scale, row_wide, col_wide, scale


def _features(x: Any, g: Any, m: Any, v: Any, scale: Any, row_f: Any, col_f: Any, mom_scale: Any, t: Any,
              xp: Any) -> Any:
    """The ``(size, 39)`` MLP inputs: 28 channels normalised over the tensor, then 11 time features."""
    shape = tuple(x.shape)
    size = math.prod(shape)
    full = (3, *shape)
    rsqrt_v = _rsqrt(v + 1e-6, xp)

    def three(a: Any) -> list[Any]:
        a = xp.broadcast_to(a, full)
        return [xp.reshape(a[i, ...], (size,)) for i in range(3)]

    channels = [xp.reshape(g, (size,)), xp.reshape(x, (size,))]
    channels += three(m) + [xp.reshape(v, (size,))] + three(m * rsqrt_v) + [xp.reshape(rsqrt_v, (size,))]
    channels += three(g * scale) + three(row_f) + three(col_f)
    channels += three(_rsqrt(row_f + 1e-8, xp)) + three(_rsqrt(col_f + 1e-8, xp)) + three(m * mom_scale)
    stacked = xp.stack(channels, axis=1)
    stacked = stacked / xp.sqrt(xp.mean(stacked * stacked, axis=0, keepdims=True) + 1e-5)
    taus = xp.asarray(np.asarray(TIMESCALES, dtype=np.float64 if x.dtype == xp.float64 else np.float32),
                      device=device_of(x))
    time = xp.tanh(xp.astype(t, x.dtype) / taus - 1)
    time = xp.broadcast_to(xp.reshape(time, (1, len(TIMESCALES))), (size, len(TIMESCALES)))
    return xp.concat([stacked, time], axis=1)


def _mlp(inputs: Any, w: Mapping[str, Any], xp: Any) -> Any:
    h = inputs
    for layer in ("1", "2"):
        h = xp.matmul(h, w["w" + layer]) + w["b" + layer]
        h = xp.where(h > 0, h, xp.zeros_like(h))
    return xp.matmul(h, w["w3"]) + w["b3"]


def _update_tensor(p, g, t, m, v, row, col, w, *, step_mult, nominal_stepsize, weight_decay, xp):
    dtype = v.dtype
    shape = tuple(p.shape)
    x = xp.astype(p, dtype, copy=False)
    grad = xp.astype(g, dtype, copy=False)
    decays = _column(MOMENTUM_DECAYS, xp, dtype, len(shape), v)
    m = decays * m + (1 - decays) * xp.expand_dims(grad, axis=0)
    v = RMS_DECAY * v + (1 - RMS_DECAY) * (grad * grad)
    row, col, scale, row_f, col_f, mom_scale = _adafactor(grad, row, col, shape, xp, v)
    out = _mlp(_features(x, grad, m, v, scale, row_f, col_f, mom_scale, t, xp), w, xp)
    direction, magnitude, nominal, regular = (xp.reshape(out[:, i], shape) for i in range(NUM_OUTPUTS))
    rsqrt_v = _rsqrt(v + 1e-6, xp)
    step = step_mult * direction * xp.exp(EXP_MULT * magnitude) * rsqrt_v
    aggmo = (m[0, ...] + m[1, ...] + m[2, ...]) / 3
    nominal_step = nominal_stepsize * xp.exp(EXP_MULT * nominal) * aggmo * rsqrt_v
    keep = 1 - weight_decay * xp.exp(EXP_MULT * regular)
    return keep * x - step - nominal_step, m, v, row, col



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
) -> Optimizer:
    """STAR: a small per-element MLP on 39 gradient features, stabilised by an AdamAggMo nominal term.

    Args:
        meta_params: the MLP weights, a mapping with ``w1 (39, 4), b1 (4,), w2 (4, 4), b2 (4,), w3 (4, 4), b3 (4,)``
            (NumPy arrays, or arrays of the parameters' namespace, traced ones included); a name of a shipped set
            (``"star_v1"``; ``"star_nonom_v1"``, meta-trained for ``nominal_stepsize=0``); None loads ``"star_v1"``.
        step_mult: scale of the learned (blackbox) step; 0 turns STAR into AdamAggMo.
        nominal_stepsize: learning rate of the AdamAggMo nominal term; 0 removes it (the small_fc_lopt baseline).
        weight_decay: decoupled weight decay, modulated per element by ``exp(1e-3*rho)``.
        skip_nonfinite: when any gradient holds NaN or Inf, leave parameters and state as they were and count the
            step in ``state.skipped``.

    Returns:
        An :class:`Optimizer` pair ``(init, update)``.
    """
    if meta_params is None or isinstance(meta_params, str):
        meta_params = load_star_params(meta_params or DEFAULT_PARAMS)
    _check_meta_params(meta_params)
    check_hyperparameter("step_mult", step_mult, low=0.0, high=math.inf, high_open=False)
    check_hyperparameter("nominal_stepsize", nominal_stepsize, low=0.0, high=math.inf, high_open=False)
    check_hyperparameter("weight_decay", weight_decay, low=0.0, high=1.0, high_open=True)

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
                x, m, v, row, col = _update_tensor(
                    p, g, state.count, m, v, row, col, weights[v.dtype], step_mult=step_mult,
                    nominal_stepsize=nominal_stepsize, weight_decay=weight_decay, xp=xp,
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
