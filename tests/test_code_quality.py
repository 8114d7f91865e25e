"""The code bar, enforced by `make test`: ruff clean everywhere, mypy --strict on the key layer and the protocol."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_on_hsm_and_protocol():
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "hsm", "gateway/protocol"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success" in out.stdout
