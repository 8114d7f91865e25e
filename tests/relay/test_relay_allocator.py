"""The relay's allocator settings (gateway/allocator.py `keep_large_blocks`, applied by `relay.cli.main`): a
frame-sized buffer freed and made again is reused, not fresh pages from the kernel each time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import relay.cli

# In a fresh interpreter: relay.cli.main up to the point where it would serve (asyncio.run is replaced), then the
# relay's pattern at 16 KiB: a ~192 KiB frame copied into new buffers again and again. Prints page faults per round.
CHURN = """
import asyncio, os, resource
import relay.cli

def no_serve(coro):
    coro.close()
    return 0

asyncio.run = no_serve
relay.cli.main(["--host", "127.0.0.1", "--port", "0"])
frame = os.urandom(192 * 1024)
for _ in range(20):
    copy = frame + b"x"; again = bytes(copy[1:]); del copy, again
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    copy = frame + b"x"; again = bytes(copy[1:]); del copy, again
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200)
"""


def _faults_per_round(**env: str) -> float:
    root = str(Path(relay.cli.__file__).resolve().parents[1])  # the checkout whose relay is under test
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "AGW_RELAY_MALLOPT"}
    base["PYTHONPATH"] = os.pathsep.join([root, base.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", CHURN], env={**base, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only")
def test_relay_reuses_frame_sized_buffers() -> None:
    assert _faults_per_round() < 1.0


@pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only")
def test_without_the_settings_each_buffer_is_fresh_pages() -> None:
    """What the settings are for (and that the test above can fail): glibc's defaults fault every round."""
    assert _faults_per_round(AGW_RELAY_MALLOPT="off") > 10.0


@pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only")
def test_operator_malloc_variables_win() -> None:
    assert _faults_per_round(MALLOC_TRIM_THRESHOLD_="131072") > 10.0
