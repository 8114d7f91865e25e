"""The agent SDK: talk to agents on other devices without knowing the topic scheme.

    async with AgentClient("alice", password="...", port=1883) as me:
        await me.send("dev-b/bob", b"hello")
        reply = await me.request("dev-b/bob", b"ping", timeout=5)
        async for msg in me.messages():
            await msg.reply(b"pong")

`SyncAgentClient` offers the same calls for code without asyncio. Both speak MQTT 5 (aiomqtt) to the local
broker; the gateway does the rest. Requests use a response topic under the agent's own namespace and a random
correlation id, which the gateways carry end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiomqtt

from gateway import topics
from gateway.bridge import publish_properties

T = TypeVar("T")
SEEN_IDS = 10_000


class AgentClientError(Exception):
    """The local broker refused us, or a request timed out."""


@dataclass(frozen=True)
class Message:
    """A message received by an agent."""

    sender: str  # <device-id>/<agent>
    payload: bytes
    topic: str
    message_id: str | None
    response_topic: str | None
    correlation_data: bytes | None
    content_type: str | None
    user_properties: tuple[tuple[str, str], ...]
    _client: AgentClient | None = field(default=None, repr=False, compare=False)

    async def reply(self, payload: bytes, *, content_type: str | None = None) -> None:
        """Answer a request: published on the response topic the gateway gave us, with its correlation data."""
        if not self.response_topic or self._client is None:
            raise AgentClientError("this message is not a request (it has no response topic)")
        await self._client._publish(self.response_topic, payload, correlation_data=self.correlation_data,
                                    content_type=content_type)


class AgentClient:
    def __init__(self, agent: str, *, host: str = "127.0.0.1", port: int = 1883, password: str | None = None,
                 username: str | None = None, prefix: str = "agw") -> None:
        self.agent = agent
        self.prefix = prefix
        self._mqtt = aiomqtt.Client(host, port, username=username or agent, password=password,
                                    identifier=f"{agent}-{os.urandom(4).hex()}",
                                    protocol=aiomqtt.ProtocolVersion.V5,
                                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._reply_base = f"{prefix}/{agent}/reply/{os.urandom(6).hex()}"
        self._pending: dict[bytes, asyncio.Future[Message]] = {}
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()

    async def __aenter__(self) -> AgentClient:
        try:
            await self._mqtt.__aenter__()
        except aiomqtt.MqttError as exc:
            raise AgentClientError(f"cannot connect to the local broker: {exc}") from None
        await self._mqtt.subscribe(topics.inbox_topic(self.prefix, self.agent), qos=1)
        await self._mqtt.subscribe(self._reply_base + "/#", qos=1)
        self._task = asyncio.create_task(self._dispatch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        for fut in self._pending.values():
            fut.cancel()
        await self._mqtt.__aexit__(None, None, None)

    async def _dispatch(self) -> None:
        async for m in self._mqtt.messages:
            p = m.properties
            user = tuple((str(k), str(v)) for k, v in (getattr(p, "UserProperty", None) or []))
            props = dict(user)
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            msg = Message(sender=props.get(topics.PROP_FROM, ""), payload=payload, topic=str(m.topic),
                          message_id=props.get(topics.PROP_MESSAGE_ID),
                          response_topic=getattr(p, "ResponseTopic", None),
                          correlation_data=getattr(p, "CorrelationData", None),
                          content_type=getattr(p, "ContentType", None),
                          user_properties=tuple(kv for kv in user if not kv[0].startswith(topics.RESERVED_PREFIX)),
                          _client=self)
            if msg.message_id is not None:
                # A gateway killed between the broker's PUBACK and its own commit may deliver a message twice;
                # both copies carry the same agw:message-id, so the SDK drops the second.
                if msg.message_id in self._seen:
                    continue
                self._seen[msg.message_id] = None
                if len(self._seen) > SEEN_IDS:
                    self._seen.popitem(last=False)
            if msg.topic.startswith(self._reply_base) and msg.correlation_data in self._pending:
                fut = self._pending.pop(msg.correlation_data)  # type: ignore[arg-type]
                if not fut.done():
                    fut.set_result(msg)
            else:
                self._inbox.put_nowait(msg)

    async def _publish(self, topic: str, payload: bytes, *, response_topic: str | None = None,
                       correlation_data: bytes | None = None, content_type: str | None = None,
                       user_properties: list[tuple[str, str]] | None = None) -> None:
        props = publish_properties(response_topic, correlation_data, content_type, False, tuple(user_properties or ()))
        await self._mqtt.publish(topic, payload, qos=1, properties=props)

    def _out(self, to: str) -> str:
        device, sep, agent = to.partition("/")
        if not sep:
            raise ValueError(f"address {to!r} must be <device-id>/<agent>")
        return f"{self.prefix}/{self.agent}/out/{device}/{agent}"

    async def send(self, to: str, payload: bytes, *, content_type: str | None = None,
                   user_properties: list[tuple[str, str]] | None = None) -> None:
        """Send to `<device-id>/<agent>`; returns once the local broker (and so the gateway's path) has it."""
        await self._publish(self._out(to), payload, content_type=content_type, user_properties=user_properties)

    async def request(self, to: str, payload: bytes, *, timeout: float = 10.0,
                      content_type: str | None = None) -> Message:
        """Send a request and wait for the reply."""
        corr = os.urandom(16)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        try:
            await self._publish(self._out(to), payload, response_topic=f"{self._reply_base}/r",
                                correlation_data=corr, content_type=content_type)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AgentClientError(f"no reply from {to} within {timeout} s") from None
        finally:
            self._pending.pop(corr, None)

    # -- groups (MLS, run by the gateway): agw/<agent>/group/<group>/{out,ctl} in, .../{in,events} out ----------
    def _group_session(self) -> aiomqtt.Client:
        """A second MQTT session for group traffic, so that `receive()` and `messages()` see direct messages only.
        It reuses this client's broker address and credentials."""
        paho = self._mqtt._client
        pw = paho.password
        return aiomqtt.Client(self._mqtt._hostname, self._mqtt._port, username=paho.username,
                              password=pw.decode() if isinstance(pw, bytes) else pw,
                              identifier=f"{self.agent}-g-{os.urandom(4).hex()}", protocol=aiomqtt.ProtocolVersion.V5,
                              socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])

    def _group_topic(self, group: str, leaf: str) -> str:
        return f"{self.prefix}/{self.agent}/group/{group}/{leaf}"

    async def _group_ctl(self, group: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a group control request and wait for its result on .../events."""
        req_id = os.urandom(8).hex()
        try:
            async with self._group_session() as session, asyncio.timeout(timeout):
                await session.subscribe(self._group_topic(group, "events"), qos=1)
                await session.publish(self._group_topic(group, "ctl"), json.dumps({**body, "id": req_id}), qos=1)
                async for m in session.messages:
                    payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                    event = json.loads(payload)
                    if isinstance(event, dict) and event.get("id") == req_id:
                        if not event.get("ok"):
                            raise AgentClientError(f"group {body['op']} failed: {event.get('error')}")
                        return event
        except TimeoutError:
            raise AgentClientError(f"no answer from the gateway about group {group} within {timeout} s") from None
        except aiomqtt.MqttError as exc:
            raise AgentClientError(f"group request failed: {exc}") from None
        raise AgentClientError("the broker closed the group session")

    async def create_group(self, group: str, *, admins: list[str] | None = None, timeout: float = 30.0
                           ) -> dict[str, Any]:
        """Create a group with this agent as its first member and admin; returns the group's view."""
        return await self._group_ctl(group, {"op": "create", "admins": admins or []}, timeout)

    async def add(self, group: str, *members: str, timeout: float = 30.0) -> dict[str, Any]:
        """Add `<device-id>/<agent>` members in one commit (this agent must be an admin)."""
        return await self._group_ctl(group, {"op": "add", "members": list(members)}, timeout)

    async def remove(self, group: str, *members: str, timeout: float = 30.0) -> dict[str, Any]:
        return await self._group_ctl(group, {"op": "remove", "members": list(members)}, timeout)

    async def send_group(self, group: str, payload: bytes) -> None:
        """Send to every other member of the group; returns once the gateway has it durably."""
        await self._publish(self._group_topic(group, "out"), payload)

    async def group_messages(self, group: str) -> AsyncIterator[Message]:
        """Messages of one group, as they arrive (a session of its own, closed when the iteration ends)."""
        async with self._group_session() as session:
            await session.subscribe(self._group_topic(group, "in"), qos=1)
            async for m in session.messages:
                user = tuple((str(k), str(v)) for k, v in (getattr(m.properties, "UserProperty", None) or []))
                props = dict(user)
                yield Message(sender=props.get(topics.PROP_FROM, ""),
                              payload=m.payload if isinstance(m.payload, bytes) else str(m.payload).encode(),
                              topic=str(m.topic), message_id=props.get(topics.PROP_MESSAGE_ID), response_topic=None,
                              correlation_data=None, content_type=getattr(m.properties, "ContentType", None),
                              user_properties=user)

    async def messages(self) -> AsyncIterator[Message]:
        """Messages sent to this agent, as they arrive."""
        while True:
            yield await self._inbox.get()

    async def receive(self, timeout: float | None = None) -> Message:
        return await asyncio.wait_for(self._inbox.get(), timeout)


class SyncAgentClient:
    """The same API without asyncio: an event loop runs in a background thread."""

    def __init__(self, agent: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"agent-{agent}")
        self._thread.start()

        async def make() -> AgentClient:  # aiomqtt binds to the loop it is created in
            return AgentClient(agent, **kwargs)

        self._client = self._call(make())

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> SyncAgentClient:
        self._call(self._client.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._client.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def send(self, to: str, payload: bytes, **kwargs: Any) -> None:
        self._call(self._client.send(to, payload, **kwargs))

    def request(self, to: str, payload: bytes, *, timeout: float = 10.0, **kwargs: Any) -> Message:
        return self._call(self._client.request(to, payload, timeout=timeout, **kwargs))

    def receive(self, timeout: float | None = None) -> Message:
        return self._call(self._client.receive(timeout))

    def reply(self, msg: Message, payload: bytes) -> None:
        self._call(msg.reply(payload))
