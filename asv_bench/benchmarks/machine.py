"""The machine a measurement ran on, recorded beside it: a ratio means little without the machine that gave it.

:func:`describe` returns the CPU model and vector extensions, its caches, the logical CPUs this process may use,
the threads each framework runs with, the memory, the load average and the memory bandwidth measured by a copy in
the same run (:func:`copy_bandwidth`). An optimizer step is memory-bound where it is written well, so the copy
bandwidth is the figure that step times scale with from one machine to the next.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = ["copy_bandwidth", "describe", "summary"]

_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_VECTOR_FLAGS = ("avx512f", "avx2", "avx", "sse4_2", "neon", "asimd", "sve")


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second moved by one thread copying ``mib`` MiB into another array (read plus written), best of
    ``repeats`` after a first copy that faults the pages in."""
    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _caches() -> dict[str, str]:
    """``{"L1d": "48K", "L2": "2048K", ...}`` for the first CPU, from sysfs (empty where there is none)."""
    out = {}
    for index in sorted(_CACHES.glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        out[f"L{level}{suffix}"] = size
    return out


def _threads() -> dict[str, object]:
    threads: dict[str, object] = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if "torch" in sys.modules:
        threads["torch"] = sys.modules["torch"].get_num_threads()
    if os.environ.get("XLA_FLAGS"):
        threads["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    return threads


def describe(bandwidth: bool = True) -> dict[str, object]:
    """The machine and this process's view of it; ``bandwidth`` measures the copy bandwidth (about a second)."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", cpu.get("Features", "")).split())
    info: dict[str, object] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "vector": [f for f in _VECTOR_FLAGS if f in flags],
        "caches": _caches(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": _threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }
    if bandwidth:
        info["copy_gb_per_s"] = round(copy_bandwidth() / 1e9, 2)
    for module in ("numpy", "torch", "jax", "optax"):
        if module in sys.modules:
            info[module] = sys.modules[module].__version__
    return info


def summary(info: dict[str, object]) -> str:
    """One line for a table's caption: CPU, vector extensions, caches, threads, copy bandwidth and load."""
    caches = ", ".join(f"{k} {v}" for k, v in info.get("caches", {}).items())  # type: ignore[union-attr]
    threads = ", ".join(f"{k} {v}" for k, v in info.get("threads", {}).items() if v is not None)  # type: ignore[union-attr]
    parts = [
        f"{info['cpu']} ({'/'.join(info.get('vector', [])) or 'no vector flags read'})",  # type: ignore[arg-type]
        caches or "caches unknown",
        f"{info['cpus_usable']} of {info['cpus']} CPUs usable",
        f"threads: {threads or 'defaults'}",
        f"{info['memory_gib']} GiB",
    ]
    if "copy_gb_per_s" in info:
        parts.append(f"copy bandwidth {info['copy_gb_per_s']} GB/s (1 thread, 256 MiB)")
    parts.append(f"load average {info['load_average']}")
    return "; ".join(parts)
