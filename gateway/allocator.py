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


# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# The relay's settings: blocks up to 4 MiB come from the heap, and up to 8 MiB of free heap top stays mapped
# (1 MiB of padding on each growth). See keep_large_blocks.
RELAY_MALLOPT = ((_M_MMAP_THRESHOLD, 4 << 20), (_M_TRIM_THRESHOLD, 8 << 20), (_M_TOP_PAD, 1 << 20))


def keep_large_blocks(settings: tuple[tuple[int, int], ...] = RELAY_MALLOPT) -> bool:
    """Let freed large blocks be reused instead of unmapped (the relay, at start-up; issue 7: 16 KiB throughput).

    The relay copies every routed byte ~10 times through buffers of a frame's size (~192 KiB for a batch of
    16 KiB messages). With glibc's defaults such a buffer is above the heap top's trim threshold or the mmap
    threshold, so each new one is fresh pages from the kernel: ~9 page faults per 16 KiB message in the relay,
    a quarter of its CPU (docs/performance.md, 2026-12-08, branch `big8`). Fixed thresholds keep them mapped, at
    the price of up to 8 MiB of free heap held. Not used by the gateways (their RSS target). Skipped when glibc
    is not the C library, when `AGW_RELAY_MALLOPT=off`, or when the operator set glibc's own `MALLOC_*_`
    variables. Returns whether the settings were applied."""
    if os.environ.get("AGW_RELAY_MALLOPT", "on") == "off":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")):
        return False
    lib = _glibc()
    if lib is None:
        return False
    lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(lib.mallopt(param, value) == 1 for param, value in settings)
