"""`make demo` runs the product end to end and cleans up after itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def test_demo_runs_and_cleans_up() -> None:
    # Its own temporary directory (TMPDIR; short: the control socket's path must fit AF_UNIX's limit), so that
    # another demo running on the machine at the same time cannot be taken for a leftover of this one.
    tmp = Path(tempfile.mkdtemp(prefix="agw-t-"))
    try:
        env = {**os.environ, "TMPDIR": str(tmp)}
        out = subprocess.run([sys.executable, "-m", "gateway.demo"], capture_output=True, text=True, timeout=240,
                             env=env)
        left = list(tmp.glob("agw-demo-*"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "'sensitive': True, 'extractable': False" in text
    assert "sensor received from dev-a/planner: 'hello sensor, may I ask you things?'" in text
    assert "planner got reply '{\"temperature_c\": 21.5}' from dev-b/sensor" in text
    assert "plaintext 'temperature' present in any of them: False" in text
    assert "audit log intact" in text
    assert not left, "the demo left its directory behind"
