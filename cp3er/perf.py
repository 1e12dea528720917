"""Process-level performance settings for CPU training (docs/performance.md).

``tune_allocator``: glibc returns allocations above 128 KiB to the kernel on ``free``, so an
update's large temporaries are page-faulted in again every update; ``mallopt`` keeps them in
the heap (as ``MALLOC_TOP_PAD_`` / ``MALLOC_TRIM_THRESHOLD_`` or jemalloc would), at the
price of keeping the peak heap. No-op where libc has no ``mallopt`` (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_tuned = False


def tune_allocator(top_pad: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Ask glibc malloc to keep freed memory for reuse; True if it was applied."""
    global _tuned
    if _tuned:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(_M_TOP_PAD, top_pad)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    _tuned = ok
    return ok
