"""A router decorator that records what the relay routes: for `make demo`, audits and tests.

Each routed envelope becomes one JSON line: kind, sender, recipient, envelope id, size, and the ciphertext in hex
(exactly the bytes the relay holds, which it cannot read). Off unless `agw-relay --tap FILE` is given: the relay
otherwise writes nothing to disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from gateway.protocol.envelope import Envelope
from relay.routing import DeliverySink, Router, RouteResult


class TapRouter:
    def __init__(self, inner: Router, path: Path) -> None:
        self._inner = inner
        self._file: IO[str] = path.open("a", encoding="utf-8", buffering=1)

    def register(self, device_id: str, sink: DeliverySink) -> DeliverySink | None:
        return self._inner.register(device_id, sink)

    def unregister(self, device_id: str, sink: DeliverySink) -> None:
        self._inner.unregister(device_id, sink)

    def is_connected(self, device_id: str) -> bool:
        return self._inner.is_connected(device_id)

    async def route(self, envelope: Envelope) -> RouteResult:
        result = await self._inner.route(envelope)
        self._file.write(json.dumps({
            "kind": envelope.kind.name.lower(), "sender": envelope.sender, "recipient": envelope.recipient,
            "id": envelope.envelope_id.hex(), "bytes": envelope.size, "result": result.value,
            "ciphertext_hex": envelope.ciphertext.hex()}) + "\n")
        return result

    def close(self) -> None:
        self._file.close()
