"""Giving the heap back after bursts (glibc malloc; issue 7: resident memory).

The gateway's heap grows during a burst of traffic (relay frames, batches, SQLite pages) and glibc keeps the
freed pages: the main arena returns memory only from its top, so one live block above them pins megabytes.
`malloc_trim(0)` returns every free page of every arena (since glibc 2.8 also pages inside the heap). The daemon
calls it once start-up is done and when a burst has ended, in a worker thread (it takes up to ~10 ms on a
fragmented heap and releases the GIL). It does not lower the peak of a burst, only what stays after it.

Only on glibc (musl and others: nothing is done), and failure-tolerant: without the symbol nothing changes.
`AGW_MALLOC_TRIM=off` disables it (e.g. to compare memory figures). Measured in docs/performance.md
(2026-12-07 07:00 UTC): idle -1.0 MB; fixing M_MMAP_THRESHOLD as well cost ~15% more CPU per 16 KiB message
for no lower peak, so the daemon leaves glibc's other settings alone.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

_libc: Any = None
_lock = threading.Lock()


def _glibc() -> Any:
    """glibc through ctypes, or None on another C library."""
    global _libc
    if _libc is None:
        try:
            if not os.confstr("CS_GNU_LIBC_VERSION"):
                raise OSError("not glibc")
            lib = ctypes.CDLL("libc.so.6")
            lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            _libc = lib
        except (OSError, ValueError, AttributeError):
            _libc = False
    return _libc or None


def enabled() -> bool:
    return os.environ.get("AGW_MALLOC_TRIM", "on") != "off" and _glibc() is not None


def trim() -> bool:
    """Give free heap pages back to the kernel (blocking: run it in a worker thread). Returns whether any were."""
    if not enabled():
        return False
    with _lock:  # one at a time (malloc_trim is thread-safe; two at once would only do the work twice)
        return bool(_glibc().malloc_trim(0))
