"""The MQTT side of the gateway: one MQTT 5 session with the local Mosquitto.

Built on paho-mqtt directly (aiomqtt hides manual acknowledgement): a message from an agent is acknowledged to
the broker only after the gateway has written it durably to its outbox (`ack()`), so a crash in between makes
the broker redeliver it. The session is persistent (clean_start=False, long expiry), so messages agents publish
while the gateway is down wait in the broker. paho's network thread hands messages to asyncio through
`call_soon_threadsafe`; publishes to agents complete when the broker's PUBACK arrives.

Messages for agents go out exactly once through MQTT 5 QoS 2 with packet identifiers the caller chooses and
stores (`publish_exactly_once`): the broker forwards a QoS 2 message to subscribers only on PUBREL and recognises
a resent PUBLISH by its packet id while it holds it, so a gateway that crashed mid-exchange resumes it after a
restart (same id: PUBLISH again before the broker's PUBREC, PUBREL after it) without a second copy reaching the
agent. The caller records "the broker has it" (`on_broker_has`) before the PUBREL goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTErrorCode, _ConnectionState
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway import topics

log = logging.getLogger("agw.bridge")

SESSION_EXPIRY = 7 * 24 * 3600
RECEIVE_MAXIMUM = 1024
# Agents' messages received and not yet taken by the gateway, in bytes: past this, paho's thread stops reading the
# socket (the broker keeps the rest) until the outbox writer catches up. RECEIVE_MAXIMUM alone bounds the count,
# which at 16 KiB per message would be 16 MB (and the copies made while they are stored). Reading resumes anyway
# after INCOMING_PAUSE_MAX seconds, so PINGRESPs and acknowledgements keep the connection alive while the outbox is
# full (the count bound still holds then).
INCOMING_MAX_BYTES = 2 * 1024 * 1024
INCOMING_PAUSE_MAX = 10.0
MESSAGE_OVERHEAD = 256  # per message: the AgentMessage, its topic and properties, counted against the bound
MAX_PACKET_ID = 65535
MAX_EXACTLY_ONCE = 16_384  # packet ids held at once for stored messages; the rest wait in the inbox
_OK = ReasonCode(PacketTypes.PUBREC, "Success")


BrokerHas = Callable[[list[int]], None]


class BrokerUnavailable(Exception):
    """The local broker is not connected, or refused a publish; the caller retries later."""


@dataclass(frozen=True, slots=True)
class AgentMessage:
    """A message an agent published under agw/<agent>/out/..."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    dup: bool
    response_topic: str | None
    correlation_data: bytes | None
    content_type: str | None
    payload_utf8: bool
    user_properties: tuple[tuple[str, str], ...]


class _PahoClient(mqtt.Client):
    """paho's client with two hooks for exactly-once publishing: the next PUBLISH may use a packet id chosen by
    the caller, and a PUBREC is handed to the gateway instead of being answered at once with PUBREL."""

    def __init__(self, *args: Any, on_pubrec: Callable[[int, ReasonCode], None],
                 may_read: Callable[[], bool] = lambda: True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._forced_mid = threading.local()
        self._on_pubrec = on_pubrec
        self._may_read = may_read
        self.reserved_ids: set[int] = set()  # ids the gateway holds for its stored messages

    def _packet_read(self) -> MQTTErrorCode:
        # Flow control in bytes: leave the next packet in the socket while the gateway holds too much.
        if not self._may_read():
            return MQTTErrorCode.MQTT_ERR_AGAIN
        return super()._packet_read()

    def publish_with_id(self, mid: int, topic: str, payload: bytes, properties: Properties) -> mqtt.MQTTMessageInfo:
        self._forced_mid.value = mid
        try:
            return self.publish(topic, payload, qos=2, properties=properties)
        finally:
            self._forced_mid.value = None

    def _mid_generate(self) -> int:
        forced = getattr(self._forced_mid, "value", None)
        if forced is not None:
            return int(forced)
        while True:  # paho's own ids (subscriptions, QoS 1) never collide with the gateway's stored ones
            mid = super()._mid_generate()
            if mid not in self.reserved_ids:
                return mid

    def _handle_pubrec(self) -> mqtt.MQTTErrorCode:
        rec = _packet.decode_pubrec(self._in_packet["command"], self._in_packet["packet"], self._protocol)
        with self._out_message_mutex:
            known = rec.mid in self._out_messages and self._out_messages[rec.mid].qos == 2
        if known:
            self._on_pubrec(rec.mid, rec.reason)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def release(self, mid: int) -> None:
        """Send PUBREL for a message the broker acknowledged with PUBREC (or held before a restart). If the
        connection dropped meanwhile, paho sends the PUBREL after the next CONNACK instead of the PUBLISH."""
        with self._out_message_mutex:
            msg = self._out_messages.get(mid)
            if msg is None or msg.qos != 2:
                return
            if msg.state == mqtt.mqtt_ms_wait_for_pubrec:
                msg.state = mqtt.mqtt_ms_wait_for_pubcomp  # counted in flight already
                msg.timestamp = time.monotonic()
                if self._state == _ConnectionState.MQTT_CS_CONNECTED:
                    self._send_pubrel(mid)
                # else the reconnect turns it into a PUBREL resend
            elif msg.state == mqtt.mqtt_ms_publish:
                msg.state = mqtt.mqtt_ms_resend_pubrel  # reset by a reconnect, not yet resent

    def drop(self, mid: int) -> None:
        """Forget a message the broker refused in its PUBREC (the QoS 2 exchange ends there)."""
        with self._out_message_mutex:
            msg = self._out_messages.pop(mid, None)
            if msg is not None and msg.state in (mqtt.mqtt_ms_wait_for_pubrec, mqtt.mqtt_ms_wait_for_pubcomp):
                self._inflight_messages -= 1
                if self._max_inflight_messages > 0:
                    self._update_inflight()  # a queued message may go out now

    def resume_released(self, mid: int, topic: str, payload: bytes, properties: Properties) -> None:
        """Take up, after a restart, an exchange whose PUBREC was already recorded: only PUBREL is left to send
        (now, or by paho after the next CONNACK). The message is kept in case the broker turns out to have
        lost our session (`publish_again_unreleased`)."""
        msg = mqtt.MQTTMessage(mid, topic.encode())
        msg.qos, msg.payload, msg.properties = 2, payload, properties
        msg.state = mqtt.mqtt_ms_wait_for_pubcomp
        with self._out_message_mutex:
            if mid in self._out_messages:
                return
            self._out_messages[mid] = msg
            self._inflight_messages += 1
            if self._state == _ConnectionState.MQTT_CS_CONNECTED:
                self._send_pubrel(mid)

    def publish_again_unreleased(self) -> int:
        """The broker lost our session (CONNACK without session present): a PUBREL for a message it answered
        PUBREC to before would now get PUBCOMP without delivery. Send those messages again as new ones (the
        agent may see one twice, with the same message id: never none). Called in on_connect, before paho
        resends. Returns how many."""
        n = 0
        with self._out_message_mutex:
            for msg in self._out_messages.values():
                if msg.qos == 2 and msg.state in (mqtt.mqtt_ms_resend_pubrel, mqtt.mqtt_ms_wait_for_pubcomp):
                    msg.state, msg.dup = mqtt.mqtt_ms_publish, False
                    n += 1
        return n


class IncomingQueue(asyncio.Queue[AgentMessage]):
    """Agents' messages for the outbox writer, with the bytes they hold: taking one out (`get`, `get_nowait`)
    makes room, and wakes paho's thread if it waits for room."""

    def __init__(self, max_bytes: int = INCOMING_MAX_BYTES, pause_max: float = INCOMING_PAUSE_MAX) -> None:
        super().__init__()
        self.max_bytes, self.pause_max = max_bytes, pause_max
        self.held_bytes = 0
        self._room = threading.Condition()
        self._paused_since: float | None = None

    @staticmethod
    def cost(m: AgentMessage) -> int:
        return len(m.payload) + len(m.correlation_data or b"") + MESSAGE_OVERHEAD

    def add(self, m: AgentMessage) -> None:
        """Count a message (from paho's thread) before it is handed to the event loop."""
        with self._room:
            self.held_bytes += self.cost(m)

    def _get(self) -> AgentMessage:
        m = super()._get()
        with self._room:
            self.held_bytes -= self.cost(m)
            self._room.notify_all()
        return m

    def may_read(self) -> bool:
        """In paho's thread, before each packet: whether to read it now. Waits briefly (50 ms) for room."""
        with self._room:
            if self.held_bytes < self.max_bytes:
                self._paused_since = None
                return True
            now = time.monotonic()
            if self._paused_since is None:
                self._paused_since = now
            elif now - self._paused_since >= self.pause_max:
                return True  # the writer is stuck (outbox full?): fall back to the count bound
            self._room.wait(0.05)
            return self.held_bytes < self.max_bytes


class MqttBridge:
    def __init__(self, *, host: str, port: int, client_id: str, prefix: str, username: str | None = None,
                 password_file: Path | None = None, max_inflight: int = 256,
                 incoming_max_bytes: int = INCOMING_MAX_BYTES, incoming_pause_max: float = INCOMING_PAUSE_MAX) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.incoming = IncomingQueue(incoming_max_bytes, incoming_pause_max)
        self._loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._early: dict[int, bool] = {}
        self._lock = threading.Lock()
        # Exactly-once publishes by packet id, until PUBCOMP, with the callback that records (durably) that the
        # broker holds them: PUBREL, which makes the broker deliver, is sent only after it returns.
        self._once: dict[int, tuple[asyncio.Future[None], BrokerHas]] = {}
        self._recs: list[tuple[int, ReasonCode]] = []
        self._next_id = 0
        self._session_kept: bool | None = None  # did the broker still hold our session at the first CONNACK?
        self.connects = 0  # successful connections so far (gateway/receipts.py publishes held messages on each)
        c = _PahoClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                        manual_ack=True, on_pubrec=self._on_pubrec, may_read=self.incoming.may_read)
        if username:
            password = password_file.read_text().strip() if password_file else None
            c.username_pw_set(username, password)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(0.2, 5)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        self._client = c

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self, timeout: float = 10.0) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY
        # Flow control: the broker sends at most this many unacknowledged messages, and we acknowledge only
        # after the outbox write, so a burst waits in the broker instead of in our memory.
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self._client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self._client.loop_start()
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"no MQTT connection to {self.host}:{self.port} within {timeout:.0f} s") from None

    async def stop(self) -> None:
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    # -- paho callbacks (network thread) ------------------------------------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, userdata: object, sock: object) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: ReasonCode,
                    properties: Properties | None = None) -> None:
        if rc.is_failure:
            log.error("MQTT broker %s:%s refused the connection: %s", self.host, self.port, rc)
            return
        present = bool(getattr(flags, "session_present", False))
        if self._session_kept is None:
            self._session_kept = present  # first connection of this process: decides for restored exchanges
        if not present:
            again = self._client.publish_again_unreleased()
            if again:
                log.warning("the MQTT broker lost this gateway's session: %d message(s) whose hand-over was "
                            "interrupted are published again (an agent may see one twice, same agw:message-id)",
                            again)
        client.subscribe([(t, 1) for t in topics.gateway_subscriptions(self.prefix)])
        self._loop.call_soon_threadsafe(self._count_connect)
        log.info("connected to MQTT broker %s:%s", self.host, self.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: ReasonCode,
                       properties: Properties | None = None) -> None:
        self._loop.call_soon_threadsafe(self._connected.clear)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            self._loop.call_soon_threadsafe(_fail, fut, BrokerUnavailable("MQTT connection lost before PUBACK"))
        log.warning("MQTT broker connection lost (%s); reconnecting", rc)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        p = getattr(msg, "properties", None)
        user = tuple((str(k), str(v)) for k, v in getattr(p, "UserProperty", []) or [])
        am = AgentMessage(
            topic=msg.topic, payload=bytes(msg.payload), mid=msg.mid, qos=msg.qos, dup=bool(msg.dup),
            response_topic=getattr(p, "ResponseTopic", None), correlation_data=getattr(p, "CorrelationData", None),
            content_type=getattr(p, "ContentType", None), payload_utf8=getattr(p, "PayloadFormatIndicator", 0) == 1,
            user_properties=user)
        self.incoming.add(am)
        self._loop.call_soon_threadsafe(self.incoming.put_nowait, am)

    def _on_pubrec(self, mid: int, reason: ReasonCode) -> None:
        with self._lock:
            first = not self._recs
            self._recs.append((mid, reason))
        if first:
            self._loop.call_soon_threadsafe(self._take_recs)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: ReasonCode,
                    properties: Properties | None = None) -> None:
        ok = not rc.is_failure
        with self._lock:
            once = self._once.pop(mid, None)
        if once is not None:
            self._loop.call_soon_threadsafe(_succeed, once[0])
            return
        with self._lock:
            fut = self._pending.pop(mid, None)
            if fut is None:
                self._early[mid] = ok
                return
        if ok:
            self._loop.call_soon_threadsafe(_succeed, fut)
        else:
            self._loop.call_soon_threadsafe(_fail, fut, BrokerUnavailable(f"broker refused the publish: {rc}"))

    # -- asyncio side -------------------------------------------------------------------------------------------
    def _count_connect(self) -> None:
        self.connects += 1
        self._connected.set()

    def _take_recs(self) -> None:
        with self._lock:
            recs, self._recs = self._recs, []
        held: dict[BrokerHas, list[int]] = {}
        for mid, reason in recs:
            with self._lock:
                once = self._once.get(mid)
            if once is None:
                continue
            if reason.is_failure:
                self._client.drop(mid)
                with self._lock:
                    self._once.pop(mid, None)
                _fail(once[0], BrokerUnavailable(f"broker refused the publish: {reason}"))
            else:
                held.setdefault(once[1], []).append(mid)
        for record, mids in held.items():
            try:
                record(mids)
            except Exception as exc:
                # Not recorded: no PUBREL. The broker keeps the message; try again shortly (and paho resends the
                # PUBLISH after a reconnect, which the broker answers with PUBREC again).
                log.error("cannot record %d message(s) the broker holds (%s); retrying", len(mids), exc)
                with self._lock:
                    first = not self._recs
                    self._recs.extend((mid, _OK) for mid in mids)
                if first:
                    self._loop.call_later(1.0, self._take_recs)
                continue
            for mid in mids:
                self._client.release(mid)

    def reserve_packet_id(self) -> int | None:
        """A packet id for a new exactly-once publish, or None while too many are held (the caller waits)."""
        reserved = self._client.reserved_ids
        if len(reserved) >= MAX_EXACTLY_ONCE:
            return None
        while True:
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in reserved and self._next_id not in self._client._out_messages:
                reserved.add(self._next_id)
                return self._next_id

    def claim_packet_id(self, packet_id: int) -> None:
        """Hold an id stored before a restart, so no other publish uses it."""
        self._client.reserved_ids.add(packet_id)

    def free_packet_id(self, packet_id: int) -> None:
        self._client.reserved_ids.discard(packet_id)

    async def publish_exactly_once(self, packet_id: int, topic: str, payload: bytes, *, on_broker_has: BrokerHas,
                                   released: bool = False, response_topic: str | None = None,
                                   correlation_data: bytes | None = None,
                                   content_type: str | None = None, payload_utf8: bool = False,
                                   user_properties: tuple[tuple[str, str], ...] = ()) -> None:
        """Publish QoS 2 under `packet_id` (held with `reserve_packet_id` or `claim_packet_id` and stored with the
        message) and wait for PUBCOMP. `on_broker_has(ids)` must record that the broker holds these ids before
        it returns (it is called in batches, on the event loop). Resuming after a restart: the same call (the
        broker recognises the id and content), or `released=True` once `on_broker_has` recorded the id (then
        only PUBREL is sent).
        A connection loss does not fail the call: paho resumes the exchange after reconnecting.
        Raises `BrokerUnavailable` if the broker refuses the message in its PUBREC."""
        fut: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            if packet_id in self._once:
                raise BrokerUnavailable(f"packet id {packet_id} is already being published")
            self._once[packet_id] = (fut, on_broker_has)
        self._client.reserved_ids.add(packet_id)
        props = publish_properties(response_topic, correlation_data, content_type, payload_utf8, user_properties)
        if released and self._session_kept is False:
            released = False  # stored before a restart, but the broker forgot us: a PUBREL would deliver nothing
            log.warning("publishing again a message the broker had acknowledged before it lost this gateway's "
                        "session (packet id %d; the agent may see it twice)", packet_id)
        if released:
            self._client.resume_released(packet_id, topic, payload, props)
        else:
            info = self._client.publish_with_id(packet_id, topic, payload, props)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                with self._lock:
                    self._once.pop(packet_id, None)
                raise BrokerUnavailable(f"publish failed: {mqtt.error_string(info.rc)}")
        await fut

    def ack(self, msg: AgentMessage) -> None:
        """PUBACK the agent's message: call only once it is durable in the outbox."""
        if msg.qos > 0:
            self._client.ack(msg.mid, msg.qos)

    async def publish(self, topic: str, payload: bytes, *, response_topic: str | None = None,
                      correlation_data: bytes | None = None, content_type: str | None = None,
                      payload_utf8: bool = False, user_properties: tuple[tuple[str, str], ...] = (),
                      timeout: float = 10.0) -> None:
        """Publish QoS 1 to an agent and wait for the broker's PUBACK."""
        if not self._connected.is_set():
            raise BrokerUnavailable("not connected to the MQTT broker")
        props = publish_properties(response_topic, correlation_data, content_type, payload_utf8, user_properties)
        info = self._client.publish(topic, payload, qos=1, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(f"publish failed: {mqtt.error_string(info.rc)}")
        fut: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = fut
        if early is not None:
            if not early:
                raise BrokerUnavailable("broker refused the publish")
            return
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            with self._lock:
                self._pending.pop(info.mid, None)
            raise BrokerUnavailable(f"no PUBACK within {timeout:.0f} s") from None


def publish_properties(response_topic: str | None, correlation_data: bytes | None, content_type: str | None,
                       payload_utf8: bool, user_properties: tuple[tuple[str, str], ...]) -> Properties:
    """MQTT 5 PUBLISH properties, only those set (shared with the agent SDK, gateway/client.py)."""
    props = Properties(PacketTypes.PUBLISH)
    if response_topic:
        props.ResponseTopic = response_topic
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if content_type:
        props.ContentType = content_type
    if payload_utf8:
        props.PayloadFormatIndicator = 1
    if user_properties:
        props.UserProperty = list(user_properties)
    return props


def _succeed(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _fail(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
