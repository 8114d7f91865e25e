"""A real software TPM for tests: `swtpm socket --tpm2` on free loopback ports, in a temporary directory.

Use it as a context manager (`with SwTpm.start(tmp_path) as tpm: tpm.tcti`) or through the `swtpm_tcti` fixture
(import it into a test module). The TPM is started with TPM2_Startup(CLEAR) by swtpm itself
(`--flags not-need-init,startup-clear`), so a fresh instance is ready for ESAPI and tpm2-tools (`startup=False`
leaves it powered on but not started, as a TPM before firmware ran TPM2_Startup). The process is
killed and reaped afterwards, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SWTPM = shutil.which("swtpm") or "/usr/bin/swtpm"
_START_TIMEOUT = 10.0


def free_port_pair() -> tuple[int, int]:
    """Free loopback ports N and N+1: the swtpm TCTI always finds the ctrl channel at server port + 1.

    The kernel picks N; we check N+1 is free too. swtpm may still lose a race for them: the caller retries.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port, port + 1
    raise RuntimeError("no two adjacent free loopback ports")


def closed_port() -> int:
    """A loopback port with nothing listening on it (for 'TPM unreachable' tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SwTpm:
    """One running swtpm process."""

    proc: subprocess.Popen[bytes]
    port: int
    ctrl_port: int
    state_dir: Path
    log_path: Path

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @classmethod
    @contextlib.contextmanager
    def start(cls, base_dir: Path | None = None, attempts: int = 5, *, startup: bool = True) -> Iterator[SwTpm]:
        owned_tmp = None
        if base_dir is None:
            owned_tmp = tempfile.mkdtemp(prefix="swtpm-")
            base_dir = Path(owned_tmp)
        tpm = None
        try:
            last_error = ""
            for attempt in range(attempts):
                state = base_dir / f"swtpm-state-{attempt}"
                state.mkdir(parents=True, exist_ok=True)
                tpm, last_error = cls._try_start(state, startup=startup)
                if tpm is not None:
                    break
            if tpm is None:
                raise RuntimeError(f"swtpm did not start after {attempts} attempts: {last_error}")
            yield tpm
        finally:
            if tpm is not None:
                _forget_contexts(tpm.tcti)
                tpm.stop()
            if owned_tmp is not None:
                shutil.rmtree(owned_tmp, ignore_errors=True)

    @classmethod
    def _try_start(cls, state: Path, ports: tuple[int, int] | None = None, *,
                   startup: bool = True) -> tuple[SwTpm | None, str]:
        port, ctrl = ports or free_port_pair()
        log = state / "swtpm.log"
        cmd = [
            SWTPM, "socket", "--tpm2",
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
            "--tpmstate", f"dir={state}",
            "--flags", "not-need-init,startup-clear" if startup else "not-need-init",
            "--log", f"file={log},level=1",
        ]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        tpm = cls(proc, port, ctrl, state, log)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                return None, f"exit {proc.returncode}: {err.strip()}"
            if _listening(port) and _listening(ctrl):
                return tpm, ""
            time.sleep(0.02)
        tpm.stop()
        return None, "timed out waiting for the ports"

    def restart(self) -> None:
        """Stop and start again on the same ports with the same state (a reboot: NV and seeds survive)."""
        self.stop()
        tpm, err = self._try_start(self.state_dir, (self.port, self.ctrl_port))
        if tpm is None:
            raise RuntimeError(f"swtpm did not restart: {err}")
        self.proc = tpm.proc

    def stop(self) -> None:
        """Kill this swtpm (only this process, by its pid) and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _forget_contexts(tcti: str) -> None:
    """Close this process's hsm ESAPI context for the TCTI: a later swtpm may get the same port, and must not
    inherit a connection to this dead one."""
    import sys

    tpm2_context = sys.modules.get("hsm.tpm2_context")
    if tpm2_context is not None:
        tpm2_context.close(tcti)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[SwTpm]:
    """A fresh swtpm per test."""
    with SwTpm.start(tmp_path) as tpm:
        yield tpm


@pytest.fixture
def swtpm_tcti(swtpm: SwTpm) -> str:
    """The TCTI string of a fresh swtpm: `swtpm:host=127.0.0.1,port=N`."""
    return swtpm.tcti
