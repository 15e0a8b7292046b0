"""Checking an optimizer state read back from a checkpoint before it is used.

A serialiser such as ``flax.serialization.msgpack_restore`` gives back nested dicts of NumPy arrays, and
``flax.serialization.from_bytes(template, data)`` fits the data into the template's containers without comparing
shapes or dtypes. :func:`restore_state` compares what was read with the state ``init`` gives for the current
params, leaf by leaf, and returns a state of the template's own types, or says exactly what does not fit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["restore_state"]


def _key_name(key: Any) -> str:
    """One step of a key path by name alone: ``.v``, ``['v']`` and ``'v'`` in a state dict are the same step."""
    for attribute in ("name", "key", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _by_name(tree: Any) -> dict[tuple[str, ...], tuple[Any, Any]]:
    """Every leaf of ``tree`` under its path of names, with its JAX key path (for messages)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_key_name(k) for k in path): (path, leaf) for path, leaf in flat}


def _describe(paths: list[tuple[str, ...]]) -> str:
    shown = ", ".join("/".join(p) or "<root>" for p in paths[:4])
    return shown + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")


def _concrete(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)


def _restore_leaf(name: str, like: Any, value: Any) -> Any:
    if not hasattr(like, "shape") or not hasattr(like, "dtype"):
        return value  # not an array in the template (a Python scalar, say): taken as saved
    array = value if isinstance(value, (np.ndarray, jax.Array)) else np.asarray(value)
    shape, dtype = tuple(array.shape), np.dtype(array.dtype)
    if shape != tuple(like.shape):
        raise ValueError(f"checkpoint leaf {name} has shape {shape} but this state needs {tuple(like.shape)}")
    if dtype != np.dtype(like.dtype):
        raise ValueError(f"checkpoint leaf {name} has dtype {dtype} but this state needs {np.dtype(like.dtype)}")
    if jnp.issubdtype(array.dtype, jnp.inexact) and not isinstance(array, jax.core.Tracer):
        # Inf is a value some states start with (reduce_on_plateau's best loss): refused only where init's isn't
        infinite_allowed = not _concrete(like) or not bool(jnp.all(jnp.isfinite(like)))
        if bool(jnp.any(jnp.isnan(array))) or not (infinite_allowed or bool(jnp.all(jnp.isfinite(array)))):
            raise ValueError(f"checkpoint leaf {name} holds NaN or Inf: the checkpoint is corrupt")
    if isinstance(like, jax.Array) and not isinstance(like, jax.core.Tracer) and like.committed:
        return jax.device_put(array, like.sharding)  # where init put it (a committed device or a sharding)
    return jnp.asarray(array)


def restore_state(template: Any, loaded: Any) -> Any:
    """A checkpointed optimizer state, checked against ``template`` and rebuilt in its types.

    ``template`` is what ``opt.init(params)`` returns for the current params (``jax.eval_shape(opt.init, params)``
    also works: only structure, shapes and dtypes are read). ``loaded`` is the state as the serialiser gave it
    back: the same containers (``flax.serialization.from_bytes(template, data)``, orbax with a target), or the
    state dict of nested dicts that ``flax.serialization.msgpack_restore`` returns. It works for any optax state:
    ``nero``'s alone, or one inside ``optax.chain``, ``inject_hyperparams`` or ``masked``.

    Every leaf must be where the template has one, with the same shape and dtype, and finite (Inf is kept where
    ``init`` itself gives Inf, as ``optax.contrib.reduce_on_plateau`` does for its best loss); otherwise a
    ``ValueError`` names the leaf and what is wrong (another optimizer's state, a model of other shapes, a run
    in another precision, a corrupt file). Nothing is cast or changed in place: the result is a new state.

    Example::

        data = flax.serialization.to_bytes(state)                   # save
        loaded = flax.serialization.msgpack_restore(data)           # load, in a new process
        state = nero_optax.restore_state(opt.init(params), loaded)
    """
    if not isinstance(loaded, dict) and type(loaded) is not type(template):
        raise ValueError(
            f"checkpoint holds a {type(loaded).__name__} where this optimizer's state is a "
            f"{type(template).__name__}: a state saved by another optimizer?"
        )
    want, got = _by_name(template), _by_name(loaded)
    missing, unexpected = [p for p in want if p not in got], [p for p in got if p not in want]
    if missing or unexpected:
        parts = [f"lacks {_describe(missing)}"] if missing else []
        parts += [f"has {_describe(unexpected)}, which this state does not"] if unexpected else []
        raise ValueError(
            f"checkpoint does not match this optimizer's {type(template).__name__}: it " + " and ".join(parts)
            + " (a state saved by another optimizer, or for other params?)"
        )
    leaves = []
    for names, (path, like) in want.items():
        leaves.append(_restore_leaf(jax.tree_util.keystr(path) or "<root>", like, got[names][1]))
    return jax.tree.structure(template).unflatten(leaves)
