"""Nero, the neuronal rotator (Liu, Bernstein, Meister & Yue, ICML 2021), as a pure array-API rule.

Per parameter tensor ``p`` with gradient ``g``, with state ``(t, v, sigma)``:

* neuron tensors (``ndim >= 2``, fan-in ``>= 2``) are viewed as rows ``W`` of shape ``(neurons, fan_in)``;
  ``v`` has one entry per neuron, ``v = beta*v + (1-beta)*|g_row|^2``;
* bias-like tensors are elementwise: ``v = beta*v + (1-beta)*g*g``;
* the update is ``p -= lr * sigma * g / sqrt(v / (1 - beta**t))`` (zero where ``v == 0``), and constrained
  neuron tensors are then projected back to zero-mean (``centre``), unit-norm (``normalise``) rows;
* at the first update (``t == 0``) constrained rows are projected first and ``sigma`` is fixed: 1 for
  normalised neuron tensors, else the mean row norm (neuron tensors; 1 where every row is zero) or mean ``|p|``
  (bias-like; 0.01 where that is 0).

A neuron tensor's step is computed as in :mod:`nero_core._closed_form`: five row sums of the old weights and the
gradient (read-only passes), per-row factors from them, and one affine write ``scale * w - step * g - shift``; rows
where that closed form would cancel are computed from the actual arrays instead (rare: weights that start around a
large common offset, steps of the order of a row's norm). Nothing branches on array values in traced code
(:mod:`nero_core._branch`), so the rule runs under ``jax.jit`` and ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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
from ._branch import cond, is_library, is_traced, select
from ._closed_form import RowFactors, row_factors, segment_means, start_sigma, step_rate
from ._neurons import (
    NeuronAxis, _safe_reciprocal, affine_write, as_rows, balanced_rows, from_rows, neuron_axes, neuron_sums, per_neuron,
)

__all__ = ["NeroState", "balanced", "nero"]


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


class NeuronFactors(NamedTuple):
    """One neuron tensor's step, per row: ``new = scale * (w - offset) - step * g - shift`` (``offset`` None: 0),
    and its state after it (``v`` per row, ``sigma`` 0-d)."""

    offset: Any
    scale: Any
    step: Any
    shift: Any
    v: Any
    sigma: Any


def _fan_in(shape: tuple[int, ...], axis: int) -> int:
    return math.prod(shape) // shape[axis] if shape[axis] else 1


def _concat(parts: Sequence[Any], xp: Any) -> Any:
    return xp.concat(list(parts)) if len(parts) > 1 else parts[0]


def _spread(values: Sequence[Any], sizes: Sequence[int], like: Any, xp: Any) -> Any:
    """One value per tensor, repeated over its ``sizes`` rows or elements and concatenated (a shared value stays
    one)."""
    if all(x is values[0] for x in values):
        return values[0]
    return _concat([xp.broadcast_to(xp.asarray(x, dtype=like), (n,)) for x, n in zip(values, sizes)], xp)


def neuron_factors(
    ws: Sequence[Any], gs: Sequence[Any], counts: Sequence[Any], vs: Sequence[Any], sigmas: Sequence[Any],
    lrs: Sequence[Any], *, axes: Sequence[int], beta: Any, centre: bool, normalise: bool, xp: Any,
    sums: Sequence[tuple[Any, ...]] | None = None,
) -> list[NeuronFactors]:
    """Phase one of Nero's step for neuron tensors whose state shares a dtype (and device): their per-row factors.

    ``ws``, ``gs``: weights and gradients in the state's dtype, neurons on ``axes``; ``counts``, ``vs``,
    ``sigmas``, ``lrs``: each tensor's state and lr. ``sums``: each tensor's five row sums where the caller took
    them already (``neuron_sums``' order), else they are taken here (reads only).

    The per-row maths (:func:`~nero_core._closed_form.row_factors`) runs once over all the tensors' rows, their
    sums concatenated: a few dozen small operations per step, not per tensor. Where it flags a row whose closed form
    cancels, the factors of every tensor come from the actual arrays instead (a branch other steps skip): the rows
    centred before they are summed (the first update's ``offset``), then the closed form's output balanced again
    by its own measured mean and norm; two more passes over memory, for the rare steps that need them.
    """
    rows = [v.shape[0] for v in vs]
    shapes = [tuple(w.shape) for w in ws]
    dtype = vs[0].dtype
    if sums is None:
        sums = [neuron_sums(w, g, axis, xp) for w, g, axis in zip(ws, gs, axes)]

    def cat(parts: Sequence[Any]) -> Any:
        return _concat(parts, xp)

    def per_row(values: Sequence[Any], like: Any = None) -> Any:
        return _spread(values, rows, like, xp)

    def factors(sums: Sequence[tuple[Any, ...]]) -> RowFactors:
        sw, sww, sg, sgg, swg = (cat([s[k] for s in sums]) for k in range(5))
        return row_factors(
            sw, sww, sg, sgg, swg, cat(vs), per_row(sigmas, dtype), per_row(counts),
            fan_in=per_row([_fan_in(s, a) for s, a in zip(shapes, axes)], dtype), lr=per_row(lrs, dtype), beta=beta,
            centre=centre, normalise=normalise, segments=rows, xp=xp,
        )

    def split(x: Any) -> list[Any]:
        starts = [sum(rows[:i]) for i in range(len(rows) + 1)]
        return [x[a:b] for a, b in zip(starts, starts[1:])]

    def closed_form(f: RowFactors) -> tuple[Any, ...]:
        offsets = [xp.zeros_like(v) for v in vs] if is_traced(f.scale, xp) else [None] * len(vs)
        return offsets, split(f.scale), split(f.step), split(f.shift), split(f.sigma) if f.sigma.ndim else f.sigma

    def from_arrays() -> tuple[Any, ...]:
        offsets, xs = [], []
        for w, count, v, shape, axis in zip(ws, counts, vs, shapes, axes):
            others = tuple(i for i in range(len(shape)) if i != axis)
            mean = xp.sum(w, axis=others) / _fan_in(shape, axis)
            offsets.append(xp.where(count == 0, mean, xp.zeros_like(v)) if centre else xp.zeros_like(v))
            xs.append(w - per_neuron(offsets[-1], shape, axis, xp))
        fx = factors([neuron_sums(x, g, axis, xp) for x, g, axis in zip(xs, gs, axes)])
        out: list[list[Any]] = [[], [], []]
        for x, g, shape, axis, scale, step, shift in zip(
            xs, gs, shapes, axes, split(fx.scale), split(fx.step), split(fx.shift)
        ):  # the closed form's output, balanced by its actual mean and norm
            others = tuple(i for i in range(len(shape)) if i != axis)
            y = affine_write(x, g, scale, step, shift, axis, xp)
            mean = xp.sum(y, axis=others) / _fan_in(shape, axis) if centre else xp.zeros_like(scale)
            if centre:
                y = y - per_neuron(mean, shape, axis, xp)
            norm = xp.sqrt(xp.sum(y * y, axis=others)) if normalise else xp.ones_like(scale)
            d = _safe_reciprocal(norm, xp)
            for parts, value in zip(out, (scale * d, step * d, (shift + mean) * d)):
                parts.append(value)
        return offsets, *out, split(fx.sigma) if fx.sigma.ndim else fx.sigma

    def checked(f: RowFactors) -> tuple[Any, ...]:
        return cond(xp.any(f.recompute), from_arrays, lambda: closed_form(f), xp)

    if is_library(xp, "jax.numpy") and is_traced(sums[0][0], xp):
        # Under jax.jit the whole choice sits in a conditional whose predicate needs no maths (a first update takes
        # the arrays' branch, exact everywhere), and the factors and their check are computed inside it. With the
        # check's predicate in the main computation, XLA on CPU ran the step's passes less in parallel: a jitted
        # step of the GPT-2-like set took 1.4x as long (2 cores).
        first = xp.any(xp.stack([xp.asarray(c) == 0 for c in counts]))
        offsets, scales, steps, shifts, sigma = cond(first, from_arrays, lambda: checked(factors(sums)), xp)
        new_v = factors(sums).v  # (the same few operations; XLA keeps the ones the v needs)
    else:
        f = factors(sums)
        offsets, scales, steps, shifts, sigma = checked(f)
        new_v = f.v
    sigma_of = [s[0] if r else old for s, r, old in zip(sigma, rows, sigmas)] if isinstance(sigma, list) else (
        [sigma] * len(vs))
    return [NeuronFactors(*parts) for parts in zip(offsets, scales, steps, shifts, split(new_v), sigma_of)]


def _elementwise_steps(
    xs: Sequence[Any], gs: Sequence[Any], counts: Sequence[Any], vs: Sequence[Any], sigmas: Sequence[Any],
    lrs: Sequence[Any], *, beta: Any, xp: Any,
) -> list[tuple[Any, Any, Any]]:
    """Phase one of bias-like tensors' steps (their state sharing a dtype and device), all their elements at once:
    per tensor, its step per element ``c`` (``new = x - c * g``), new ``v`` and sigma. ``xs``, ``gs``: the tensors
    and gradients in the state's dtype. One pass of a dozen small operations for all of them, not one per tensor
    (a model has two or three bias-like tensors per layer)."""
    dtype = vs[0].dtype
    sizes = [math.prod(x.shape) for x in xs]

    def flat(arrays: Sequence[Any]) -> Any:
        return _concat([xp.reshape(a, (-1,)) for a in arrays], xp)

    def per_element(values: Sequence[Any], like: Any = None) -> Any:
        return _spread(values, sizes, like, xp)

    x, g, count = flat(xs), xp.astype(flat(gs), dtype, copy=False), per_element(counts)
    sigma = per_element(sigmas, dtype)
    if sum(sizes):  # each tensor's sigma is fixed at its first update: its mean |p| (an empty one keeps its own)
        start = start_sigma(segment_means(xp.abs(x), sizes, xp), neuron=False, xp=xp)
        sigma = xp.where(count == 0, start, sigma)
    v, c = step_rate(g * g, flat(vs), sigma, count, lr=per_element(lrs, dtype), beta=beta, xp=xp)
    out, start_at = [], 0
    for x_i, old_sigma, n in zip(xs, sigmas, sizes):
        part = slice(start_at, start_at + n)
        new_sigma = (sigma[start_at] if sigma.ndim else sigma) if n else old_sigma
        out.append((xp.reshape(c[part], x_i.shape), xp.reshape(v[part], x_i.shape), new_sigma))
        start_at += n
    return out


def _device_key(x: Any, xp: Any) -> Any:
    """What keeps state arrays apart when concatenated: their device (none under JAX, whose arrays in one
    computation share one, or are sharded)."""
    return None if is_library(xp, "jax.numpy") else str(device_of(x))


def _all_finite(arrays: Sequence[Any], xp: Any) -> Any:
    """Whether every element of ``arrays`` is finite, as a 0-d bool array. Eager arrays (not JAX's) are checked a
    dtype and device at a time, concatenated: three operations per tensor cost a model of many small ones more
    than its step."""
    finite = xp.asarray(True)
    if arrays and not is_library(xp, "jax.numpy") and not is_traced(arrays[0], xp):
        groups: dict[Any, list[Any]] = {}
        for a in arrays:
            groups.setdefault((a.dtype, _device_key(a, xp)), []).append(xp.reshape(a, (-1,)))
        arrays = [xp.concat(group) if len(group) > 1 else group[0] for group in groups.values()]
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
        lr: step size; each balanced neuron turns by about ``lr`` radians per step. A Python float, a 0-d array
            (``inject_hyperparams``, a tensor lr), or a schedule: a callable from the tensor's step count (updates
            taken so far, a 0-d int32 array: 0 at the first update) to the lr, as optax's schedules are.
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
    if not callable(lr):
        check_hyperparameter("lr", lr, low=0.0, high=math.inf, high_open=False)
    check_hyperparameter("beta", beta, low=0.0, high=1.0, high_open=True)
    skip = skip_mode(skip_nonfinite)
    schedule: Callable[[Any], Any] = lr if callable(lr) else (lambda count: lr)
    constraints = dict(beta=beta, centre=centre, normalise=normalise)

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

    def update(
        grads: Sequence[Any], state: NeroState, params: Sequence[Any], *, donate: bool = False
    ) -> tuple[list[Any], NeroState]:
        """The new parameters and state. ``donate=True`` gives up ``params`` (as ``jax.jit``'s ``donate_argnums``
        does): where their library's arrays are mutable (NumPy, CuPy, PyTorch) the new values are written into
        them, so a step needs no second copy of the parameters; use only the returned list afterwards (with
        ``skip_nonfinite="neuron"`` nothing is written in place)."""
        grads, params = list(grads), list(params)
        xp = namespace_of(*params, *grads)
        check_params(xp, params)
        check_gradients(xp, grads, params)
        axes = neuron_axes([tuple(p.shape) for p in params], neuron_axis)
        _check_state(state, params, axes)
        lrs = [schedule(t) for t in state.count]
        # Phase one: every tensor's new v, and the neuron tensors' row factors (by state dtype, all their rows at
        # once), before anything is written.
        steps: list[Any] = [None] * len(params)
        new_v, new_sigma = list(state.v), list(state.sigma)
        neurons: dict[Any, list[int]] = {}
        elementwise: dict[Any, list[int]] = {}
        for i, (v, axis) in enumerate(zip(state.v, axes)):
            (elementwise if axis is None else neurons).setdefault((v.dtype, _device_key(v, xp)), []).append(i)
        for group in elementwise.values():
            dtype = state.v[group[0]].dtype
            done = _elementwise_steps(
                [xp.astype(params[i], dtype, copy=False) for i in group], [grads[i] for i in group],
                [state.count[i] for i in group], [state.v[i] for i in group], [state.sigma[i] for i in group],
                [lrs[i] for i in group], beta=beta, xp=xp,
            )
            for i, (c, v, sigma) in zip(group, done):
                steps[i], new_v[i], new_sigma[i] = c, v, sigma
        for group in neurons.values():
            dtype = state.v[group[0]].dtype
            found = neuron_factors(
                [xp.astype(params[i], dtype, copy=False) for i in group],
                [xp.astype(grads[i], dtype, copy=False) for i in group],
                [state.count[i] for i in group], [state.v[i] for i in group], [state.sigma[i] for i in group],
                [lrs[i] for i in group], axes=[axes[i] or 0 for i in group], **constraints, xp=xp,
            )
            for i, f in zip(group, found):
                steps[i], new_v[i], new_sigma[i] = f, f.v, f.sigma

        def write() -> tuple[list[Any], list[Any]]:
            """Phase two: the new parameters, in their own dtypes (one affine write per neuron tensor)."""
            out = []
            for p, g, step, v, axis in zip(params, grads, steps, new_v, axes):
                w, g = xp.astype(p, v.dtype, copy=False), xp.astype(g, v.dtype, copy=False)
                in_place = (donate and skip != "neuron") or w is not p  # (a copy in the state's dtype is ours)
                if axis is None:
                    if in_place:
                        w -= step * g
                    else:
                        w = w - step * g
                else:
                    w = affine_write(
                        w, g, step.scale, step.step, step.shift, axis, xp, offset=step.offset, in_place=in_place
                    )
                out.append(xp.astype(w, p.dtype, copy=False))
            return out, new_sigma

        new_count = [t + 1 for t in state.count]
        if skip is None:
            new_params, new_sigma = write()
            return new_params, NeroState(tuple(new_count), tuple(new_v), tuple(new_sigma), state.skipped)
        if skip == "neuron":
            new_params, new_sigma = write()
            new_state = NeroState(tuple(new_count), tuple(new_v), tuple(new_sigma), state.skipped)
            return _keep_finite_neurons(new_params, new_state, params, state, axes, xp)
        # NaN or Inf in a gradient reaches its v, and so does a finite gradient whose square overflows the state's
        # dtype: checking the new v (one entry per neuron) catches both without another pass over the gradients.
        # A skipped step writes nothing.
        finite = _all_finite(new_v, xp)
        new_params, new_sigma = cond(finite, write, lambda: (list(params), list(state.sigma)), xp)

        def keep(new: Any, old: Any) -> Any:
            return select(finite, new, old, xp)  # (on eager arrays the branch just taken, not a where per tensor)

        return new_params, NeroState(
            tuple(keep(n, o) for n, o in zip(new_count, state.count)),
            tuple(keep(n, o) for n, o in zip(new_v, state.v)),
            tuple(new_sigma),
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
