"""Branches on array values that still trace: a Python ``if`` on eager arrays, the library's own conditional or a
``where`` on traced ones.

The rules never write ``if x == 0`` themselves: a traced array (under ``jax.jit`` or ``torch.compile``) has no value
to branch on. Yet on eager arrays a branch is what makes a rare case free: a step whose gradients are not finite
need not build the new parameters it throws away, and rows whose closed form cancels need not be recomputed on
every step. These two functions make that choice in one place, with no framework import: JAX's ``lax.cond`` and
torch's ``is_compiling`` are looked up in ``sys.modules`` (where a JAX or torch array exists, its library is
imported).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["blas_flags_quiet", "cond", "is_library", "is_traced", "select"]

T = TypeVar("T")


def is_library(xp: Any, name: str) -> bool:
    """Whether ``xp`` is the namespace of library ``name`` (``"torch"``, ``"jax.numpy"``, ``"numpy"``), itself or
    as array_api_compat wraps it. (array_api_compat's own ``is_*_namespace`` are ``lru_cache``'d, which
    ``torch.compile`` warns about where it traces them.)"""
    return getattr(xp, "__name__", None) in (name, f"array_api_compat.{name}")


def blas_flags_quiet(xp: Any) -> contextlib.AbstractContextManager[Any]:
    """A context in which NumPy ignores the invalid-operation flag over BLAS products, for namespaces whose arrays
    are NumPy's (NumPy, array-api-strict); elsewhere nothing. OpenBLAS's kernels on some CPUs leave that flag set
    on finite inputs (numpy#24067, OpenBLAS#1924), which NumPy then reports as "invalid value encountered in
    matmul": a spurious warning in the user's log, an error under ``-W error``. A non-finite input needs no flag:
    the rules' own check finds it."""
    if is_library(xp, "numpy") or getattr(xp, "__name__", None) == "array_api_strict":
        return sys.modules["numpy"].errstate(invalid="ignore")
    return contextlib.nullcontext()


def is_traced(x: Any, xp: Any) -> bool:
    """Whether the array ``x`` of namespace ``xp`` may have no value to branch on: a JAX tracer (under ``jax.jit``,
    ``vmap``, ``grad``), or a torch tensor while ``torch.compile`` traces."""
    if is_library(xp, "jax.numpy"):
        return isinstance(x, sys.modules["jax"].core.Tracer)
    if is_library(xp, "torch"):
        torch = sys.modules.get("torch")
        return torch is not None and torch.compiler.is_compiling()
    return False


def _where_tree(pred: Any, a: Any, b: Any, xp: Any) -> Any:
    if isinstance(a, (tuple, list)):
        return type(a)(_where_tree(pred, x, y, xp) for x, y in zip(a, b))
    return xp.where(pred, a, b)


def select(pred: Any, if_true: T, if_false: T, xp: Any) -> T:
    """``if_true`` where the 0-d bool ``pred`` holds, else ``if_false`` (arrays, or tuples and lists of them):
    a Python branch on eager arrays, an elementwise ``where`` (which fuses into the code computing them) on traced
    ones."""
    if is_traced(pred, xp):
        return _where_tree(pred, if_true, if_false, xp)
    return if_true if bool(pred) else if_false


def cond(pred: Any, if_true: Callable[[], T], if_false: Callable[[], T], xp: Any) -> T:
    """``if_true()`` where the 0-d bool ``pred`` holds, else ``if_false()``, running one of them where the
    library allows: on eager arrays (a Python branch) and on traced JAX ones (``jax.lax.cond``). Under
    ``torch.compile`` both run and a ``where`` picks."""
    if is_traced(pred, xp):
        if is_library(xp, "jax.numpy"):
            return sys.modules["jax"].lax.cond(pred, if_true, if_false)
        return _where_tree(pred, if_true(), if_false(), xp)
    return if_true() if bool(pred) else if_false()
