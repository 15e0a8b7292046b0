"""Shared pieces of every rule: the optimizer pair, namespaces, dtypes and argument checks."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from array_api_compat import array_namespace, is_array_api_obj
from array_api_compat import device as _compat_device

__all__ = [
    "Optimizer",
    "check_gradients",
    "check_hyperparameter",
    "check_params",
    "compute_dtype",
    "device_of",
    "namespace_of",
    "zeros_beside",
]


class Optimizer(NamedTuple):
    """A pure optimizer: ``state = init(params)``; ``params, state = update(grads, state, params)``."""

    init: Callable[..., Any]
    update: Callable[..., Any]


def namespace_of(*arrays: Any, xp: Any = None) -> Any:
    """The array-API namespace of ``arrays`` (or ``xp`` when given), with a clear error otherwise."""
    if xp is not None:
        return xp
    torch_xp = _torch_namespace(arrays)
    if torch_xp is not None:
        return torch_xp
    found = [a for a in arrays if is_array_api_obj(a)]
    if not found:
        if any(isinstance(a, str) for a in arrays):
            raise TypeError(_NOT_A_SEQUENCE)
        raise TypeError(
            "cannot infer the array namespace: the inputs are not arrays (shape-only structs such as "
            "jax.ShapeDtypeStruct carry no namespace); pass xp=<namespace> explicitly"
        )
    return array_namespace(*found)


_NOT_A_SEQUENCE = (
    "params must be a sequence of arrays (a list or tuple), but its items are strings: a dict's keys? Pass "
    "list(params.values()), or use nero_optax for a pytree of parameters"
)


def _torch_namespace(arrays: Sequence[Any]) -> Any:
    """array_api_compat's torch namespace where every input is a torch tensor, or None. Found without
    ``array_namespace``, whose cached helpers ``torch.compile`` would trace, with a warning for each."""
    torch = sys.modules.get("torch")
    if torch is None or not arrays or not all(isinstance(a, torch.Tensor) for a in arrays):
        return None
    from array_api_compat import torch as xp

    return xp


def device_of(x: Any) -> Any:
    """The device of an array, as ``array_api_compat.device``; a torch tensor's read directly, because
    ``torch.compile`` traces array_api_compat's cached helpers with a warning for each; None for a JAX tracer (as
    ``array_api_compat`` gives) without asking it: a tracer's ``device`` raises an error whose message walks the whole
    program traced so far, which made tracing a step quadratic in the number of tensors (minutes for STAR on the
    GPT-2-like set)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.device
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.core.Tracer):
        return None
    return _compat_device(x)


def _is_real_floating(xp: Any, dtype: Any) -> bool:
    return any(dtype == getattr(xp, name, None) for name in ("float16", "bfloat16", "float32", "float64")) or (
        xp.isdtype(dtype, "real floating")
    )


def check_params(xp: Any, params: Sequence[Any], what: str = "params") -> None:
    """Every parameter must be a real floating-point array."""
    for i, p in enumerate(params):
        dtype = getattr(p, "dtype", None)
        if dtype is None:
            raise TypeError(_NOT_A_SEQUENCE if isinstance(p, str) else f"{what}[{i}] is a {type(p).__name__}, "
                            f"not an array: {what} must be a sequence of arrays")
        if _is_real_floating(xp, dtype):
            continue
        if xp.isdtype(dtype, "complex floating"):
            raise TypeError(f"{what}[{i}] has complex dtype {dtype}: complex parameters are not supported")
        raise TypeError(f"{what}[{i}] has dtype {dtype}: parameters must be real floating-point arrays")


def check_gradients(xp: Any, grads: Sequence[Any], params: Sequence[Any]) -> None:
    """Gradients must match the parameters one to one, in shape, and be real floating point."""
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    for i, (g, p) in enumerate(zip(grads, params)):
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(p.shape)}")
        if not _is_real_floating(xp, g.dtype):
            kind = "complex" if xp.isdtype(g.dtype, "complex floating") else "non-floating"
            raise TypeError(f"grads[{i}] has {kind} dtype {g.dtype}: gradients must be real floating point")


def check_hyperparameter(name: str, value: Any, *, low: float, high: float, high_open: bool) -> None:
    """Check a number (Python or NumPy scalar) against its range; arrays (traced or scheduled) are taken as given."""
    if not isinstance(value, numbers.Real):
        if is_array_api_obj(value):
            return
        raise TypeError(f"{name} must be a number or a 0-d array, got {value!r}")
    number = float(value)
    bad = not math.isfinite(number) or number < low or (number >= high if high_open else number > high)
    if bad:
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be a finite number in {bound}, got {value!r}")


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype the maths and the state use: float32 for half-precision parameters, else their own."""
    if dtype == xp.float64:
        return xp.float64
    return xp.float32


def zeros_beside(xp: Any, like: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """Zeros on ``like``'s device; ``like`` may be a shape-only struct, which has no device to follow."""
    if is_array_api_obj(like):
        return xp.zeros(shape, dtype=dtype, device=device_of(like))
    return xp.zeros(shape, dtype=dtype)
