"""An SDK application in a process of its own (so a test can kill it with SIGKILL, as a crash would), and a polling
wait for the real-process tests."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from gateway.testbed import PY


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class SdkProcess:
    """Runs `script` (Python, given `args`), which prints "ready" once connected and then one hex payload per line
    for each message its application takes."""

    def __init__(self, script: str, *args: str, what: str = "the SDK process") -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([PY, "-c", script, *args], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(lambda: "ready" in self.lines, what=f"{what} to connect")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def payloads(self) -> list[bytes]:
        return [bytes.fromhex(x) for x in self.lines if x != "ready"]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
