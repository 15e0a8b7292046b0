"""The CPU kernel of ``Nero(fused=True)``: ``_native.c``, compiled on first use with the system's C compiler.

The shared library is cached (``nero_core._kernels``: ``$NERO_KERNEL_CACHE``, else under ``$XDG_CACHE_HOME`` or
``~/.cache``), keyed by the source, the compiler, its flags and this CPU's instruction set, so it is built once per
machine (about a second). Where it cannot be built here (no compiler, or one that fails), the wheel's own build of
the same source is loaded instead (:func:`prebuilt`: ``setup.py`` builds it for x86-64 CPUs with AVX2, where the
wheel is built). Without either, :func:`library` returns None and ``Nero`` uses its torch kernels instead (the same
maths): ``torch.compile``'d ones where :func:`compiles`, else the eager ones. It includes no torch header, so
torch's version is not part of its key.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import Tensor

from nero_core._kernels import Unavailable, compiler_runs, load_library, warn_unavailable

__all__ = ["CENTRE", "NORMALISE", "Batch", "apply", "built", "compiles", "library", "new_v", "prebuilt", "step"]

SOURCE = Path(__file__).with_name("_native.c")
FLAGS = [
    "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
]
CENTRE, NORMALISE = 1, 2
_I64 = ctypes.POINTER(ctypes.c_int64)
_F64 = ctypes.POINTER(ctypes.c_double)


def _prebuilt_path() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = SOURCE.with_name("_native_prebuilt" + suffix)
        if path.is_file():
            return path
    return None


# The wheel's build of _native.c (setup.py: -O3 -mavx2, the same maths flags), None where the wheel has none.
PREBUILT = _prebuilt_path()
PREBUILT_CPUS = ("AVX2", "AVX512")  # torch's names for the CPUs that run it


@functools.cache
def prebuilt() -> ctypes.CDLL | None:
    """The wheel's own build of the kernels, where it has one, this CPU runs it (AVX2) and it was built from this
    :data:`SOURCE` (a digest in the library says), else None: what ``Nero`` loads where the kernel cannot be built
    here. Its OpenMP runtime (``libgomp.so.1``) is torch's own, already loaded where the system has none."""
    if PREBUILT is None or torch.backends.cpu.get_cpu_capability() not in PREBUILT_CPUS:
        return None
    try:
        lib = ctypes.CDLL(str(PREBUILT))
    except OSError:  # (a damaged install: the torch kernels then, as without it)
        return None
    try:
        source = SOURCE.read_bytes()
    except OSError:  # (the source cannot be read to compare: the two came in one wheel)
        return declared(lib)
    try:
        digest = (ctypes.c_char * 17).in_dll(lib, "nero_source_digest").value.decode()
    except ValueError:
        digest = None
    if digest != hashlib.sha256(source).hexdigest()[:16]:  # built from another source (a stale in-place build)
        return None
    return declared(lib)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built here, else the wheel's :func:`prebuilt` ones, without a word), or None (with a
    warning) where neither can be had."""
    if prebuilt() is not None:  # built here where that works, else the wheel's build (built() says which), silently
        return built()
    compiler = _compiler()
    if not compiler_runs(compiler) and not compiles("cpu"):  # no compiler works: compiles() gave the one warning
        return None
    lib = load_library(SOURCE, compiler, FLAGS, libs=["-lm"], who="Nero(fused=True)", fallback="the torch kernels")
    return None if lib is None else declared(lib)


@functools.cache
def built() -> ctypes.CDLL | None:
    """The kernels compiled here where they build, else the wheel's (:func:`prebuilt`), else None, without a word:
    for the default ``fused=None``, which takes them where it can and torch's kernels otherwise (``fused=True``
    asked for them: :func:`library` says why not)."""
    compiler = _compiler()
    if not compiler_runs(compiler):
        return prebuilt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lib = load_library(SOURCE, compiler, FLAGS, libs=["-lm"], who="Nero", fallback="the torch kernels")
    return prebuilt() if lib is None else declared(lib)


def _loaded() -> ctypes.CDLL:
    lib = built() or library()
    assert lib is not None, "the C kernel was called where it could not be built"
    return lib


def declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (a build of ``_native.c``) with its kernels' C signatures declared to ctypes."""
    for suffix in ("f32", "f64"):
        check = getattr(lib, f"nero_check_{suffix}")
        check.restype = ctypes.c_int
        check.argtypes = [ctypes.c_int64] + [_I64] * 4 + [_F64, ctypes.c_int]
        step = getattr(lib, f"nero_step_{suffix}")
        step.restype = ctypes.c_int64
        step.argtypes = [ctypes.c_int64] + [_I64] * 8 + [_F64, _F64, ctypes.c_int]
    return lib


@functools.cache
def compiles(device_type: str) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device_type`` here: False (with one warning) on a CPU
    without the C++ compiler that Inductor needs for its CPU kernels."""
    if device_type != "cpu":
        return True
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: let torch.compile say for itself
        return True
    try:
        get_cpp_compiler()
    except Exception as error:  # torch._inductor.exc.InvalidCxxCompiler
        why = Unavailable(f"torch.compile finds no C++ compiler for its CPU kernels ({type(error).__name__})",
                          "For the compiled kernels install one (Debian: apt-get install g++) or set CXX; with a C "
                          "compiler too (gcc, or CC) Nero builds its faster C kernel.")
        warn_unavailable("Nero(fused=True)", why, "the eager torch kernels", stacklevel=3)
        return False
    return True


def _suffix(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float64: "f64"}[dtype]


def _int64s(values: list[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _doubles(values: list[float]) -> ctypes.Array:
    return (ctypes.c_double * len(values))(*values)


class Batch:
    """Tensors of one dtype laid out for the kernels (as ctypes arrays, cheaper to build each step than tensors):
    pointers, row counts and lengths, and each tensor's beta."""

    def __init__(self, grads: list[Tensor], states: list[dict[str, Tensor]], shapes: list[tuple[int, int]],
                 betas: list[float]):
        self.dtype = grads[0].dtype
        self.count = len(grads)
        self.rows = _int64s([n for n, _ in shapes])
        self.cols = _int64s([k for _, k in shapes])
        self.betas = _doubles(betas)
        # every tensor whose address goes to C is held here until the batch is dropped
        self.tensors = grads, states
        self.grads = _int64s([g.data_ptr() for g in grads])
        self.v, self.sigma, self.step = (_int64s([s[key].data_ptr() for s in states]) for key in ("v", "sigma", "step"))


def new_v(batch: Batch) -> bool:
    """Phase one: whether every row's new ``v`` is finite (one read of the gradients; nothing written). Phase two
    computes the same ``v`` again, in the same order, from the gradient rows it reads anyway."""
    fn = getattr(_loaded(), f"nero_check_{_suffix(batch.dtype)}")
    return bool(fn(batch.count, batch.grads, batch.v, batch.rows, batch.cols, batch.betas, torch.get_num_threads()))


def _per_tensor(params: list[Tensor], flags: list[int], lrs: list[float]) -> tuple[ctypes.Array, ...]:
    return _int64s([t.data_ptr() for t in params]), _int64s(flags), _doubles(lrs)


def apply(batch: Batch, params: list[Tensor], flags: list[int], lrs: list[float]) -> None:
    """Phase two, after :func:`new_v` found every new ``v`` finite: update every parameter, its ``v`` and its
    ``step`` in place (``lrs`` signed: negative to maximise)."""
    _step(batch, params, flags, lrs)


def step(batch: Batch, params: list[Tensor], flags: list[int], lrs: list[float]) -> int:
    """The whole step in one pass (``skip_nonfinite="neuron"``): a row whose new ``v`` is not finite keeps its
    weights and ``v``; returns how many rows did."""
    return _step(batch, params, flags, lrs)


def _step(batch: Batch, params: list[Tensor], flags: list[int], lrs: list[float]) -> int:
    fn = getattr(_loaded(), f"nero_step_{_suffix(batch.dtype)}")
    p, flag_bits, lr = _per_tensor(params, flags, lrs)
    return int(fn(batch.count, p, batch.grads, batch.v, batch.sigma, batch.step, batch.rows, batch.cols, flag_bits,
                  lr, batch.betas, torch.get_num_threads()))
