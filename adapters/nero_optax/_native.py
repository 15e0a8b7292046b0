"""The CPU kernel of ``nero_optax.nero``'s fused step: ``_native.cc``, an XLA FFI custom call, compiled on first
use with the system's C++ compiler against the headers jaxlib ships, cached (see ``nero_core._kernels``) and
registered with JAX.

It reads a neuron tensor's gradient and weights once for the five per-neuron sums the step needs before it
writes; without it XLA on CPU reads each of them once per sum it takes. Where it does not apply (another
platform, more than one device, a dtype other than float32/float64, neurons on a middle axis) or cannot be
built, :func:`sums` is not used and the step takes the sums with ``jnp.sum``: the same maths.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nero_core._kernels import Unavailable, load_library, warn_unavailable

__all__ = ["applies", "sums"]

SOURCE = Path(__file__).with_name("_native.cc")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp-simd", "-fPIC", "-shared", "-ffp-contract=off", "-w"]
TARGET = "nero_optax_sums"
WHO, FALLBACK = "nero_optax.nero", "XLA's reductions"
_handler: list[Any] = []  # the library whose NeroSums is registered for TARGET, kept loaded


@functools.cache
def _registered() -> bool:
    """Build, load and register the custom call once per process; False (with a warning) where it cannot be."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    include = Path(jax.ffi.include_dir())
    if compiler is not None and not (include / "xla" / "ffi" / "api" / "ffi.h").is_file():
        why = Unavailable(f"could not build the CPU kernel (jaxlib's XLA FFI headers are not in {include})",
                          "Reinstall jaxlib from its wheel, which ships them.")
        warn_unavailable(WHO, why, FALLBACK, stacklevel=3)
        return False
    lib = load_library(SOURCE, compiler, [*FLAGS, f"-I{include}"], who=WHO, fallback=FALLBACK, language="C++",
                       key=jax.__version__)
    if lib is None:
        return False
    if not _handler:  # once per process: XLA refuses a second handler for the target
        _handler.append(lib)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.NeroSums), platform="cpu")
    return True


def applies(w: Any, axis: int) -> bool:
    """Whether :func:`sums` serves a tensor (its weights in the compute dtype) with neurons on ``axis``."""
    return (
        w.ndim >= 2 and axis % w.ndim in (0, w.ndim - 1) and w.dtype in (jnp.float32, jnp.float64)
        and jax.default_backend() == "cpu" and jax.device_count() == 1 and _registered()
    )


def sums(g: Any, w: Any, axis: int) -> tuple[Any, Any, Any, Any, Any]:
    """Per neuron ``sum(w)``, ``|w|^2``, ``sum(g)``, ``|g|^2`` and ``<w, g>`` in one read of ``g`` and ``w`` (see
    :func:`applies`): the sums ``nero_core``'s ``row_factors`` takes, in its order."""
    last = axis % g.ndim == g.ndim - 1
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((5, g.shape[axis]), g.dtype), vmap_method="sequential")(
        g, w, neurons_last=np.int64(last)
    )
    return out[0], out[1], out[2], out[3], out[4]
