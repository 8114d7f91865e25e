"""The MQTT side of the gateway: one MQTT 5 session with the local Mosquitto.

Built on paho-mqtt directly (aiomqtt hides manual acknowledgement): a message from an agent is acknowledged to
the broker only after the gateway has written it durably to its outbox (`ack()`), so a crash in between makes
the broker redeliver it. The session is persistent (clean_start=False, long expiry), so messages agents publish
while the gateway is down wait in the broker. paho's network thread hands messages to asyncio through
`call_soon_threadsafe`; publishes to agents complete when the broker's PUBACK arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway import topics

log = logging.getLogger("agw.bridge")

SESSION_EXPIRY = 7 * 24 * 3600
RECEIVE_MAXIMUM = 1024


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


class MqttBridge:
    def __init__(self, *, host: str, port: int, client_id: str, prefix: str, username: str | None = None,
                 password_file: Path | None = None, max_inflight: int = 256) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.incoming: asyncio.Queue[AgentMessage] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._early: dict[int, bool] = {}
        self._lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                        manual_ack=True)
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
        client.subscribe([(t, 1) for t in (topics.out_subscription(self.prefix),
                                            *topics.group_subscriptions(self.prefix))])
        self._loop.call_soon_threadsafe(self._connected.set)
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
        self._loop.call_soon_threadsafe(self.incoming.put_nowait, am)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: ReasonCode,
                    properties: Properties | None = None) -> None:
        ok = not rc.is_failure
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


def _succeed(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _fail(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
