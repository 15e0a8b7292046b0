"""Build and cache the adapters' native kernels (``nero_torch._native``, ``nero_optax._native``).

A kernel is one source file compiled on first use with the system's compiler into a shared library, cached under
``$NERO_KERNEL_CACHE`` (default ``~/.cache/nero-core/kernels``) and keyed by the source, the compiler, its flags
and this CPU's instruction set, so it is built once per machine. Where it cannot be built or loaded, the caller
gets None and a warning, and uses its framework's own kernels instead (the same maths).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["load_library"]


def _cpu_key() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return platform.machine() + flags


def load_library(
    source: Path, compiler: str | None, flags: Sequence[str], *, who: str, fallback: str, language: str = "C",
    libs: Sequence[str] = (), key: str = "",
) -> ctypes.CDLL | None:
    """``source`` compiled (once, then cached) and loaded, or None with a warning that names ``who`` and says
    what runs instead (``fallback``). ``libs`` follow the source on the command line; ``key`` adds to the cache key
    (a header version, say)."""
    if compiler is None:
        warnings.warn(f"{who}: no {language} compiler found; using {fallback}", RuntimeWarning, stacklevel=3)
        return None
    text = source.read_bytes()
    command = " ".join([compiler, *flags, *libs, key])
    digest = hashlib.sha256(text + command.encode() + _cpu_key().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("NERO_KERNEL_CACHE", Path.home() / ".cache" / "nero-core" / "kernels"))
    path = cache / f"{source.stem.lstrip('_')}_{digest}.so"
    if not path.is_file():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = Path(tmp) / path.name
                subprocess.run([compiler, *flags, str(source), "-o", str(built), *libs], check=True,
                               capture_output=True, text=True)
                os.replace(built, path)  # atomic: concurrent builders never load a half-written file
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or error
            warnings.warn(f"{who}: could not build the CPU kernel ({detail}); using {fallback}", RuntimeWarning,
                          stacklevel=3)
            return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as error:  # a truncated file in the cache, a runtime library gone since it was built
        warnings.warn(f"{who}: could not load the CPU kernel {path} ({error}); using {fallback}", RuntimeWarning,
                      stacklevel=3)
        return None
