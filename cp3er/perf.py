"""Process-level performance settings for CPU training (see docs/performance.md).

``tune_allocator``: glibc's malloc serves every allocation above 128 KiB with a fresh
``mmap`` and returns it to the kernel on ``free``, so each of an update's large temporary
tensors (a batch of 256 conv activations is 40-50 MB) is page-faulted in again, every
update. Keeping freed memory in the heap (``M_TOP_PAD`` 1 GiB, ``M_TRIM_THRESHOLD``
2 GiB, set with ``mallopt``) saves about a third of a pixel update on CPU
(docs/performance.md, "Measurements behind code choices"). The same effect as the
environment variables ``MALLOC_TOP_PAD_`` / ``MALLOC_TRIM_THRESHOLD_`` or a caching
allocator (jemalloc, tcmalloc) via ``LD_PRELOAD``, without either. The price: the
process keeps its peak heap instead of returning it.
No-op (returns False) where the C library has no ``mallopt`` (macOS, musl, Windows).
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
