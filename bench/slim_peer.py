"""AGNTCY SLIM as a peer: install `slim-bindings` into its own venv (bench/.slim-venv, never the project's), then
run bench/slim_driver.py there. Any failure becomes a "not available: <reason>" result, never a failed run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway.testbed import free_port

HERE = Path(__file__).resolve().parent
VENV = HERE / ".slim-venv"
PACKAGE = "slim-bindings==3.3.8"


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(timeout: float = 600) -> str | None:
    """Create the venv and install the bindings if missing; return the reason when that is impossible."""
    py = _venv_python()
    try:
        if not py.exists():
            out = subprocess.run([sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True,
                                 timeout=120)
            if out.returncode != 0:
                return f"cannot create {VENV}: {out.stderr.strip()[-300:]}"
        probe = subprocess.run([str(py), "-c", "import slim_bindings"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return None
        out = subprocess.run([str(py), "-m", "pip", "install", "-q", PACKAGE], capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode != 0:
            return f"pip install {PACKAGE} failed: {(out.stderr or out.stdout).strip()[-300:]}"
        probe = subprocess.run([str(py), "-c", "import slim_bindings"], capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            return f"slim_bindings does not import: {probe.stderr.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def measure(n: int, rtt: int, sizes: list[int], max_time: float = 240) -> dict[str, Any]:
    reason = ensure_venv()
    if reason is not None:
        return {"status": f"not available: {reason}"}
    cmd = [str(_venv_python()), str(HERE / "slim_driver.py"), "all", "--port", str(free_port()), "--n", str(n),
           "--rtt", str(rtt), "--max-time", str(max_time), "--sizes", *map(str, sizes)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time + 120)
    except subprocess.TimeoutExpired:
        return {"status": "not available: the SLIM run timed out"}
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        return {"status": f"not available: no result ({(out.stdout + out.stderr).strip()[-300:]})"}
    res: dict[str, Any] = json.loads(lines[0][7:])
    if "error" in res:
        return {"status": f"not available: {res['error'][-300:]}"}
    res["status"] = f"measured ({PACKAGE}, local node, point-to-point session, MLS on, reliable)"
    return res
