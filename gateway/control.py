"""The daemon's control socket: a Unix socket (mode 0600, in the state directory) speaking one JSON object per
line each way. It lets `agw status`, `agw consent ...`, `agw audit ...` and `agw store ...` act on the running
daemon, so a consent decision applies at once and the store is never opened by two processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

from gateway import operations
from gateway.store import Store


class ControlledDaemon(Protocol):
    store: Store

    def status(self) -> dict[str, Any]: ...

    def group_control(self, request: dict[str, Any]) -> Any: ...


class ControlError(Exception):
    """The control request failed; the message comes from the daemon."""


def dispatch(store: Store, request: dict[str, Any], status: dict[str, Any] | None = None) -> Any:
    """Run one request against a store (shared by the daemon and the offline CLI)."""
    cmd = request.get("cmd")
    if cmd == "status":
        if status is None:
            raise ControlError("the daemon is not running")
        return status
    if cmd == "consent.list":
        return operations.consent_list(store, request.get("agent"))
    if cmd == "consent.set":
        return operations.consent_set(store, str(request["agent"]), str(request["peer"]), str(request["action"]))
    if cmd == "audit.verify":
        return operations.audit_verify(store)
    if cmd == "audit.list":
        return operations.audit_list(store)
    if cmd == "store.export":
        return operations.export(store, request.get("peer"))
    if cmd == "store.purge":
        return operations.purge(store, str(request["peer"]))
    raise ControlError(f"unknown command {cmd!r}")


class ControlServer:
    def __init__(self, path: Path, daemon: ControlledDaemon) -> None:
        self.path = path
        self.daemon = daemon
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path), limit=1 << 20)
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                if str(request.get("cmd", "")).startswith("group."):
                    result = self.daemon.group_control(request)
                else:
                    result = dispatch(self.daemon.store, request, self.daemon.status())
                reply: dict[str, Any] = {"ok": True, "result": result}
            except (ControlError, ValueError, KeyError) as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def request(path: Path, req: dict[str, Any], timeout: float = 10.0) -> Any:
    """Send one request to a running daemon (synchronous, for the CLI). Raises ConnectionError if none runs."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply["result"]
