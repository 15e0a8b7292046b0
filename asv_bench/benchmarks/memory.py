"""Peak memory of one optimizer step, above what was resident before it.

Host memory (NumPy, torch CPU, JAX CPU) is read from Linux's counters: writing ``5`` to ``/proc/self/clear_refs``
resets the peak resident set size (``VmHWM``), so ``VmHWM`` after a step less ``VmRSS`` before it is the step's
extra memory. This only sees memory the allocator takes from and gives back to the system, so measure in a process
where glibc's malloc maps every large block on its own (:func:`map_large_blocks`, or ``MALLOC_MMAP_THRESHOLD_``
in the environment); freed blocks then leave the resident set at once instead of being reused from the heap. That
changes how fast allocations are, so never time a step in such a process.

Device memory comes from the framework's allocator: torch's peak counter (reset before the step), CuPy's pool size
after emptying its cache (the pool grows to the step's peak), and JAX's ``peak_bytes_in_use`` (which cannot be reset:
it is the process's peak, so read it right after setup).
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["MMAP_THRESHOLD", "host_step_peak", "map_large_blocks"]

MMAP_THRESHOLD = 64 * 1024  # bytes: every block at least this large gets its own mapping
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def map_large_blocks() -> bool:
    """Make glibc malloc map (and unmap on free) every block of MMAP_THRESHOLD bytes or more; False if it can't."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in {_STATUS}")


def host_step_peak(step: Callable[[], object]) -> tuple[int, int]:
    """``(peak, extra)`` resident bytes while ``step()`` runs: the peak, and the peak above the resident set before.

    Raises NotImplementedError where the kernel has no resettable peak (not Linux, or clear_refs not writable).
    """
    if not os.access(_CLEAR_REFS, os.W_OK):
        raise NotImplementedError("host peak memory needs a writable /proc/self/clear_refs (Linux)")
    gc.collect()
    _CLEAR_REFS.write_text("5")  # reset VmHWM to the current VmRSS
    before = _status_bytes("VmRSS")
    step()
    peak = _status_bytes("VmHWM")
    # Pages freed between the reset and the read can leave VmHWM a few pages under the earlier VmRSS.
    return peak, max(0, peak - before)
