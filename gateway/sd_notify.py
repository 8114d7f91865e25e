"""systemd's notify protocol (Type=notify, WatchdogSec=) without a dependency: one datagram per state change.

Does nothing when NOTIFY_SOCKET is unset, so the same daemon runs under systemd, in tests and by hand.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self.address = env.get("NOTIFY_SOCKET")
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_interval: float | None = None
        if usec and (not pid or int(pid) == os.getpid()):
            self.watchdog_interval = int(usec) / 1e6 / 2
        os.environ.pop("NOTIFY_SOCKET", None)  # children must not inherit it

    def notify(self, state: str) -> bool:
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def extend_timeout(self, seconds: float, status: str = "") -> bool:
        """Ask systemd to wait `seconds` more for READY (or STOPPING) before it gives up on the start."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}" + (f"\nSTATUS={status}" if status else ""))
