"""Nero as an ``optax.GradientTransformation`` over any pytree of parameters."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import nero_core
from nero_core._base import check_hyperparameter

from ._axes import NeuronAxisTree, check_floating, check_shapes, leaf_neuron_axes
from ._describe import warn_suspicious
from ._fused import neuron_steps
from ._order import check_balanced_after_first_update
from ._schedule import check_scheduled, value_at

__all__ = ["NeroState", "nero"]


class NeroState(NamedTuple):
    """Nero's optax state.

    count:   0-d int32, updates taken so far (skipped steps excluded).
    v:       a pytree like params: shape ``(neurons,)`` for neuron leaves, the leaf's own shape for bias-like ones;
             float32 for float32/bfloat16/float16 leaves, float64 for float64 ones.
    sigma:   a pytree like params of 0-d floats: each leaf's scale, fixed at its first update.
    skipped: 0-d int32, steps skipped because some gradient held NaN or Inf (parameters and the rest of the
             state are then left exactly as they were, as with ``optax.apply_if_finite``).
    """

    count: Any
    v: Any
    sigma: Any
    skipped: Any


def _state_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    """The shape of a leaf's ``v``: one entry per neuron, or one per element for a bias-like leaf."""
    return tuple(shape) if axis is None else (shape[axis],)


def _paths_and_leaves(tree: Any) -> tuple[list, list]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [path for path, _ in flat], [leaf for _, leaf in flat]


def _sharding(leaf: Any) -> Any:
    """The sharding a state array must follow: a ShapeDtypeStruct's, or a concrete array's when it was committed
    to it. None under tracing, and for uncommitted arrays (committing their state would commit jit outputs and
    cost a recompile in wrappers such as inject_hyperparams)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf.sharding
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.committed:
        return leaf.sharding
    return None


def _place(x: Any, sharding: Any, axis: int | None) -> Any:
    """Put a state array where its parameter lives: ``v`` of a neuron tensor follows the neuron axis."""
    if sharding is None:
        return x
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(x.shape) + 1)
        if x.ndim == 0:
            spec = ()
        elif axis is not None and x.ndim == 1:
            spec = (spec[axis],)
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[: x.ndim]))
    elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return x
    return jax.device_put(x, sharding)


def nero(
    learning_rate: Any = 0.01,
    beta: Any = 0.999,
    *,
    centre: bool = True,
    normalise: bool = True,
    neuron_axis: NeuronAxisTree = -1,
    fused: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Nero, the neuronal rotator (Liu, Bernstein, Meister & Yue, ICML 2021), as an optax transformation.

    Each neuron (a slice of a weight leaf along its neuron axis) is kept zero-mean and unit-norm and turned by
    about ``learning_rate`` radians per step: ``w <- balanced(w - lr * sigma * g / sqrt(v_hat))`` with
    ``v = beta * v + (1 - beta) * |g_row|^2`` per neuron. Bias-like leaves (ndim < 2, or fan-in 1) move by the
    same relative rule elementwise, scaled by their mean magnitude ``sigma``. The first update projects weights
    onto balanced neurons. See docs/design.md for the exact rule.

    ``update(grads, state, params)`` needs ``params`` and returns updates (new minus old parameters) for
    ``optax.apply_updates``; in ``optax.chain`` put Nero last. If any gradient holds NaN or Inf the whole step
    is skipped (zero updates, state unchanged) and counted in ``state.skipped``. Extra keyword arguments to
    ``update`` are accepted and ignored (optax's ``GradientTransformationExtraArgs``).

    Args:
        learning_rate: about the angle, in radians, each neuron turns per step. A float, a 0-d array
            (``optax.inject_hyperparams``; keep ``neuron_axis`` static there:
            ``optax.inject_hyperparams(nero, static_args="neuron_axis")``), or an optax schedule, a function of
            the step count (``state.count``: updates taken, skipped steps excluded) giving the rate.
        beta: decay of the per-neuron second moment, in ``[0, 1)``.
        centre: keep every neuron's weights zero-mean.
        normalise: keep every neuron's weights unit-norm.
        neuron_axis: the axis that indexes neurons, per leaf: an int for every leaf, None (every leaf
            bias-like), a pytree matching params, or a callable ``(path, leaf) -> int | None``. The default -1
            fits Flax and Haiku kernels ``(in, out)`` and ``(kh, kw, in, out)``; use
            :func:`nero_optax.flax_neuron_axis` to give Flax embedding tables ``(vocab, features)`` axis 0.
            Torch-layout weights ``(out, in, ...)``, as in Equinox's ``Linear``, ``Conv`` and ``Embedding``,
            need ``neuron_axis=0`` (transposed convolutions in torch layout: 1).
        fused: use the fused JAX kernel for neuron leaves (two passes over memory: the per-neuron sums, then
            one read-and-write pass that ``optax.apply_updates`` fuses into); on CPU, with one device, the sums of
            float32/float64 leaves with neurons on their first or last axis are an XLA FFI custom call built on
            first use with the system's C++ compiler (``nero_optax._native``), which reads the gradient once
            for them instead of three times. False runs the array-API core rule, the reference, which this
            matches to rounding.

    Returns:
        An ``optax.GradientTransformationExtraArgs``.
    """
    # Checked now, not at the first update, and by the names users pass.
    check_scheduled("learning_rate", learning_rate, low=0.0, high=math.inf, high_open=False)
    check_hyperparameter("beta", beta, low=0.0, high=1.0, high_open=True)
    options = dict(beta=beta, centre=centre, normalise=normalise)

    def init(params: Any) -> NeroState:
        paths, leaves = _paths_and_leaves(params)
        check_floating(paths, leaves)
        axes = leaf_neuron_axes(neuron_axis, params)
        warn_suspicious(params, neuron_axis, constrained=centre or normalise)
        shapes = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
        core = nero_core.nero(**options, neuron_axis=axes).init(shapes, xp=jnp)  # reads no rate
        shardings = [_sharding(leaf) for leaf in leaves]
        first = shardings[0] if shardings else None
        treedef = jax.tree.structure(params)
        return NeroState(
            count=_place(jnp.zeros((), jnp.int32), first, None),
            v=treedef.unflatten([_place(v, s, a) for v, s, a in zip(core.v, shardings, axes)]),
            sigma=treedef.unflatten([_place(x, s, None) for x, s in zip(core.sigma, shardings)]),
            skipped=_place(core.skipped, first, None),
        )

    def update(updates: Any, state: NeroState, params: Any = None, **extra_args: Any) -> tuple[Any, NeroState]:
        del extra_args  # optax's convention: what other transformations of a chain take, this one ignores
        if params is None:
            raise ValueError(
                "nero needs the current params: call update(grads, state, params); in optax.chain put nero last"
            )
        treedef = jax.tree.structure(params)
        if jax.tree.structure(updates) != treedef:
            raise ValueError(f"grads do not match params: {jax.tree.structure(updates)} vs {treedef}")
        if not isinstance(state, NeroState):
            raise TypeError(
                f"state must be the NeroState that nero_optax.nero's init returns (or nero_optax.restore_state gives "
                f"for a checkpoint), got {type(state).__name__}"
            )
        paths, ps = _paths_and_leaves(params)
        gs = jax.tree.leaves(updates)
        check_floating(paths, ps)
        check_floating(paths, gs, what="grads")
        check_shapes(paths, gs, [p.shape for p in ps], "grads", "the shape of its parameter")
        axes = leaf_neuron_axes(neuron_axis, params)
        vs, sigmas = jax.tree.leaves(state.v), jax.tree.leaves(state.sigma)
        if len(vs) != len(ps):
            raise ValueError(f"state holds {len(vs)} leaves but params have {len(ps)}: init it with these params")
        check_shapes(
            paths, vs, [_state_shape(p.shape, a) for p, a in zip(ps, axes)], "state.v",
            "for these params: init the state with them, or load a checkpoint with nero_optax.restore_state",
        )
        names = [jax.tree_util.keystr(path) or "<root>" for path in paths]
        check_balanced_after_first_update(ps, axes, state.count, names, centre=centre, normalise=normalise)
        step = _fused_step if fused else _core_step
        lr = value_at(learning_rate, state.count)
        new_ps, count, vs, sigmas, skipped = step(
            ps, gs, state.count, vs, sigmas, state.skipped, axes=axes, lr=lr, **options
        )
        new_updates = [(new - p).astype(p.dtype) for new, p in zip(new_ps, ps)]
        return treedef.unflatten(new_updates), NeroState(
            count, treedef.unflatten(vs), treedef.unflatten(sigmas), skipped
        )

    return optax.GradientTransformationExtraArgs(init, update)


def _core_step(ps, gs, count, vs, sigmas, skipped, *, axes, **hyper):
    """The array-API core rule on the flat leaves; its state has one count per tensor, all equal to ``count``."""
    state = nero_core.NeroState((count,) * len(ps), tuple(vs), tuple(sigmas), skipped)
    new_ps, state = nero_core.nero(**hyper, neuron_axis=axes).update(gs, state, ps)
    return new_ps, (state.count[0] if ps else count), list(state.v), list(state.sigma), state.skipped


def _fused_step(ps, gs, count, vs, sigmas, skipped, *, axes, **hyper):
    """Neuron leaves through the fused kernel, bias-like ones through the core rule; a step with any
    non-finite gradient is skipped whole, as the core does (neuron leaves are checked through their row sums)."""
    new_ps, new_vs, new_sigmas = list(ps), list(vs), list(sigmas)
    bias = [i for i, axis in enumerate(axes) if axis is None]
    if bias:
        rule = nero_core.nero(**hyper, neuron_axis=None, skip_nonfinite=False)
        state = nero_core.NeroState(
            (count,) * len(bias), tuple(vs[i] for i in bias), tuple(sigmas[i] for i in bias), skipped
        )
        out, state = rule.update([gs[i] for i in bias], state, [ps[i] for i in bias])
        for k, i in enumerate(bias):
            new_ps[i], new_vs[i], new_sigmas[i] = out[k], state.v[k], state.sigma[k]
    checks = [new_vs[i].ravel() for i in bias]  # NaN, Inf or an overflowing square reaches v
    neuron = [i for i, axis in enumerate(axes) if axis is not None]
    for dtype in dict.fromkeys(vs[i].dtype for i in neuron):  # neuron tensors batched by their state's dtype
        group = [i for i in neuron if vs[i].dtype == dtype]
        out = neuron_steps(
            [ps[i] for i in group], [gs[i] for i in group], count, [vs[i] for i in group],
            [sigmas[i] for i in group], axes=[axes[i] for i in group], **hyper,
        )
        for k, i in enumerate(group):
            new_ps[i], new_vs[i], new_sigmas[i] = out[0][k], out[1][k], out[2][k]
        checks.append(out[3])
    # One reduction over every check, so the step's flag is one scalar: reduced leaf by leaf, XLA fuses the whole
    # chain of per-leaf flags into every leaf's final pass, where it is evaluated per element.
    dtype = jnp.result_type(*checks) if checks else jnp.float32
    finite = jnp.all(jnp.isfinite(jnp.concatenate([c.astype(dtype) for c in checks]))) if checks else jnp.asarray(True)

    def keep(new: list, old: list) -> list:
        return [jnp.where(finite, n, o) for n, o in zip(new, old)]

    return (
        keep(new_ps, ps),
        jnp.where(finite, count + 1, count),
        keep(new_vs, vs),
        keep(new_sigmas, sigmas),
        skipped + jnp.logical_not(finite).astype(skipped.dtype),
    )
