"""Routing envelopes to connected devices, behind an interface so a NATS backplane can replace it later.

A `Router` knows which device is connected where. `LocalRouter` is one process's table. A backplane router
would publish to `agw.dev.<id>` and relay back delivery results; the server code does not change.
"""

from __future__ import annotations

import enum
from typing import Protocol

from gateway.protocol.envelope import Envelope


class RouteResult(enum.Enum):
    DELIVERED = "delivered"  # queued on the recipient's connection
    OFFLINE = "offline"
    CONGESTED = "congested"  # the recipient's send queue is full


class DeliverySink(Protocol):
    """A connection that can take envelopes for its device without blocking."""

    def offer(self, envelope: Envelope) -> bool:
        """Queue the envelope for sending; False when the bounded queue is full."""
        ...


class Router(Protocol):
    def register(self, device_id: str, sink: DeliverySink) -> DeliverySink | None:
        """Make `sink` the device's connection; returns the one it replaces, which the caller closes."""
        ...

    def unregister(self, device_id: str, sink: DeliverySink) -> None:
        """Forget the device, if `sink` is still its connection."""
        ...

    async def route(self, envelope: Envelope) -> RouteResult: ...

    def is_connected(self, device_id: str) -> bool: ...


class LocalRouter:
    """In-process routing table: one node, every device connected to it."""

    def __init__(self) -> None:
        self._sinks: dict[str, DeliverySink] = {}

    def register(self, device_id: str, sink: DeliverySink) -> DeliverySink | None:
        old = self._sinks.get(device_id)
        self._sinks[device_id] = sink
        return old if old is not sink else None

    def unregister(self, device_id: str, sink: DeliverySink) -> None:
        if self._sinks.get(device_id) is sink:
            del self._sinks[device_id]

    async def route(self, envelope: Envelope) -> RouteResult:
        sink = self._sinks.get(envelope.recipient)
        if sink is None:
            return RouteResult.OFFLINE
        return RouteResult.DELIVERED if sink.offer(envelope) else RouteResult.CONGESTED

    def is_connected(self, device_id: str) -> bool:
        return device_id in self._sinks

    def __len__(self) -> int:
        return len(self._sinks)
