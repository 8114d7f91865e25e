"""The seam between the daemon and agent groups (MLS): what the daemon calls, and the default that has none.

The daemon hands group traffic to a `GroupService`: agents' publishes on agw/<agent>/group/<group>/{out,ctl},
GROUP envelopes and group link events from the relay, the link coming up (to publish KeyPackages), and operator
requests (`agw group ...` through the control socket). `NoGroups` is used until a real service is configured.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from gateway.bridge import AgentMessage
from gateway.protocol.envelope import Envelope

log = logging.getLogger("agw.groups")


class GroupService(Protocol):
    async def start(self) -> None: ...

    async def on_agent_messages(self, messages: list[AgentMessage]) -> list[tuple[AgentMessage, str]]:
        """Take agents' group publishes; return once they are durable (the daemon then PUBACKs them and sends the
        SDK's receipts). Returns the group messages (.../out) refused for good, with the reason."""
        ...

    async def on_envelopes(self, envelopes: list[Envelope]) -> None: ...

    async def on_link_event(self, event: object) -> None: ...

    async def on_link_ready(self) -> None: ...

    def control(self, request: dict[str, Any]) -> Any: ...

    def status(self) -> dict[str, Any]: ...

    def acked(self, agent: str, ids: list[bytes]) -> list[bytes]:
        """`agent` acknowledged `ids` (gateway/receipts.py): those naming its held group messages are deleted;
        returns the others."""
        ...

    def republish_held(self, agent: str | None = None, *, before_connect: int | None = None,
                       before: float | None = None) -> None:
        """Publish held group messages again (gateway/groups_held.py)."""
        ...

    def expire_held(self) -> None: ...


class NoGroups:
    """Group traffic is refused (logged) until a group service is wired in."""

    async def start(self) -> None:
        return None

    async def on_agent_messages(self, messages: list[AgentMessage]) -> list[tuple[AgentMessage, str]]:
        for m in messages:
            log.warning("groups are not enabled; dropping a publish on %s", m.topic)
        return [(m, "groups are not enabled on this gateway") for m in messages]

    async def on_envelopes(self, envelopes: list[Envelope]) -> None:
        for e in envelopes:
            log.warning("groups are not enabled; dropping a group envelope from %s", e.sender)

    async def on_link_event(self, event: object) -> None:
        return None

    async def on_link_ready(self) -> None:
        return None

    def control(self, request: dict[str, Any]) -> Any:
        raise ValueError("groups are not enabled on this gateway")

    def status(self) -> dict[str, Any]:
        return {}

    def acked(self, agent: str, ids: list[bytes]) -> list[bytes]:
        return ids

    def republish_held(self, agent: str | None = None, *, before_connect: int | None = None,
                       before: float | None = None) -> None:
        return None

    def expire_held(self) -> None:
        return None
