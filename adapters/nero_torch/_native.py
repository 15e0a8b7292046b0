"""The CPU kernel of ``Nero(fused=True)``: ``_native.c``, compiled on first use with the system's C compiler.

The shared library is cached under ``$NERO_KERNEL_CACHE`` (default ``~/.cache/nero-core/kernels``), keyed by the
source, the compiler and this CPU's instruction set, so it is built once per machine (about a second). Without a
working compiler, :func:`library` returns None and ``Nero`` uses its torch kernels instead (the same maths).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["CENTRE", "NORMALISE", "Batch", "apply", "library", "new_v", "step"]

SOURCE = Path(__file__).with_name("_native.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
CENTRE, NORMALISE = 1, 2
_I64 = ctypes.POINTER(ctypes.c_int64)
_F64 = ctypes.POINTER(ctypes.c_double)


def _cpu_key() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return platform.machine() + flags


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with a warning) where they cannot be built here."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("Nero(fused=True): no C compiler found; using the torch kernels", RuntimeWarning, stacklevel=3)
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode() + _cpu_key().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("NERO_KERNEL_CACHE", Path.home() / ".cache" / "nero-core" / "kernels"))
    path = cache / f"nero_native_{key}.so"
    if not path.is_file():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = Path(tmp) / path.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True,
                               capture_output=True, text=True)
                os.replace(built, path)  # atomic: concurrent builders never load a half-written file
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or error
            warnings.warn(f"Nero(fused=True): could not build the CPU kernel ({detail}); using the torch kernels",
                          RuntimeWarning, stacklevel=3)
            return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:  # a truncated file in the cache, a runtime library gone since it was built
        warnings.warn(f"Nero(fused=True): could not load the CPU kernel {path} ({error}); using the torch kernels",
                      RuntimeWarning, stacklevel=3)
        return None
    for suffix in ("f32", "f64"):
        sums = getattr(lib, f"nero_row_sums_{suffix}")
        sums.restype = ctypes.c_int
        sums.argtypes = [ctypes.c_int64, _I64, _I64, _I64, _I64, _I64, _F64, _F64, ctypes.c_int]
        step = getattr(lib, f"nero_apply_{suffix}")
        step.restype = None
        step.argtypes = [ctypes.c_int64] + [_I64] * 9 + [_F64, _F64, _F64, ctypes.c_int]
        one_pass = getattr(lib, f"nero_step_{suffix}")
        one_pass.restype = ctypes.c_int64
        one_pass.argtypes = [ctypes.c_int64] + [_I64] * 8 + [_F64, _F64, ctypes.c_int]
    return lib


def _suffix(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float64: "f64"}[dtype]


def _int64s(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _ptr(t: Tensor, kind=_I64):
    return ctypes.cast(t.data_ptr(), kind)


class Batch:
    """Tensors of one dtype laid out for the kernels: pointers, row counts and lengths, row offsets, and the
    new ``v`` of every row (phase one's result, phase two's input)."""

    def __init__(self, grads: list[Tensor], states: list[dict[str, Tensor]], shapes: list[tuple[int, int]],
                 betas: list[float]):
        self.dtype = grads[0].dtype
        self.count = len(grads)
        self.rows = _int64s([n for n, _ in shapes])
        self.cols = _int64s([k for _, k in shapes])
        self.offsets = _int64s([0] + [n for n, _ in shapes][:-1]).cumsum(0)
        self.v_new = torch.empty(int(self.rows.sum()), dtype=torch.float64)
        self.betas = torch.tensor(betas, dtype=torch.float64)
        # every tensor whose address goes to C is held here until the batch is dropped
        self.tensors = grads, states
        self.grads = _int64s([g.data_ptr() for g in grads])
        self.v, self.sigma, self.step = (_int64s([s[key].data_ptr() for s in states]) for key in ("v", "sigma", "step"))


def _per_tensor(params: list[Tensor], flags: list[int], lrs: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    return _int64s([t.data_ptr() for t in params]), _int64s(flags), torch.tensor(lrs, dtype=torch.float64)


def new_v(batch: Batch) -> bool:
    """Phase one: every row's new ``v`` into ``batch`` (nothing written to the state); True when all are finite."""
    fn = getattr(library(), f"nero_row_sums_{_suffix(batch.dtype)}")
    finite = fn(batch.count, _ptr(batch.grads), _ptr(batch.v), _ptr(batch.rows), _ptr(batch.cols),
                _ptr(batch.offsets), _ptr(batch.betas, _F64), _ptr(batch.v_new, _F64), torch.get_num_threads())
    return bool(finite)


def apply(batch: Batch, params: list[Tensor], flags: list[int], lrs: list[float]) -> None:
    """Phase two: update every parameter, its ``v`` and its ``step`` in place (``lrs`` signed: negative to
    maximise)."""
    fn = getattr(library(), f"nero_apply_{_suffix(batch.dtype)}")
    p, flag_bits, lr = _per_tensor(params, flags, lrs)
    fn(batch.count, _ptr(p), _ptr(batch.grads), _ptr(batch.v), _ptr(batch.sigma), _ptr(batch.step),
       _ptr(batch.rows), _ptr(batch.cols), _ptr(flag_bits), _ptr(batch.offsets), _ptr(batch.v_new, _F64),
       _ptr(lr, _F64), _ptr(batch.betas, _F64), torch.get_num_threads())


def step(batch: Batch, params: list[Tensor], flags: list[int], lrs: list[float]) -> int:
    """The whole step in one pass (``skip_nonfinite="neuron"``): a row whose new ``v`` is not finite keeps its
    weights and ``v``; returns how many rows did."""
    fn = getattr(library(), f"nero_step_{_suffix(batch.dtype)}")
    p, flag_bits, lr = _per_tensor(params, flags, lrs)
    return int(fn(batch.count, _ptr(p), _ptr(batch.grads), _ptr(batch.v), _ptr(batch.sigma), _ptr(batch.step),
                  _ptr(batch.rows), _ptr(batch.cols), _ptr(flag_bits), _ptr(lr, _F64), _ptr(batch.betas, _F64),
                  torch.get_num_threads()))
