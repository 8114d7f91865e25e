"""The agent SDK: talk to agents on other devices without knowing the topic scheme.

    async with AgentClient("alice", password="...", port=1883) as me:
        await me.send("dev-b/bob", b"hello")
        reply = await me.request("dev-b/bob", b"ping", timeout=5)
        async for msg in me.messages():
            await msg.reply(b"pong")

`SyncAgentClient` offers the same calls for code without asyncio. Both speak MQTT 5 (aiomqtt) to the local
broker; the gateway does the rest. Requests use a response topic under the agent's own namespace and a random
correlation id, which the gateways carry end to end.

End-to-end receipts (docs/protocol.md, "Receipts and acks"): each message the SDK sends (send, request, reply,
send_group) carries a random 16-byte id in the user property `agw:sdk-id`; the gateway answers on
agw/<agent>/receipt once the message is durable in its outbox, and until then the SDK publishes it again (same id)
after every reconnect and whenever no receipt came within `receipt_timeout`. Each message the SDK receives is
acknowledged on agw/<agent>/ack once handed to the application (or, with `auto_ack=False`, once the application
calls `msg.ack()`), so the gateway keeps it (and sends it again) until then; copies are dropped by message id.
Together with a reconnect loop on a persistent MQTT session this survives a crash of the local broker (which
acknowledges before it saves) with every message delivered exactly once. Group
messages are sent (`send_group`, receipted: the gateway takes a retransmission once) and received
(`group_messages`, acknowledged as they are handed out; the gateway keeps them until then) with the same
guarantees. Both need a gateway of this version or later (an older one sends no group receipts, so a group send
would be published again and again, each a new group message; and it does not keep group messages for the SDK).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import topics
from gateway.bridge import publish_properties
from gateway.protocol.identity.errors import BadName
from gateway.protocol.identity.names import check_id
from gateway.protocol.message import mqtt_utf8_ok
from gateway.protocol.receipts import (
    GOODBYE,
    INSTANCE_SIZE,
    MAX_IDS,
    RESERVED_INSTANCES,
    ReceiptFormatError,
    decode_ids,
    encode_ids,
)

T = TypeVar("T")
log = logging.getLogger("agw.client")

SEEN_IDS = 20_000  # message ids remembered to drop copies
RECEIPT_TIMEOUT = 5.0  # seconds without a receipt before a message is published again (then doubling, up to 60)
RECEIPT_TIMEOUT_MAX = 60.0
# aiomqtt warns at every publish beyond 10 awaiting their PUBACK: normal for pipelined sends.
_mqtt_log = logging.getLogger("agw.client.mqtt")
_mqtt_log.setLevel(logging.ERROR)
SESSION_EXPIRY = 600  # seconds the broker keeps our session (and queues our messages) while we are away
RECONNECT_MAX = 5.0  # seconds between reconnect attempts, at most


class AgentClientError(Exception):
    """The local broker refused us, or a request timed out."""


class MessageRefused(AgentClientError):
    """The gateway refused the message for good at ingest (the reason says why); it was not sent and will not be."""


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

    def ack(self) -> None:
        """With `AgentClient(..., auto_ack=False)`: the application is done with this message, so the gateway may
        forget it. Until then the gateway keeps it and sends it again to the agent's next client (after a crash of
        the application, say). Safe to call twice, from any thread; with the default `auto_ack=True` it does
        nothing (the message was acknowledged when it was handed out)."""
        if self._client is not None:
            self._client._app_ack(self)

    async def reply(self, payload: bytes, *, content_type: str | None = None) -> None:
        """Answer a request: published on the response topic the gateway gave us, with its correlation data.
        Returns once the gateway has the reply durably (its receipt came)."""
        if not self.response_topic or self._client is None:
            raise AgentClientError("this message is not a request (it has no response topic)")
        await self._client._tracked(self.response_topic, payload, correlation_data=self.correlation_data,
                                    content_type=content_type)


@dataclass
class _Outgoing:
    """A message sent and not yet receipted by the gateway."""

    topic: str
    payload: bytes
    properties: Properties
    receipt: asyncio.Future[None]
    sent_at: float = 0.0
    timeout: float = RECEIPT_TIMEOUT


class AgentClient:
    def __init__(self, agent: str, *, host: str = "127.0.0.1", port: int = 1883, password: str | None = None,
                 username: str | None = None, prefix: str = "agw", receipt_timeout: float = RECEIPT_TIMEOUT,
                 session_expiry: int = SESSION_EXPIRY, auto_ack: bool = True) -> None:
        """`auto_ack=False`: a message received is acknowledged to the gateway only when the application calls
        `msg.ack()` (at-least-once processing: a crash between taking and acking gets the message again), not
        when it is handed out."""
        self.agent = agent
        self.prefix = prefix
        self._host, self._port, self._username, self._password = host, port, username or agent, password
        self._identifier = f"{agent}-{os.urandom(4).hex()}"  # the same for every reconnect: one session
        # Named in this client's announcements and goodbye (`agw:instance`): the gateway keeps the agent's messages
        # while any of its clients that announced has not said goodbye, so another client of the same agent that
        # closes does not stop it for this one.
        self._instance = os.urandom(INSTANCE_SIZE)
        while self._instance in RESERVED_INSTANCES:
            self._instance = os.urandom(INSTANCE_SIZE)
        self._session_expiry = session_expiry
        self._receipt_timeout = receipt_timeout
        self._auto_ack = auto_ack
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mqtt = self._new_mqtt()
        self._reply_base = f"{prefix}/{agent}/reply/{os.urandom(6).hex()}"
        self._receipt_topic = topics.receipt_topic(prefix, agent)
        self._pending: dict[bytes, asyncio.Future[Message]] = {}
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._group_inboxes: dict[str, asyncio.Queue[Message]] = {}  # group -> its messages not yet taken
        self._group_in_head, self._group_in_tail = topics.group_inbox_topic(prefix, agent, "+").split("+")
        self._task: asyncio.Task[None] | None = None
        self._resender: asyncio.Task[None] | None = None
        self._seen: OrderedDict[bytes, bool] = OrderedDict()  # message id -> taken by the application (acked)
        self._unreceipted: dict[bytes, _Outgoing] = {}
        self._acks: list[bytes] = []  # ids to acknowledge, sent once per event-loop turn
        self._ack_scheduled = False
        self._background: set[asyncio.Task[None]] = set()
        self._up = asyncio.Event()  # connected, subscribed and announced
        self._closing = False
        # What the guarantees cost so far (for tests and diagnostics): messages published again for want of a
        # receipt or after a reconnect, copies received and dropped by message id, reconnects to the broker.
        self.stats = {"resent": 0, "copies_dropped": 0, "reconnects": 0}

    def _new_mqtt(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        return aiomqtt.Client(self._host, self._port, username=self._username, password=self._password,
                              identifier=self._identifier, protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                              properties=props, timeout=10, logger=_mqtt_log,
                              socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])

    async def __aenter__(self) -> AgentClient:
        self._loop = asyncio.get_running_loop()
        try:
            await self._mqtt.__aenter__()
            await self._on_connected()
        except aiomqtt.MqttError as exc:
            with contextlib.suppress(Exception):
                await self._mqtt.__aexit__(None, None, None)
            raise AgentClientError(f"cannot connect to the local broker: {exc}") from None
        self._task = asyncio.create_task(self._run())
        self._resender = asyncio.create_task(self._resend_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        for task in (self._task, self._resender):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task
        if self._up.is_set():
            # The last acks, then goodbye: once no other client of the agent that announced itself is left, the
            # gateway stops keeping its messages until a client announces itself again (so a raw MQTT client of
            # the same agent later is served as before).
            with contextlib.suppress(aiomqtt.MqttError):
                await self._send_acks()
                await self._mqtt.publish(topics.ack_topic(self.prefix, self.agent), GOODBYE, qos=1,
                                         properties=self._instance_properties())
        for fut in self._pending.values():
            fut.cancel()
        for out in self._unreceipted.values():
            out.receipt.cancel()
        for task in list(self._background):
            task.cancel()
        await self._close_session()

    async def _close_session(self) -> None:
        """Disconnect and let the broker drop our session now (Session Expiry Interval 0 on DISCONNECT): this
        client's identifier is never used again."""
        client = self._mqtt
        if not client._disconnected.done():
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            client._client.disconnect(properties=props)
            with contextlib.suppress(TimeoutError, aiomqtt.MqttError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(client._disconnected), 5)
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)

    # -- the connection: subscribe, announce, resend; reconnect when the broker goes ----------------------------
    async def _on_connected(self) -> None:
        for t in (topics.inbox_topic(self.prefix, self.agent), self._reply_base + "/#", self._receipt_topic,
                  *(topics.group_inbox_topic(self.prefix, self.agent, g) for g in self._group_inboxes)):
            await self._mqtt.subscribe(t, qos=1)
        # The empty ack (with any acks not sent yet) tells the gateway that this agent acknowledges, and asks it
        # to send again what it still holds for us.
        await self._send_acks(announce=True)
        self._up.set()
        now = time.monotonic()
        for out in list(self._unreceipted.values()):
            out.sent_at = now
            self.stats["resent"] += 1
            self._spawn(self._publish_out(out))

    async def _run(self) -> None:
        while True:
            try:
                async for m in self._mqtt.messages:
                    self._handle(m)
            except aiomqtt.MqttError as exc:
                log.warning("agent %s: lost the local broker (%s); reconnecting", self.agent, exc)
            self._up.clear()
            with contextlib.suppress(Exception):
                await self._mqtt.__aexit__(None, None, None)
            await self._reconnect()

    async def _reconnect(self) -> None:
        delay = 0.1
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)
            client = self._new_mqtt()  # aiomqtt's client is not meant to survive an unexpected disconnection
            try:
                await client.__aenter__()
                self._mqtt = client
                await self._on_connected()
                self.stats["reconnects"] += 1
                log.info("agent %s: reconnected to the local broker", self.agent)
                return
            except aiomqtt.MqttError as exc:
                log.info("agent %s: broker not reachable yet (%s)", self.agent, exc)
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)

    async def _resend_loop(self) -> None:
        """Publish again (same id) what was not receipted in time, with the timeout doubling each round."""
        while True:
            await asyncio.sleep(min(1.0, self._receipt_timeout / 4))
            if not self._up.is_set():
                continue
            now = time.monotonic()
            for out in list(self._unreceipted.values()):
                if now - out.sent_at >= out.timeout:
                    out.sent_at, out.timeout = now, min(out.timeout * 2, RECEIPT_TIMEOUT_MAX)
                    self.stats["resent"] += 1
                    self._spawn(self._publish_out(out))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish_out(self, out: _Outgoing) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # the next reconnect or timeout sends it again
            await self._mqtt.publish(out.topic, out.payload, qos=1, properties=out.properties)

    # -- receiving ---------------------------------------------------------------------------------------------
    def _handle(self, m: aiomqtt.Message) -> None:
        payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
        topic = str(m.topic)
        p = m.properties
        user = tuple((str(k), str(v)) for k, v in (getattr(p, "UserProperty", None) or []))
        if topic == self._receipt_topic:
            self._on_receipt(payload, dict(user).get(topics.PROP_REFUSED))
            return
        props = dict(user)
        group = self._group_of(topic)
        msg = Message(sender=props.get(topics.PROP_FROM, ""), payload=payload, topic=topic,
                      message_id=props.get(topics.PROP_MESSAGE_ID),
                      response_topic=getattr(p, "ResponseTopic", None),
                      correlation_data=getattr(p, "CorrelationData", None),
                      content_type=getattr(p, "ContentType", None),
                      # (a group message keeps the gateway's agw:from, agw:group, agw:epoch, agw:message-id)
                      user_properties=user if group is not None else tuple(
                          kv for kv in user if not kv[0].startswith(topics.RESERVED_PREFIX)),
                      _client=self)
        if group is not None and group not in self._group_inboxes:
            return  # (a group this client does not read, from a session that once subscribed to it: not acked)
        if msg.message_id is not None:
            try:
                mid = bytes.fromhex(msg.message_id)
                if len(mid) != 16:
                    raise ValueError("not 16 bytes")
            except ValueError:
                log.warning("agent %s: a message on %s has a malformed agw:message-id; not acknowledged", self.agent,
                            topic)
            else:
                # A copy (the gateway sends again what it holds unacknowledged; a broker sends again what it had
                # not saved as acknowledged) is not handed to the application again; it is acknowledged again if
                # the application has taken the first copy (else that ack comes when it does).
                if mid in self._seen:
                    self.stats["copies_dropped"] += 1
                    if self._seen[mid]:
                        self._ack(mid)
                    return
                self._seen[mid] = False
                if len(self._seen) > SEEN_IDS:
                    self._seen.popitem(last=False)
        if group is not None:
            self._group_inboxes[group].put_nowait(msg)
        elif msg.topic.startswith(self._reply_base) and msg.correlation_data in self._pending:
            fut = self._pending.pop(msg.correlation_data)  # type: ignore[arg-type]
            if not fut.done():
                fut.set_result(msg)
            self._taken(msg, ack=True)  # (a reply whose request gave up is not wanted: acknowledged all the same)
        else:
            self._inbox.put_nowait(msg)

    def _taken(self, msg: Message, *, ack: bool | None = None) -> Message:
        """The application has the message: only now is it acknowledged (with `auto_ack`; else at `msg.ack()`), so
        the gateway keeps it until then (a crash or close with messages still queued here loses none of them)."""
        if (self._auto_ack if ack is None else ack) and msg.message_id is not None:
            with contextlib.suppress(ValueError):
                mid = bytes.fromhex(msg.message_id)
                if mid in self._seen and not self._seen[mid]:
                    self._seen[mid] = True
                    self._ack(mid)
        return msg

    def _app_ack(self, msg: Message) -> None:
        """`msg.ack()`, from the loop's thread or any other (`SyncAgentClient`)."""
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._taken(msg, ack=True)
        else:
            loop.call_soon_threadsafe(lambda: self._taken(msg, ack=True))

    def _on_receipt(self, payload: bytes, refused: str | None) -> None:
        """A receipt ends the wait of the sends it names: normally, or with `MessageRefused` if it carries a
        reason (`agw:refused`)."""
        try:
            ids = decode_ids(payload)
        except ReceiptFormatError as exc:
            log.warning("agent %s: ignoring a malformed receipt (%s)", self.agent, exc)
            return
        for i in ids:
            out = self._unreceipted.pop(i, None)
            if out is not None and not out.receipt.done():
                if refused is None:
                    out.receipt.set_result(None)
                else:
                    out.receipt.set_exception(MessageRefused(f"the gateway refused the message: {refused}"))
                    out.receipt.add_done_callback(_retrieved)  # (its sender may have given up waiting)

    def _ack(self, mid: bytes) -> None:
        self._acks.append(mid)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        if self._up.is_set() and self._acks:
            self._spawn(self._send_acks_later())

    async def _send_acks_later(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # kept; sent after the next connect
            await self._send_acks()

    def _instance_properties(self, *more: tuple[str, str]) -> Properties:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [(topics.PROP_INSTANCE, self._instance.hex()), *more]  # (one assignment: paho appends)
        return props

    async def _send_acks(self, *, announce: bool = False) -> None:
        """Publish the pending acks (QoS 1); on failure they wait for the next connection. `announce`: publish
        even when there is nothing to acknowledge (the empty ack sent on every connect)."""
        if announce:  # its own message: only an empty ack announces (gateway/receipts.py)
            # The groups read here: the gateway keeps their messages until acknowledged.
            groups = [(topics.PROP_GROUPS, ",".join(sorted(self._group_inboxes)))] if self._group_inboxes else []
            props = self._instance_properties(*groups)
            await self._mqtt.publish(topics.ack_topic(self.prefix, self.agent), encode_ids([]), qos=1,
                                     properties=props)
        while self._acks:
            chunk, self._acks = self._acks[:MAX_IDS], self._acks[MAX_IDS:]
            try:
                await self._mqtt.publish(topics.ack_topic(self.prefix, self.agent), encode_ids(chunk), qos=1)
            except aiomqtt.MqttError:
                self._acks[:0] = chunk
                raise

    # -- sending -----------------------------------------------------------------------------------------------
    def _register(self, topic: str, payload: bytes, *, response_topic: str | None = None,
                  correlation_data: bytes | None = None, content_type: str | None = None,
                  user_properties: list[tuple[str, str]] | None = None) -> _Outgoing:
        sdk_id = os.urandom(16)
        user = tuple(kv for kv in (user_properties or ()) if not kv[0].startswith(topics.RESERVED_PREFIX))
        for s in (response_topic, content_type, *(x for kv in user for x in kv)):
            if s is not None and not mqtt_utf8_ok(s):
                raise ValueError(f"{s!r}: MQTT strings may not hold control characters or non-characters")
        props = publish_properties(response_topic, correlation_data, content_type, False,
                                   (*user, (topics.PROP_SDK_ID, sdk_id.hex())))
        out = _Outgoing(topic, payload, props, asyncio.get_running_loop().create_future(),
                        time.monotonic(), self._receipt_timeout)
        self._unreceipted[sdk_id] = out
        return out

    async def _tracked(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        """Publish with an SDK message id and wait for the gateway's receipt (publishing again meanwhile)."""
        out = self._register(topic, payload, **kwargs)
        if self._up.is_set():
            await self._publish_out(out)
        try:
            await out.receipt
        except asyncio.CancelledError:
            if self._closing:
                raise AgentClientError("the client closed before the gateway receipted the message") from None
            raise

    def _out(self, to: str) -> str:
        device, sep, agent = to.partition("/")
        if not sep:
            raise ValueError(f"address {to!r} must be <device-id>/<agent>")
        try:
            check_id("device", device)
            check_id("agent", agent)
        except BadName as exc:
            raise ValueError(f"address {to!r}: {exc}") from None
        return f"{self.prefix}/{self.agent}/out/{device}/{agent}"

    async def send(self, to: str, payload: bytes, *, content_type: str | None = None,
                   user_properties: list[tuple[str, str]] | None = None) -> None:
        """Send to `<device-id>/<agent>`. Returns once the gateway's receipt came, i.e. once the gateway has the
        message durably in its outbox (it then delivers it exactly once); until then the SDK publishes it again
        after every reconnect and whenever no receipt came in time, so this waits while the broker or the gateway
        is down. Concurrent sends are pipelined. Raises `MessageRefused` if the gateway refused the message for
        good (over a limit, e.g. larger than the outbox's 1 MiB record limit, or more than 64 user properties)."""
        await self._tracked(self._out(to), payload, content_type=content_type, user_properties=user_properties)

    async def request(self, to: str, payload: bytes, *, timeout: float = 10.0,
                      content_type: str | None = None) -> Message:
        """Send a request and wait for the reply (the request is receipted and resent like `send`; a refused
        request raises `MessageRefused` at once)."""
        corr = os.urandom(16)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        try:
            out = self._register(self._out(to), payload, response_topic=f"{self._reply_base}/r",
                                 correlation_data=corr, content_type=content_type)
            out.receipt.add_done_callback(lambda r: _fail_with_refusal(r, fut))
            if self._up.is_set():
                await self._publish_out(out)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AgentClientError(f"no reply from {to} within {timeout} s") from None
        finally:
            self._pending.pop(corr, None)

    # -- groups (MLS, run by the gateway): agw/<agent>/group/<group>/{out,ctl} in, .../{in,events} out ----------
    def _group_session(self) -> aiomqtt.Client:
        """A second MQTT session for group traffic, so that `receive()` and `messages()` see direct messages only.
        It reuses this client's broker address and credentials."""
        return aiomqtt.Client(self._host, self._port, username=self._username, password=self._password,
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
        """Send to every other member of the group. Returns once the gateway's receipt came, i.e. once the gateway
        has it encrypted for the group and durably queued for every member device; until then the SDK publishes it
        again (same `agw:sdk-id`, which the gateway takes once) after every reconnect and whenever no receipt came
        in time, as for `send`. Raises `MessageRefused` if the gateway refused it (e.g. this agent is not a
        member of the group, or groups are not enabled on the gateway)."""
        try:
            check_id("group", group)
        except BadName as exc:
            raise ValueError(f"group {group!r}: {exc}") from None
        await self._tracked(self._group_topic(group, "out"), payload)

    def _group_of(self, topic: str) -> str | None:
        """The group of a topic `<prefix>/<agent>/group/<group>/in`, else None."""
        head, tail = self._group_in_head, self._group_in_tail
        if topic.startswith(head) and topic.endswith(tail) and len(topic) > len(head) + len(tail):
            group = topic[len(head):-len(tail)]
            return group if "/" not in group else None
        return None

    async def group_messages(self, group: str) -> AsyncIterator[Message]:
        """Messages of one group, as they arrive, with the gateway's user properties (`agw:from`, `agw:group`,
        `agw:epoch`, `agw:message-id`). From the first call on, this client's session subscribes to the group
        (again after every reconnect) and tells the gateway it reads it (the announcement's `agw:groups`): each
        message is acknowledged as it is handed out, and the gateway keeps it (and sends it again) until then,
        as for `messages()`. Messages that arrive while nothing iterates wait here. One consumer per group: two
        iterations of the same group share its messages."""
        try:
            check_id("group", group)
        except BadName as exc:
            raise ValueError(f"group {group!r}: {exc}") from None
        queue = self._group_inboxes.get(group)
        if queue is None:
            queue = self._group_inboxes[group] = asyncio.Queue()
            if self._up.is_set():  # (else the next connect subscribes and announces it)
                with contextlib.suppress(aiomqtt.MqttError):
                    await self._mqtt.subscribe(topics.group_inbox_topic(self.prefix, self.agent, group), qos=1)
                    await self._send_acks(announce=True)
        while True:
            yield self._taken(await queue.get())

    async def messages(self) -> AsyncIterator[Message]:
        """Messages sent to this agent, as they arrive; each is acknowledged to the gateway as it is handed out."""
        while True:
            yield self._taken(await self._inbox.get())

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message sent to this agent (acknowledged to the gateway as it is returned)."""
        return self._taken(await asyncio.wait_for(self._inbox.get(), timeout))


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


def _fail_with_refusal(receipt: asyncio.Future[None], reply: asyncio.Future[Message]) -> None:
    """A refused request gets no reply: its caller hears the refusal at once instead of a timeout."""
    if receipt.cancelled():
        return
    exc = receipt.exception()
    if exc is not None and not reply.done():
        reply.set_exception(exc)


def _retrieved(receipt: asyncio.Future[None]) -> None:
    """Mark a refusal as seen, so a receipt nobody awaits any more is not reported as a lost exception."""
    if not receipt.cancelled():
        receipt.exception()
