"""Build and cache the adapters' native kernels (``nero_torch._native``, ``nero_optax._native``).

A kernel is one source file that the system's compiler turns into a shared library on first use. The library is
cached in ``$NERO_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/nero-core/kernels``, else ``~/.cache/nero-core/kernels``,
under a name keyed by everything that changes the binary: the source, the compiler (as named, and its
``--version``), the flags and libraries, the caller's ``key`` (the version of a framework whose headers it
includes) and this CPU (its architecture and instruction-set flags, for ``-march=native``). It is built once per
machine and configuration.

Processes that build the same library at once (DDP ranks, pytest-xdist workers) each compile into a temporary
directory of their own inside the cache and rename the result into place. A rename is atomic, so every process
loads a whole library, never a half-written one; the last rename replaces a file with an identical one. Each
library ends in the SHA-256 of its bytes (the loader ignores bytes past the ELF image), checked before it is
loaded: a damaged file (truncated on a full disk, say) would load and then crash when called, so it is rebuilt.

Where a kernel cannot be built or loaded, :func:`load_library` returns None and warns once, naming the cause and
the fix, and the caller uses its framework's own kernels (the same maths).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Unavailable", "cache_dir", "compiler_runs", "load_library", "warn_unavailable"]

# Per language: the variable that names its compiler, and a compiler to install.
_COMPILERS = {"C": ("CC", "gcc"), "C++": ("CXX", "g++")}
_SEAL = b"nero-core kernel sha256:"


class Unavailable(Exception):
    """Why a kernel cannot be had here (``cause``) and what the user can do about it (``fix``)."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(cause)
        self.cause, self.fix = cause, fix


def warn_unavailable(who: str, why: Unavailable, fallback: str, stacklevel: int = 2) -> None:
    """The one warning a caller gives when its kernel is unavailable: ``who``, the cause, what runs instead, the
    fix."""
    warnings.warn(f"{who}: {why.cause}; using {fallback}. {why.fix}", RuntimeWarning, stacklevel=stacklevel + 1)


def cache_dir() -> Path:
    """Where kernels are cached: ``$NERO_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/nero-core/kernels`` (an absolute
    path, as the XDG spec requires), else ``~/.cache/nero-core/kernels``."""
    if os.environ.get("NERO_KERNEL_CACHE"):
        return Path(os.environ["NERO_KERNEL_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "nero-core" / "kernels"
    try:
        return Path.home() / ".cache" / "nero-core" / "kernels"
    except RuntimeError as error:  # no HOME and no password-file entry (a container's arbitrary user)
        raise Unavailable(f"could not build the CPU kernel (no cache directory: {error})",
                          "Set NERO_KERNEL_CACHE to a writable directory.") from None


def _cpu_key() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return platform.machine() + flags


@functools.cache
def _compiler_version(compiler: str, language: str) -> str:
    """``compiler --version``, or Unavailable where it does not run."""
    variable, _ = _COMPILERS[language]
    try:
        return subprocess.run([compiler, "--version"], check=True, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise Unavailable(
            f"could not build the CPU kernel (the {language} compiler {compiler!r} does not run: {error})",
            f"Set {variable} to a working {language} compiler.",
        ) from None


def compiler_runs(compiler: str | None, language: str = "C") -> bool:
    """Whether ``compiler`` is given and answers ``--version``."""
    try:
        return compiler is not None and bool(_compiler_version(compiler, language))
    except Unavailable:
        return False


def load_library(
    source: Path, compiler: str | None, flags: Sequence[str], *, who: str, fallback: str, language: str = "C",
    libs: Sequence[str] = (), key: str = "",
) -> ctypes.CDLL | None:
    """``source`` compiled (once, then cached) and loaded, or None with a warning that names ``who``, the cause,
    what runs instead (``fallback``) and the fix. ``libs`` follow the source on the command line; ``key`` adds to
    the cache key (a header version, say)."""
    try:
        return _load(source, compiler, list(flags), list(libs), key, language)
    except Unavailable as why:
        warn_unavailable(who, why, fallback, stacklevel=3)
        return None


def _load(source: Path, compiler: str | None, flags: list[str], libs: list[str], key: str,
          language: str) -> ctypes.CDLL:
    variable, package = _COMPILERS[language]
    if compiler is None:
        raise Unavailable(f"no {language} compiler found", f"For its faster CPU kernel install one (Debian: apt-get "
                                                            f"install {package}) or set {variable}.")
    try:
        text = source.read_bytes()
    except OSError as error:
        raise Unavailable(f"could not build the CPU kernel (cannot read its source: {error})",
                          "Reinstall nero-core: its wheel ships the source.") from None
    identity = "\0".join([compiler, _compiler_version(compiler, language), *flags, *libs, key, _cpu_key()])
    digest = hashlib.sha256(text + identity.encode()).hexdigest()[:16]
    path = cache_dir() / f"{source.parent.name}{source.stem}-{digest}.so"
    if not _intact(path):
        _build(source, compiler, flags, libs, path, variable)
    try:
        return ctypes.CDLL(str(path))
    except OSError as error:  # a runtime library (libgomp) gone since it was built, a file the loader rejects
        raise Unavailable(f"could not load the CPU kernel {path} ({error})",
                          f"Delete {path} to rebuild it, or install the runtime library the error names.") from None


def _seal(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).digest()
    with path.open("ab") as file:
        file.write(_SEAL + digest)


def _intact(path: Path) -> bool:
    """Whether ``path`` is a library as :func:`_seal` left it."""
    try:
        data = path.read_bytes()
    except OSError:  # not there (yet), or unreadable: build it
        return False
    size = len(_SEAL) + hashlib.sha256().digest_size
    return data[-size:] == _SEAL + hashlib.sha256(data[:-size]).digest()


def _build(source: Path, compiler: str, flags: list[str], libs: list[str], path: Path, variable: str) -> None:
    """Compile into a temporary directory of the cache, then rename into place (atomic)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.TemporaryDirectory(dir=path.parent, ignore_cleanup_errors=True)
    except OSError as error:  # read-only, not a directory, no permission
        raise Unavailable(f"could not build the CPU kernel (the kernel cache {path.parent} is not writable: {error})",
                          "Set NERO_KERNEL_CACHE to a writable directory.") from None
    with tmp:
        built = Path(tmp.name) / path.name
        try:
            run = subprocess.run([compiler, *flags, str(source), "-o", str(built), *libs], capture_output=True,
                                 text=True)
            if run.returncode == 0:
                _seal(built)
                os.replace(built, path)
        except OSError as error:
            raise Unavailable(f"could not build the CPU kernel ({error})",
                              f"Set {variable} to a working compiler, or NERO_KERNEL_CACHE to a writable directory.") \
                from None
    if run.returncode != 0:
        detail = " ".join((run.stderr or run.stdout).strip().splitlines()[-3:])[-600:]
        raise Unavailable(f"could not build the CPU kernel ({compiler} failed: {detail})",
                          f"Set {variable} to a GCC or Clang that accepts {' '.join(flags)}.")
