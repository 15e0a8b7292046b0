"""Per-leaf options for a pytree of parameters: which leaves are floating point and where their neurons are.

``neuron_axis`` may be an int or None for every leaf, a pytree matching the parameters, or a callable
``(path, leaf) -> int | None`` (``path`` is a JAX key path, as from ``jax.tree_util.tree_flatten_with_path``).
Errors name the leaf by its key path, so that a user can find it in their model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nero_core

__all__ = [
    "NeuronAxisTree", "check_floating", "check_shapes", "flax_neuron_axis", "flax_rule", "leaf_name",
    "leaf_neuron_axes", "leaf_settings",
]

NeuronAxisTree = Union[int, None, Any, Callable[[tuple[Any, ...], Any], Union[int, None]]]


def _name(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def check_floating(paths: Sequence[tuple[Any, ...]], leaves: Sequence[Any], what: str = "params") -> None:
    """Every leaf must be a real floating-point array (bfloat16 and float16 included)."""
    for path, leaf in zip(paths, leaves):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            raise TypeError(f"{what} leaf {_name(path)} is a {type(leaf).__name__}, not an array")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{what} leaf {_name(path)} has dtype {dtype}: Nero needs real floating-point leaves; filter the "
                "tree to trainable float arrays (eqx.filter(model, eqx.is_inexact_array)) or leave the others "
                "out with optax.masked / optax.partition"
            )


def check_shapes(
    paths: Sequence[tuple[Any, ...]], leaves: Sequence[Any], shapes: Sequence[tuple[int, ...]], what: str, why: str
) -> None:
    """Every leaf must have exactly its expected shape (no broadcasting); ``why`` says where that shape comes from."""
    for path, leaf, shape in zip(paths, leaves, shapes):
        if tuple(leaf.shape) != tuple(shape):
            raise ValueError(f"{what} leaf {_name(path)} has shape {tuple(leaf.shape)} but needs {tuple(shape)}, {why}")


def _is_function(neuron_axis: Any) -> bool:
    # An Equinox module is callable but is a pytree node; a plain function is a pytree leaf.
    return callable(neuron_axis) and jax.tree_util.treedef_is_leaf(jax.tree.structure(neuron_axis))


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _per_leaf(
    neuron_axis: NeuronAxisTree, paths: Sequence[tuple[Any, ...]], leaves: Sequence[Any], treedef: Any
) -> list:
    if neuron_axis is None or isinstance(neuron_axis, (int, np.integer)):
        return [neuron_axis] * len(leaves)
    if isinstance(neuron_axis, (jax.Array, np.ndarray)):
        raise TypeError(
            "neuron_axis arrived as an array: optax.inject_hyperparams turns int arguments into arrays. "
            "Keep it static: optax.inject_hyperparams(nero_optax.nero, static_args='neuron_axis')"
        )
    if _is_function(neuron_axis):
        return [None if _is_masked(leaf) else neuron_axis(path, leaf) for path, leaf in zip(paths, leaves)]
    try:
        return treedef.flatten_up_to(neuron_axis)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"neuron_axis must be an int, None, a callable (path, leaf) -> int | None, or a pytree with the same "
            f"structure as params; the tree given does not match params ({treedef}): {exc}"
        ) from None


def _checked(axis: Any, path: tuple[Any, ...], shape: tuple[int, ...]) -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"neuron_axis for leaf {_name(path)} must be an int or None, got {axis!r}")
    if len(shape) >= 2 and not -len(shape) <= axis < len(shape):
        raise ValueError(f"neuron_axis {axis} is out of range for leaf {_name(path)} of shape {shape}")
    return int(axis)


def leaf_settings(neuron_axis: NeuronAxisTree, params: Any) -> list[tuple[tuple[Any, ...], Any, int | None]]:
    """``(path, leaf, axis)`` for every leaf of ``params``, in leaf order: the axis ``neuron_axis`` gives it,
    checked but not yet resolved by the core's rule (a fan-in 1 leaf may still be bias-like).

    Leaves that ``optax.masked`` or ``optax.partition`` left out (``MaskedNode``) still line up with a
    ``neuron_axis`` tree given for the whole model, and are dropped from the result.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)
    given = _per_leaf(neuron_axis, [path for path, _ in flat], [leaf for _, leaf in flat], treedef)
    return [
        (path, leaf, _checked(axis, path, tuple(leaf.shape)))
        for (path, leaf), axis in zip(flat, given) if not _is_masked(leaf)
    ]


def leaf_neuron_axes(neuron_axis: NeuronAxisTree, params: Any) -> tuple[int | None, ...]:
    """The resolved neuron axis of every leaf of ``params`` (None for bias-like leaves), in leaf order."""
    settings = leaf_settings(neuron_axis, params)
    return nero_core.neuron_axes([tuple(leaf.shape) for _, leaf, _ in settings], [a for _, _, a in settings])


def leaf_name(path: tuple[Any, ...]) -> str:
    """A leaf's own name, the last key of its path, past the ``.value`` that ends a Flax NNX ``Variable``'s path
    (``['attn']['query']['bias'].value`` is ``bias``)."""
    keys = list(path)
    if len(keys) > 1 and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name in ("value", "raw_value"):
        keys.pop()
    if not keys:
        return ""
    key = keys[-1]
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def flax_rule(path: tuple[Any, ...], leaf: Any) -> tuple[int | None, str]:
    """:func:`flax_neuron_axis` with the reason for its choice."""
    name = leaf_name(path)
    if name == "embedding":
        return 0, "Flax rule: an Embed table (vocab, features), one neuron per row"
    if name == "bias":
        return None, "Flax rule: a bias, bias-like whatever its shape"
    return -1, "Flax rule: a kernel (..., in, out)"


def flax_neuron_axis(path: tuple[Any, ...], leaf: Any) -> int | None:
    """Neuron axis for Flax (Linen or NNX) models: 0 for ``embedding`` tables ``(vocab, features)``, None
    (bias-like) for every ``bias``, else -1.

    Flax kernels are ``(in, out)`` and ``(kh, kw, in, out)``, so their neurons are the last axis; an
    embedding table holds one vector per token along its first axis. Biases are bias-like whatever their shape:
    an attention layer's are ``(heads, head_dim)``. Leaves are named by the last key of their path, past the
    ``.value`` of NNX variables, so the rule is the same for Linen and NNX. Pass it as ``neuron_axis``.
    """
    return flax_rule(path, leaf)[0]
