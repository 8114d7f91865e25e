"""gateway/allocator.py: after a burst the daemon gives the heap's free pages back (glibc `malloc_trim`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway import allocator

# A burst's garbage in a fresh interpreter: 40 MB of 2 KiB buffers (glibc's heap, not Python's arenas), all freed
# but the last one, which pins the top of the heap so that free() alone cannot shrink it.
BURST = """
import os, sys
from gateway import allocator

def anon_mb():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) / 1024

blocks = [os.urandom(2048) for _ in range(20_000)]
keep = blocks[-1]
del blocks
before = anon_mb()
trimmed = allocator.trim()
print(trimmed, round(before - anon_mb(), 1))
"""


def _burst(env: dict[str, str]) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", BURST], check=True, capture_output=True, text=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], float(out[1])


def test_trim_gives_the_freed_heap_back() -> None:
    """(The devices run glibc: Raspberry Pi OS, Debian.)"""
    trimmed, released_mb = _burst({})
    assert trimmed == "True" and released_mb > 20
    trimmed, released_mb = _burst({"AGW_MALLOC_TRIM": "off"})
    assert trimmed == "False" and released_mb < 2  # what free() alone leaves resident


def test_nothing_is_done_on_another_c_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_libc", None)
    monkeypatch.setattr(allocator.os, "confstr", lambda name: None)
    assert not allocator.enabled() and allocator.trim() is False
