"""The MQTT side of the gateway: one MQTT 5 session with the local Mosquitto, driven by the gateway's event loop.

Built on paho-mqtt directly (aiomqtt hides manual acknowledgement), without paho's network thread: the socket is
registered with the asyncio loop (`add_reader`; `add_writer` only while the kernel's send buffer is full), paho's
`_packet_read`/`loop_write`/`loop_misc` run as loop callbacks, and the bridge connects and reconnects itself
(backoff 0.2 s doubling to 1 s; paho's `loop_forever` went to 5 s). Nothing crosses threads: no locks, no
`call_soon_threadsafe`. Reads go through a 64 KiB buffer (paho reads a packet a few bytes per `recv`), and writes
queued in one loop iteration (acks for a batch, a batch of publishes) leave in one `send`.

A message from an agent is acknowledged to the broker only after the gateway has written it durably to its outbox
(`ack()`), so a crash in between makes the broker redeliver it. The session is persistent (clean_start=False, long
expiry), so messages agents publish while the gateway is down wait in the broker. Receive Maximum bounds how many
unacknowledged messages the broker sends; `IncomingQueue` bounds their bytes: past the bound the bridge stops
reading the socket (`remove_reader`) until the outbox writer takes messages off the queue, or until
INCOMING_PAUSE_MAX seconds have passed (then the count bound alone holds, and PINGRESPs keep the connection alive).
Publishes to agents complete when the broker's PUBACK arrives.

Messages for agents go out exactly once through MQTT 5 QoS 2 with packet identifiers the caller chooses and
stores (`publish_exactly_once`): the broker forwards a QoS 2 message to subscribers only on PUBREL and recognises
a resent PUBLISH by its packet id while it holds it, so a gateway that crashed mid-exchange resumes it after a
restart (same id: PUBLISH again before the broker's PUBREC, PUBREL after it) without a second copy reaching the
agent. The caller records "the broker has it" (`on_broker_has`) before the PUBREL goes out.

PUBLISH properties are encoded directly (`encode_publish_properties`, MQTT 5 section 2.2.2) into a `Properties`
subclass whose `pack()` returns the bytes: paho's own `Properties` scans its name table on every attribute set.
On the exactly-once path (a few hundred messages per relay frame) paho keeps its state (`_out_messages`, the
in-flight window, resends after a reconnect) but the per-message steps are the bridge's: the PUBLISH packet is
built in one step (`publish_packet`, byte for byte paho's), the message carries no `MQTTMessageInfo` of its own,
a batch of PUBRECs is answered with one queued packet of PUBRELs, 4-byte PUBREC/PUBCOMP/PUBACK packets are taken
from the read buffer without paho's reader, and an exchange ends through a callback (`begin_exactly_once`)
instead of a future.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt import _packet
from paho.mqtt.client import PUBLISH
from paho.mqtt.enums import MQTTErrorCode, _ConnectionState
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway import topics

log = logging.getLogger("agw.bridge")

SESSION_EXPIRY = 7 * 24 * 3600
RECEIVE_MAXIMUM = 1024
KEEPALIVE = 30
# Agents' messages received and not yet taken by the gateway, in bytes: past this, the bridge stops reading the
# socket (the broker keeps the rest) until the outbox writer catches up. RECEIVE_MAXIMUM alone bounds the count,
# which at 16 KiB per message would be 16 MB (and the copies made while they are stored). Reading resumes anyway
# after INCOMING_PAUSE_MAX seconds, so PINGRESPs and acknowledgements keep the connection alive while the outbox is
# full (the count bound still holds then). 512 KiB (was 2 MiB) is ~1,000 messages of 256 B, more than the writer's
# batch of 512: in 20,000 x 256 B bursts the sender's peak RSS was ~1.6 MB lower with no loss of throughput
# (docs/performance.md, 2026-12-07 `mem`).
INCOMING_MAX_BYTES = 512 * 1024
INCOMING_PAUSE_MAX = 10.0
MESSAGE_OVERHEAD = 256  # per message: the AgentMessage, its topic and properties, counted against the bound
MAX_PACKET_ID = 65535
MAX_EXACTLY_ONCE = 16_384  # packet ids held at once for stored messages; the rest wait in the inbox
# Seconds between connection attempts, doubling. The cap is short: a broker that restarts without our session
# (killed before it saved it) routes what agents publish meanwhile to nobody, so every second away can lose raw
# agents' messages; an attempt against the local broker costs one refused connect.
RECONNECT_MIN, RECONNECT_MAX = 0.2, 1.0
REFUSED_RETRY = 10.0  # seconds before trying a broker again that refused our CONNECT (credentials): logged each time
CONNECT_TIMEOUT = 5.0  # TCP connect
READ_CHUNK = 65536  # bytes per recv
READ_BUDGET = 512  # packets handled per readable event before other callbacks get a turn
WRITE_COALESCE_BYTES = 256 * 1024  # queued packets joined into one send, at most (a full socket: copied again later)
_OK = ReasonCode(PacketTypes.PUBREC, "Success")
_PUBACK_OK, _PUBCOMP_OK = ReasonCode(PacketTypes.PUBACK, "Success"), ReasonCode(PacketTypes.PUBCOMP, "Success")
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]  # handed to on_publish, which ignores it
_PUBACK_CMD = 0x40
_PUBACK_PACKET = struct.Struct("!BBH")  # PUBACK, remaining length 2, packet id (success, no properties)
_PUBREL_CMD = 0x62  # PUBREL (its fixed header's flags are 0010)
# The acknowledgements read without paho's byte-by-byte reader: success, no properties, remaining length 2
_PUBACK_IN, _PUBREC_IN, _PUBCOMP_IN = 0x40, 0x50, 0x70
_QOS2_PUBLISH = PUBLISH | 0x04


BrokerHas = Callable[[list[int]], None]
# Called when an exactly-once exchange ended: None at PUBCOMP, else why it failed (see `begin_exactly_once`).
Done = Callable[[BaseException | None], None]


class BrokerUnavailable(Exception):
    """The local broker is not connected, or refused a publish; the caller retries later."""


class BrokerLostMessage(BrokerUnavailable):
    """The broker answered our PUBREL with a failure PUBCOMP (e.g. "packet identifier not found"): it no longer
    holds a message it had acknowledged with PUBREC, typically because it restarted from a save older than the
    exchange. Nothing was delivered: the caller must publish the message again, as a new exchange."""


class AgentMessage(NamedTuple):
    """A message an agent published under agw/<agent>/out/... (A named tuple, not a frozen dataclass: one is built
    per message read, and a tuple of ten fields is built in a fifth of the time.)"""

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


# -- PUBLISH properties -----------------------------------------------------------------------------------------
_PAYLOAD_FORMAT, _CONTENT_TYPE, _RESPONSE_TOPIC, _CORRELATION_DATA, _USER_PROPERTY = 0x01, 0x03, 0x08, 0x09, 0x26
_U16 = struct.Struct("!H")


def _vbi(n: int) -> bytes:
    """MQTT Variable Byte Integer (section 1.5.5)."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _field(b: bytes, what: str) -> bytes:
    if len(b) > 0xFFFF:
        raise ValueError(f"MQTT property {what} is {len(b)} bytes; at most 65535 fit (shorten it)")
    return _U16.pack(len(b)) + b


def encode_publish_properties(response_topic: str | None, correlation_data: bytes | None, content_type: str | None,
                              payload_utf8: bool, user_properties: tuple[tuple[str, str], ...]) -> bytes:
    """The PUBLISH properties field (MQTT 5 section 2.2.2: Variable Byte Integer length, then identifier and value
    per property), in the order paho writes them, only those set."""
    body = encode_publish_properties_body(response_topic, correlation_data, content_type, payload_utf8,
                                          user_properties)
    return _vbi(len(body)) + body


def encode_publish_properties_body(response_topic: str | None, correlation_data: bytes | None,
                                   content_type: str | None, payload_utf8: bool,
                                   user_properties: tuple[tuple[str, str], ...]) -> bytes:
    """`encode_publish_properties` without the length in front: a body that `with_user_property` extends (the
    receiver encodes what recurs from one message to the next once, and appends the message id to it)."""
    parts: list[bytes] = []
    if payload_utf8:
        parts.append(b"\x01\x01")
    if content_type:
        parts.append(b"\x03" + _field(content_type.encode(), "content type"))
    if response_topic:
        parts.append(b"\x08" + _field(response_topic.encode(), "response topic"))
    if correlation_data is not None:
        parts.append(b"\x09" + _field(bytes(correlation_data), "correlation data"))
    for k, v in user_properties:
        parts.append(b"\x26" + _field(k.encode(), "user property name") + _field(v.encode(), "user property value"))
    return b"".join(parts)


def user_property_name(name: str) -> bytes:
    """A user property's identifier and name, encoded once for `with_user_property`."""
    return b"\x26" + _field(name.encode(), "user property name")


def with_user_property(body: bytes, name: bytes, value: str) -> bytes:
    """The PUBLISH properties field: `body` (from `encode_publish_properties_body`), then one more user property
    (`name` from `user_property_name`), i.e. what `encode_publish_properties` gives with that property last."""
    raw = value.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"MQTT property user property value is {len(raw)} bytes; at most 65535 fit (shorten it)")
    n = len(body) + len(name) + 2 + len(raw)
    return b"".join((bytes((n,)) if n < 128 else _vbi(n), body, name, _U16.pack(len(raw)), raw))


_TEMPLATE = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


class PublishProperties(Properties):
    """PUBLISH properties encoded once, up front: `pack()` returns the bytes. Reading them back as attributes
    (`ResponseTopic`, `UserProperty`, ...) works as with paho's class; setting new ones is not supported."""

    _packed: bytes
    # paho's tables, shared instead of built per instance (they are never changed)
    types = _TEMPLATE.types
    names = _TEMPLATE.names
    properties = _TEMPLATE.properties

    def __init__(self, response_topic: str | None = None, correlation_data: bytes | None = None,
                 content_type: str | None = None, payload_utf8: bool = False,
                 user_properties: tuple[tuple[str, str], ...] = ()) -> None:
        # no super().__init__(): it builds paho's tables again
        put = object.__setattr__
        put(self, "packetType", PacketTypes.PUBLISH)
        put(self, "_packed", encode_publish_properties(response_topic, correlation_data, content_type, payload_utf8,
                                                       user_properties))
        if payload_utf8:
            put(self, "PayloadFormatIndicator", 1)
        if content_type:
            put(self, "ContentType", content_type)
        if response_topic:
            put(self, "ResponseTopic", response_topic)
        if correlation_data is not None:
            put(self, "CorrelationData", correlation_data)
        if user_properties:
            put(self, "UserProperty", list(user_properties))

    @classmethod
    def encoded(cls, packed: bytes) -> PublishProperties:
        """From the bytes `encode_publish_properties` (or `with_user_property`) made, without setting any attribute
        (the receiver builds one per message; nothing but `pack()` reads them there): an attribute is decoded from
        the bytes when first read (`__getattr__`)."""
        self = cls.__new__(cls)
        self.__dict__.update(packetType=PacketTypes.PUBLISH, _packed=packed, _lazy=True)
        return self

    def __getattr__(self, name: str) -> Any:
        # Only called for an attribute not set. On an instance from `encoded`, the properties are decoded (paho's
        # decoder) at the first such read; anything else is missing, as on paho's class.
        d = self.__dict__
        if d.get("_lazy"):
            decoded = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            decoded.unpack(d["_packed"])  # type: ignore[no-untyped-call]
            for n, v in vars(decoded).items():
                if n not in ("packetType", "types", "names", "properties"):
                    d[n] = v
            d["_lazy"] = False
            if name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("PublishProperties are encoded when created; build a new one instead")

    def pack(self) -> bytes:
        return self._packed


def publish_properties(response_topic: str | None, correlation_data: bytes | None, content_type: str | None,
                       payload_utf8: bool, user_properties: tuple[tuple[str, str], ...]) -> Properties:
    """MQTT 5 PUBLISH properties, only those set (shared with the agent SDK, gateway/client.py)."""
    return PublishProperties(response_topic, correlation_data, content_type, payload_utf8, user_properties)


def _read_vbi(b: bytes | bytearray, pos: int) -> tuple[int, int]:
    n, mult = 0, 1
    for i in range(4):
        byte = b[pos + i]
        n += (byte & 0x7F) * mult
        if byte < 0x80:
            return n, pos + i + 1
        mult *= 128
    raise MalformedPacket("Variable Byte Integer longer than 4 bytes")


def _read_bin(b: bytes | bytearray, pos: int, end: int) -> tuple[bytes, int]:
    n = (b[pos] << 8) | b[pos + 1]
    pos += 2
    if pos + n > end:
        raise MalformedPacket("length-prefixed field runs past its end")
    return bytes(b[pos:pos + n]), pos + n


def _read_str(b: bytes | bytearray, pos: int, end: int) -> tuple[str, int]:
    raw, pos = _read_bin(b, pos, end)
    s = raw.decode()  # strict: invalid UTF-8 (and encoded surrogates) raise
    if "\x00" in s:  # (U+FEFF is legal and Mosquitto passes it on: taken, and refused at ingest with a reason)
        raise MalformedPacket("NUL in an MQTT string")
    return s, pos


_TOPICS: dict[bytes, str] = {}  # topic bytes -> the one str for them (agents publish on a few topics)
_TOPICS_MAX = 1024


def _topic_str(raw: bytes) -> str:
    """The decoded topic (strict UTF-8: invalid input raises), one str object per recurring topic of up to
    CACHED_TOPIC_MAX bytes: every message held in the incoming queue (up to ~1,500 of 256 B) shares it instead of
    carrying an ~80-byte copy (issue 7), and its hash is computed once for the lookups downstream."""
    topic = raw.decode()
    if len(raw) <= topics.CACHED_TOPIC_MAX:
        if len(_TOPICS) >= _TOPICS_MAX:
            _TOPICS.clear()
        _TOPICS[raw] = topic
    return topic


def decode_agent_publish(header: int, packet: bytes | bytearray) -> AgentMessage:
    """An MQTT 5 PUBLISH packet (fixed header byte, then everything after the remaining length) as the
    `AgentMessage` paho's decoder plus `MqttBridge._on_message` would make of it, without building paho's
    `Properties` (which scans its name table per property). Raises paho's `MalformedPacket` on bad input, which
    paho's reader turns into a protocol error and a closed connection, as for its own decoder."""
    try:
        qos = (header >> 1) & 3
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3")
        end = len(packet)
        topic_b, pos = _read_bin(packet, 0, end)
        topic = _TOPICS.get(topic_b)
        if topic is None:
            topic = _topic_str(topic_b)
        mid = 0
        if qos:
            mid = (packet[pos] << 8) | packet[pos + 1]
            pos += 2
        plen, pos = _read_vbi(packet, pos)
        pend = pos + plen
        if pend > end:
            raise MalformedPacket("PUBLISH properties run past the packet")
        if plen == 0:  # no properties (most messages of a plain client): what the loop below would make of none
            return AgentMessage(topic, bytes(packet[pend:]), mid, qos, bool(header & 0x08), None, None, None,
                                False, ())
        response_topic = content_type = None
        correlation_data = None
        utf8 = False
        user: list[tuple[str, str]] = []
        seen: set[int] = set()
        while pos < pend:
            ident = packet[pos]
            pos += 1
            if ident in seen and ident not in (_USER_PROPERTY, 0x0B):
                raise MalformedPacket(f"property {ident:#04x} more than once")
            seen.add(ident)
            if ident == _PAYLOAD_FORMAT:
                if packet[pos] > 1:
                    raise MalformedPacket("payload format indicator is neither 0 nor 1")
                utf8 = packet[pos] == 1
                pos += 1
            elif ident == 0x02:  # message expiry interval
                pos += 4
            elif ident == _CONTENT_TYPE:
                content_type, pos = _read_str(packet, pos, pend)
            elif ident == _RESPONSE_TOPIC:
                response_topic, pos = _read_str(packet, pos, pend)
            elif ident == _CORRELATION_DATA:
                correlation_data, pos = _read_bin(packet, pos, pend)
            elif ident == 0x0B:  # subscription identifier
                _, pos = _read_vbi(packet, pos)
            elif ident == 0x23:  # topic alias
                pos += 2
            elif ident == _USER_PROPERTY:
                k, pos = _read_str(packet, pos, pend)
                v, pos = _read_str(packet, pos, pend)
                user.append((k, v))
            else:
                raise MalformedPacket(f"property {ident:#04x} is not one of PUBLISH")
        if pos != pend:
            raise MalformedPacket("PUBLISH properties overrun their length")
    except (IndexError, ValueError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise MalformedPacket(f"malformed PUBLISH: {exc}") from exc
    return AgentMessage(topic, bytes(packet[pend:]), mid, qos, bool(header & 0x08),  # (positional: faster)
                        response_topic, correlation_data, content_type, utf8, tuple(user))


def publish_packet(packet_id: int, topic: bytes, properties: bytes, payload: bytes) -> bytes:
    """An MQTT 5 QoS 2 PUBLISH packet (section 3.3), as paho's `_send_publish` builds it (first send: no DUP)."""
    if len(topic) > 0xFFFF:
        raise ValueError("Publish topic is too long.")
    rest = (_U16.pack(len(topic)), topic, _U16.pack(packet_id), properties, payload)
    return b"".join((bytes((_QOS2_PUBLISH,)), _vbi(sum(map(len, rest))), *rest))


class _NoWaitInfo(mqtt.MQTTMessageInfo):
    """The `MQTTMessageInfo` of every exactly-once message: nobody waits on it (the bridge's future says when the
    exchange ended), so one shared instance does, and paho's per-message `threading.Condition` (made with each
    `MQTTMessage`, notified at PUBCOMP) is not needed."""

    __slots__ = ()

    def _set_as_published(self) -> None:
        pass


_NO_WAIT = _NoWaitInfo(0)


class _OnceMessage(mqtt.MQTTMessage):
    """paho's outgoing QoS 2 message (kept in `_out_messages` until PUBCOMP, resent by paho after a reconnect),
    built without an `MQTTMessageInfo` of its own."""

    __slots__ = ()

    def __init__(self, mid: int, topic: bytes, payload: bytes, properties: Properties) -> None:  # no super(): it
        # makes the MQTTMessageInfo
        self.timestamp = time.monotonic()
        self.state = mqtt.mqtt_ms_invalid
        self.dup = False
        self.mid = mid
        self._topic = topic
        self.payload = payload
        self.qos = 2
        self.retain = False
        self.info = _NO_WAIT
        self.properties = properties


# -- paho, adapted ----------------------------------------------------------------------------------------------
class _PahoClient(mqtt.Client):
    """paho's client, driven by the bridge from the event loop, with hooks for exactly-once publishing (the next
    PUBLISH may use a packet id chosen by the caller; a PUBREC is handed to the gateway instead of being answered
    at once with PUBREL), flow control in bytes, buffered reads, coalesced writes and a socket connected by the
    event loop."""

    def __init__(self, *args: Any, on_pubrec: Callable[[int, ReasonCode], None],
                 on_agent_message: Callable[[AgentMessage], None],
                 may_read: Callable[[], bool] = lambda: True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_agent_message = on_agent_message
        self._queued: dict[int, None] = {}  # ids of messages waiting for room in flight, oldest first
        self._on_pubrec = on_pubrec
        self._may_read = may_read
        self.reserved_ids: set[int] = set()  # ids the gateway holds for its stored messages
        self.connected_sock: socket.socket | None = None  # for the next reconnect(), connected by the bridge
        self._rbuf = b""
        self._rpos = 0

    # socket I/O
    def _create_socket(self) -> Any:
        sock, self.connected_sock = self.connected_sock, None
        return sock if sock is not None else super()._create_socket()

    def reconnect(self) -> MQTTErrorCode:
        self._rbuf, self._rpos = b"", 0  # nothing read from the old socket is parsed as the new one's
        return super().reconnect()

    def buffered(self) -> bool:
        return self._rpos < len(self._rbuf)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            if self._sock is None:
                raise ConnectionError("self._sock is None")
            data = self._sock.recv(READ_CHUNK)  # BlockingIOError when empty: paho's "try again"
            if not data:
                return b""
            self._rbuf, self._rpos = data, 0
        end = min(self._rpos + bufsize, len(self._rbuf))
        out = self._rbuf[self._rpos:end]
        self._rpos = end
        return out

    def _packet_read(self) -> MQTTErrorCode:
        # Flow control in bytes: leave the next packet unread while the gateway holds too much.
        if not self._may_read():
            return MQTTErrorCode.MQTT_ERR_AGAIN
        ip = self._in_packet
        if not ip["command"] and not ip["remaining_count"]:  # (not part-way through a packet paho's reader started)
            # Two of every delivered message's packets are a PUBREC and a PUBCOMP of 4 bytes (success, no
            # properties): taken from the read buffer in one step, not by paho's reader (three reads and a dict per
            # packet); an agent's whole PUBLISH likewise (`_read_buffered_publish`).
            buf, pos = self._rbuf, self._rpos
            if len(buf) - pos >= 4 and buf[pos + 1] == 2:
                cmd = buf[pos]
                if cmd == _PUBCOMP_IN or cmd == _PUBREC_IN or cmd == _PUBACK_IN:
                    self._rpos = pos + 4
                    with self._msgtime_mutex:
                        self._last_bytes_received = mqtt.time_func()
                    return self._ack_read(cmd, (buf[pos + 2] << 8) | buf[pos + 3])
            rc = self._read_buffered_publish()
            if rc is not None:
                return rc
        return super()._packet_read()

    def _ack_read(self, cmd: int, mid: int) -> MQTTErrorCode:
        """A PUBACK, PUBREC or PUBCOMP of success without properties, as paho handles it."""
        if cmd == _PUBREC_IN:
            msg = self._out_messages.get(mid)
            if msg is not None and msg.qos == 2:
                self._on_pubrec(mid, _OK)
        elif mid in self._out_messages:
            return self._do_on_publish(mid, _PUBACK_OK if cmd == _PUBACK_IN else _PUBCOMP_OK, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _do_on_publish(self, mid: int, reason_code: ReasonCode, properties: Properties) -> MQTTErrorCode:
        """paho's (2.x) end of a QoS 1/2 publish, in fewer steps: it runs at every PUBCOMP, i.e. once per message
        delivered (~1.6 -> ~1.0 us in-process). The same order (the callback under `_in_callback_mutex`, then the
        message leaves `_out_messages`, the in-flight count drops and a queued message may go), without the
        callback-version dispatch and its casts, and without the `_callback_mutex` (it guards setting callbacks
        from other threads; the bridge sets them once, on the event loop's thread). The shared no-wait info of
        exactly-once messages is not notified (nobody waits on it)."""
        if self._callback_api_version is not mqtt.CallbackAPIVersion.VERSION2:
            return super()._do_on_publish(mid, reason_code, properties)
        on_publish = self._on_publish
        if on_publish is not None:
            with self._in_callback_mutex:
                try:
                    on_publish(self, self._userdata, mid, reason_code, properties)
                except Exception as err:
                    self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_publish: %s", err)
                    if not self.suppress_exceptions:
                        raise
        msg = self._out_messages.pop(mid)
        if msg.info is not _NO_WAIT:
            msg.info._set_as_published()
        if msg.qos > 0:
            self._inflight_messages -= 1
            if self._max_inflight_messages > 0:
                return self._update_inflight()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _read_buffered_publish(self) -> MQTTErrorCode | None:
        """An agent's QoS 0/1 PUBLISH that lies whole in the read buffer, taken from it in one slice: paho's
        reader takes a packet in three or more `_sock_recv` calls (the fixed header and each length byte one at
        a time) and a dict per packet, which cost more than decoding it. None: anything else (other packets, a
        packet not yet read whole, a length field paho must refuse), which paho's reader then reads as before."""
        buf, pos = self._rbuf, self._rpos
        end = len(buf)
        if end - pos < 2 or not self._manual_ack:
            return None
        header = buf[pos]
        if header & 0xF6 not in (0x30, 0x32):  # PUBLISH, QoS 0 or 1 (QoS 2: paho's own handling)
            return None
        n = 0
        i = pos + 1
        for shift in (0, 7, 14, 21):  # Variable Byte Integer, at most 4 bytes
            if i >= end:
                return None
            byte = buf[i]
            i += 1
            n |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
        else:
            return None  # (paho's reader reports the protocol error)
        if i + n > end:
            return None
        self._rpos = i + n
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        try:
            msg = decode_agent_publish(header, buf[i:i + n])
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._on_agent_message(msg)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_write(self) -> MQTTErrorCode:
        # Everything queued goes out in one send; paho's own loop (one send per packet) handles what needs
        # callbacks on completion (QoS 0 PUBLISH, DISCONNECT) and partial sends.
        out = self._out_packet
        while len(out) > 1 and self._sock is not None:  # in joins of at most WRITE_COALESCE_BYTES
            batch = []
            size = 0
            for p in out:
                if p["pos"] or p["command"] & 0xF0 == mqtt.DISCONNECT or (
                        p["command"] & 0xF0 == PUBLISH and p["qos"] == 0) or size >= WRITE_COALESCE_BYTES:
                    break
                batch.append(p)
                size += len(p["packet"])
            if len(batch) < 2:
                break
            data = b"".join([p["packet"] for p in batch])
            try:
                sent = self._sock_send(data)
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except (AttributeError, ValueError):
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except OSError as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to send on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            for p in batch:
                if sent <= 0:
                    break
                n = min(sent, p["to_process"])
                p["to_process"] -= n
                p["pos"] += n
                sent -= n
                if p["to_process"] == 0:
                    out.popleft()
            self._last_msg_out = time.monotonic()
            if out and out[0]["pos"]:
                return MQTTErrorCode.MQTT_ERR_AGAIN  # the kernel took part: wait for writable
        return super()._packet_write()

    # exactly-once
    def publish_with_id(self, mid: int, topic: str, payload: bytes, properties: Properties) -> MQTTErrorCode:
        """paho's `publish(topic, payload, qos=2, properties=...)` under a packet id chosen by the caller: the same
        state (the message in `_out_messages` for paho's resends, the in-flight window, the queue beyond it, the
        result codes), without the per-message `MQTTMessageInfo` and with the packet built in one step."""
        topic_b = topic.encode()
        if b"+" in topic_b or b"#" in topic_b:  # (as paho's publish, before any state changes)
            raise ValueError("Publish topic cannot contain wildcards.")
        if len(topic_b) > 0xFFFF:
            raise ValueError("Publish topic is too long.")
        if not isinstance(payload, bytes):
            raise TypeError("payload must be bytes")
        if len(payload) > 268435455:
            raise ValueError("Payload too large.")
        out = self._out_messages
        if mid in out or 0 < self._max_queued_messages <= len(out):
            return MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
        msg = _OnceMessage(mid, topic_b, payload, properties)
        out[mid] = msg
        if self._max_inflight_messages and self._inflight_messages >= self._max_inflight_messages:
            msg.state = mqtt.mqtt_ms_queued
            self._queued[mid] = None
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if self._sock is None:
            msg.state = mqtt.mqtt_ms_publish  # sent after the next CONNACK
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        self._inflight_messages += 1
        msg.state = mqtt.mqtt_ms_wait_for_pubrec
        return self._packet_queue(PUBLISH, publish_packet(mid, topic_b, properties.pack(), payload), mid, 2, _NO_WAIT)

    def _mid_generate(self) -> int:
        while True:  # paho's own ids (subscriptions, QoS 1) never collide with the gateway's stored ones
            mid = super()._mid_generate()
            if mid not in self.reserved_ids:
                return mid

    def _handle_pubrec(self) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if len(packet) == 2:  # success, no properties (the reason code may be left out): no decoder needed
            return self._ack_read(_PUBREC_IN, (packet[0] << 8) | packet[1])
        rec = _packet.decode_pubrec(self._in_packet["command"], packet, self._protocol)
        msg = self._out_messages.get(rec.mid)
        if msg is not None and msg.qos == 2:
            self._on_pubrec(rec.mid, rec.reason)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        # success, no properties: paho's decoder builds objects for nothing
        return self._ack_read(_PUBACK_IN if cmd == "PUBACK" else _PUBCOMP_IN, (packet[0] << 8) | packet[1])

    def _handle_publish(self) -> MQTTErrorCode:
        header = self._in_packet["command"]
        if header & 0x06 == 0x04 or not self._manual_ack:  # QoS 2 (never subscribed): paho's own handling
            return super()._handle_publish()
        self._on_agent_message(decode_agent_publish(header, self._in_packet["packet"]))
        return MQTTErrorCode.MQTT_ERR_SUCCESS  # QoS 1: acknowledged by the gateway (manual ack)

    # Messages waiting for room in flight (paho's mqtt_ms_queued), oldest first: paho finds them by walking every
    # message it holds after each acknowledgement, which at hundreds in flight costs more than the publish.
    def publish(self, *args: Any, **kwargs: Any) -> mqtt.MQTTMessageInfo:
        info = super().publish(*args, **kwargs)
        msg = self._out_messages.get(info.mid)
        if msg is not None and msg.state == mqtt.mqtt_ms_queued:
            self._queued[info.mid] = None
        return info

    def _messages_reconnect_reset_out(self) -> None:
        super()._messages_reconnect_reset_out()
        self._queued = dict.fromkeys(mid for mid, m in self._out_messages.items() if m.state == mqtt.mqtt_ms_queued)

    def _update_inflight(self) -> MQTTErrorCode:
        """paho's, sending the queued messages in the same order, without the walk."""
        queued = self._queued
        while queued and (self._max_inflight_messages == 0
                          or self._inflight_messages < self._max_inflight_messages):
            mid = next(iter(queued))
            del queued[mid]
            m = self._out_messages.get(mid)
            if m is None or m.qos == 0 or m.state != mqtt.mqtt_ms_queued:
                continue  # acknowledged, dropped or resent meanwhile
            self._inflight_messages += 1
            m.state = mqtt.mqtt_ms_wait_for_puback if m.qos == 1 else mqtt.mqtt_ms_wait_for_pubrec
            if isinstance(m, _OnceMessage) and not m.dup and self._sock is not None and m.properties is not None:
                rc = self._packet_queue(PUBLISH, publish_packet(m.mid, m._topic, m.properties.pack(), m.payload),
                                        m.mid, 2, _NO_WAIT)
            else:
                rc = self._send_publish(m.mid, m.topic.encode(), m.payload, m.qos, m.retain, m.dup,
                                        properties=m.properties)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def release(self, mid: int) -> None:
        """Send PUBREL for a message the broker acknowledged with PUBREC (or held before a restart). If the
        connection dropped meanwhile, paho sends the PUBREL after the next CONNACK instead of the PUBLISH."""
        self.release_many([mid])

    def release_many(self, mids: list[int]) -> None:
        """`release` for the ids of a batch of PUBRECs: their PUBRELs queued as one packet of bytes, in order
        (paho otherwise builds, queues and its writer walks one packet per PUBREL)."""
        connected = self._state == _ConnectionState.MQTT_CS_CONNECTED
        now = time.monotonic()
        packets = []
        for mid in mids:
            msg = self._out_messages.get(mid)
            if msg is None or msg.qos != 2:
                continue
            if msg.state == mqtt.mqtt_ms_wait_for_pubrec:
                msg.state = mqtt.mqtt_ms_wait_for_pubcomp  # counted in flight already
                msg.timestamp = now
                if connected:
                    packets.append(_PUBACK_PACKET.pack(_PUBREL_CMD, 2, mid))  # (the same layout as PUBACK)
            elif msg.state == mqtt.mqtt_ms_publish:
                msg.state = mqtt.mqtt_ms_resend_pubrel
        if packets:
            self._packet_queue(_PUBREL_CMD, b"".join(packets), 0, 1)

    def drop(self, mid: int) -> None:
        """Forget a message the broker refused in its PUBREC (the QoS 2 exchange ends there)."""
        msg = self._out_messages.pop(mid, None)
        if msg is not None and msg.state in (mqtt.mqtt_ms_wait_for_pubrec, mqtt.mqtt_ms_wait_for_pubcomp):
            self._inflight_messages -= 1
            if self._max_inflight_messages > 0:
                self._update_inflight()  # a queued message may go out now

    def resume_released(self, mid: int, topic: str, payload: bytes, properties: Properties) -> None:
        """Take up, after a restart, an exchange whose PUBREC was already recorded: only PUBREL is left to send
        (now, or by paho after the next CONNACK). The message is kept in case the broker turns out to have
        lost our session (`publish_again_unreleased`)."""
        if mid in self._out_messages:
            return
        msg = _OnceMessage(mid, topic.encode(), payload, properties)
        msg.state = mqtt.mqtt_ms_wait_for_pubcomp
        self._out_messages[mid] = msg
        self._inflight_messages += 1
        if self._state == _ConnectionState.MQTT_CS_CONNECTED:
            self._send_pubrel(mid)

    def publish_again_unreleased(self) -> list[int]:
        """The broker lost our session (CONNACK without session present): a PUBREL for a message it answered
        PUBREC to before would now get PUBCOMP without delivery. Send those messages again as new ones (the
        agent may see one twice, with the same message id: never none). Called in on_connect, before paho
        resends. Returns their packet ids."""
        ids = []
        for msg in self._out_messages.values():
            if msg.qos == 2 and msg.state in (mqtt.mqtt_ms_resend_pubrel, mqtt.mqtt_ms_wait_for_pubcomp):
                msg.state, msg.dup = mqtt.mqtt_ms_publish, False
                ids.append(msg.mid)
        return ids


class IncomingQueue(asyncio.Queue[AgentMessage]):
    """Agents' messages for the outbox writer, with the bytes they hold. Past `max_bytes` the bridge stops reading
    (`may_read` says no, `paused` is set); taking messages out (`get`, `get_nowait`) below the bound, or
    `pause_max` seconds, resumes reading through the callback the bridge sets (`on_resume`)."""

    def __init__(self, max_bytes: int = INCOMING_MAX_BYTES, pause_max: float = INCOMING_PAUSE_MAX) -> None:
        super().__init__()
        self.max_bytes, self.pause_max = max_bytes, pause_max
        self.held_bytes = 0
        self.paused = False
        self.on_resume: Callable[[], None] = lambda: None
        self._overflow = False  # paused for pause_max: read anyway until the bytes fall below the bound
        self._timer: asyncio.TimerHandle | None = None

    @staticmethod
    def cost(m: AgentMessage) -> int:
        return len(m.payload) + len(m.correlation_data or b"") + MESSAGE_OVERHEAD

    def _put(self, m: AgentMessage) -> None:
        super()._put(m)
        self.held_bytes += self.cost(m)

    def _get(self) -> AgentMessage:
        m = super()._get()
        self.held_bytes -= self.cost(m)
        if self.paused and self.held_bytes < self.max_bytes:
            self._resume()
        return m

    def get_many_nowait(self, limit: int) -> list[AgentMessage]:
        """Up to `limit` messages at once, oldest first (none: `asyncio.QueueEmpty`): what as many `get_nowait`
        calls return, with the byte count and the resume check made once for all of them."""
        items: deque[AgentMessage] = self._queue  # type: ignore[attr-defined]
        if not items:
            raise asyncio.QueueEmpty
        out = [items.popleft() for _ in range(min(limit, len(items)))]
        cost = self.cost
        self.held_bytes -= sum([cost(m) for m in out])
        if self.paused and self.held_bytes < self.max_bytes:
            self._resume()
        self._wakeup_next(self._putters)  # type: ignore[attr-defined]
        return out

    def may_read(self) -> bool:
        """Before each packet: whether to read it now. No: reading pauses until there is room (or pause_max)."""
        if self.held_bytes < self.max_bytes:
            self._overflow = False
            return True
        if self._overflow:
            return True  # the writer is stuck (outbox full?): fall back to the count bound
        if not self.paused:
            self.paused = True
            self._timer = asyncio.get_running_loop().call_later(self.pause_max, self._expire)
        return False

    def _expire(self) -> None:
        self._timer = None
        self._overflow = True
        self._resume()

    def _resume(self) -> None:
        self.paused = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.on_resume()


class MqttBridge:
    def __init__(self, *, host: str, port: int, client_id: str, prefix: str, username: str | None = None,
                 password_file: Path | None = None, max_inflight: int = 256,
                 incoming_max_bytes: int = INCOMING_MAX_BYTES, incoming_pause_max: float = INCOMING_PAUSE_MAX) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.incoming = IncomingQueue(incoming_max_bytes, incoming_pause_max)
        self.incoming.on_resume = self._resume_reading
        self._loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()  # the current connection (or attempt) ended
        self._pending: dict[int, asyncio.Future[None]] = {}
        # Exactly-once publishes by packet id, until PUBCOMP, with the callback that records (durably) that the
        # broker holds them: PUBREL, which makes the broker deliver, is sent only after it returns.
        self._once: dict[int, tuple[asyncio.Future[None] | Done, BrokerHas]] = {}
        self._recs: list[tuple[int, ReasonCode]] = []
        self._recs_soon: asyncio.Handle | None = None  # _take_recs scheduled for PUBRECs being read
        self._next_id = 0
        self._session_kept: bool | None = None  # did the broker still hold our session at the first CONNACK?
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._reading_fd = -1  # the socket registered with add_reader, or -1
        self._writing_fd = -1  # the socket registered with add_writer, or -1
        self._flush_due = False
        self._read_due = False
        self._in_read = False
        self._connected_once = False  # the current connection got a CONNACK: the next backoff starts over
        self._refused = False  # the last CONNACK was a failure: retry after REFUSED_RETRY
        # Called with the packet ids of QoS 2 exchanges published again because the broker lost our session, so
        # their owners forget the broker's earlier PUBREC (gateway/receiving.py, gateway/groups_delivery.py).
        self.on_session_lost: list[Callable[[list[int]], None]] = []
        self.connects = 0  # successful connections so far (gateway/receipts.py publishes held messages on each)
        c = _PahoClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                        manual_ack=True, on_pubrec=self._on_pubrec, on_agent_message=self.incoming.put_nowait,
                        may_read=self.incoming.may_read)
        if username:
            password = password_file.read_text().strip() if password_file else None
            c.username_pw_set(username, password)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
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
        self._client.connect_async(self.host, self.port, keepalive=KEEPALIVE, clean_start=False, properties=props)
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="mqtt-bridge")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            await self.stop()
            raise BrokerUnavailable(f"no MQTT connection to {self.host}:{self.port} within {timeout:.0f} s") from None

    async def stop(self) -> None:
        self._stopping = True
        c = self._client
        if c._sock is not None:
            self._lost.clear()
            c.disconnect()  # DISCONNECT goes out now (or with this iteration's flush), then paho closes the socket
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), 2.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        c._sock_close()
        self._connected.clear()

    # -- connection ---------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        """Connect, keep alive, and reconnect after a loss with paho's backoff (what loop_forever did)."""
        c = self._client
        delay: float | None = None
        first = True
        while not self._stopping:
            if not first:
                delay = RECONNECT_MIN if delay is None or self._connected_once else min(delay * 2, RECONNECT_MAX)
                await asyncio.sleep(REFUSED_RETRY if self._refused else delay)
            first = False
            self._connected_once = self._refused = False
            try:
                c.connected_sock = await self._open_socket()
                self._lost.clear()
                c.reconnect()  # sends CONNECT; on_socket_open registers the socket
            except OSError as exc:
                c.connected_sock = None
                log.debug("cannot connect to MQTT broker %s:%s: %s", self.host, self.port, exc)
                continue
            while c._sock is not None and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), 1.0)
                if self._lost.is_set() or c._sock is None:
                    break
                c.loop_misc()  # keepalive: PINGREQ, or close the connection when the broker went silent
            if c._sock is not None and not self._stopping:
                c._sock_close()

    async def _open_socket(self) -> socket.socket:
        infos = await self._loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        err: BaseException | None = None
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await asyncio.wait_for(self._loop.sock_connect(sock, addr), CONNECT_TIMEOUT)
                return sock
            except (OSError, TimeoutError) as exc:
                sock.close()
                err = exc
            except BaseException:
                sock.close()
                raise
        raise OSError(f"cannot connect to {self.host}:{self.port}: {err}")

    # -- socket callbacks ---------------------------------------------------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.incoming.paused:
            self._add_reader(sock.fileno())

    def _on_socket_close(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        self._remove_reader()
        self._remove_writer()
        self._lost.set()

    def _add_reader(self, fd: int) -> None:
        if self._reading_fd < 0:
            self._loop.add_reader(fd, self._on_readable)
            self._reading_fd = fd

    def _remove_reader(self) -> None:
        if self._reading_fd >= 0:
            self._loop.remove_reader(self._reading_fd)
            self._reading_fd = -1

    def _remove_writer(self) -> None:
        if self._writing_fd >= 0:
            self._loop.remove_writer(self._writing_fd)
            self._writing_fd = -1

    def _on_readable(self) -> None:
        self._read_due = False
        if self._client._sock is None:
            return
        self._in_read = True
        try:
            self._read()
        finally:
            self._in_read = False
        if self._recs_soon is not None:
            # The PUBRECs just read are recorded and answered with PUBREL now, not a loop turn later: the broker
            # delivers a QoS 2 message only on PUBREL, so this wait would be on every message's way to its agent.
            self._recs_soon.cancel()
            self._take_recs()

    def _read(self) -> None:
        c = self._client
        for _ in range(READ_BUDGET):
            rc = c._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                break
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                c._loop_rc_handle(rc)  # closes the socket and reports the loss
                return
            if c._sock is None:
                return
        else:
            self._read_soon()  # more may wait in the buffer or the socket: after the other callbacks
            return
        if self.incoming.paused:
            self._remove_reader()  # the broker keeps the rest until the writer makes room
        elif c.buffered():
            self._read_soon()  # the socket may not signal again for bytes already read into the buffer

    def _read_soon(self) -> None:
        if not self._read_due:
            self._read_due = True
            self._loop.call_soon(self._on_readable)

    def _resume_reading(self) -> None:
        sock = self._client._sock
        if sock is not None:
            self._add_reader(sock.fileno())
            self._read_soon()

    def _on_register_write(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        # paho queued a packet. The first of a loop iteration goes out now (a lone request waits for nothing);
        # those queued after it in the same iteration (a batch's acks or publishes) leave together, in one send,
        # from a callback scheduled now. Packets queued while reading (paho answering the broker) wait for that
        # callback too: writing could close the socket under the reader.
        if self._flush_due:
            return
        self._flush_due = True
        self._loop.call_soon(self._flush)
        if not self._in_read:
            self._write()

    def _on_unregister_write(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        self._remove_writer()

    def _flush(self) -> None:
        self._flush_due = False
        self._write()

    def _write(self) -> None:
        c = self._client
        if c._sock is None:
            return
        c.loop_write()  # unregisters (removing the writer) once everything is written
        if c.want_write() and c._sock is not None and self._writing_fd < 0:
            self._writing_fd = c._sock.fileno()
            self._loop.add_writer(self._writing_fd, self._write)  # the kernel's buffer is full: when writable

    # -- paho callbacks -----------------------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: ReasonCode,
                    properties: Properties | None = None) -> None:
        if rc.is_failure:
            log.error("MQTT broker %s:%s refused the connection: %s (retrying in %.0f s)", self.host, self.port, rc,
                      REFUSED_RETRY)
            self._refused = True
            return
        self._connected_once = True
        present = bool(getattr(flags, "session_present", False))
        if self._session_kept is None:
            self._session_kept = present  # first connection of this process: decides for restored exchanges
        if not present and self.connects:
            log.warning("the MQTT broker lost this gateway's session (restarted before saving it?): what agents "
                        "published after its restart and before this reconnect had no subscriber and was dropped "
                        "by the broker; SDK agents send it again, raw MQTT agents do not")
        if not present:
            again = self._client.publish_again_unreleased()
            if again:
                for hook in self.on_session_lost:  # before the new PUBLISHes leave: their old PUBRECs no longer hold
                    hook(again)
                log.warning("the MQTT broker lost this gateway's session: %d message(s) whose hand-over was "
                            "interrupted are published again (an agent may see one twice, same agw:message-id)",
                            len(again))
        # Retain handling 2: a message an agent published with the retain flag is taken once, live, never again at
        # a (re)subscription (it would be a new message each time: a raw agent's copies get fresh ids).
        client.subscribe([(t, SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
                          for t in topics.gateway_subscriptions(self.prefix)])
        self.connects += 1
        self._connected.set()
        log.info("connected to MQTT broker %s:%s", self.host, self.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: ReasonCode,
                       properties: Properties | None = None) -> None:
        self._connected.clear()
        self._lost.set()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            _fail(fut, BrokerUnavailable("MQTT connection lost before PUBACK"))
        if self._stopping:
            log.info("disconnected from MQTT broker %s:%s", self.host, self.port)
        else:
            log.warning("MQTT broker connection lost (%s); reconnecting", rc)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        p = getattr(msg, "properties", None)
        user = tuple((str(k), str(v)) for k, v in getattr(p, "UserProperty", []) or [])
        self.incoming.put_nowait(AgentMessage(
            topic=msg.topic, payload=bytes(msg.payload), mid=msg.mid, qos=msg.qos, dup=bool(msg.dup),
            response_topic=getattr(p, "ResponseTopic", None), correlation_data=getattr(p, "CorrelationData", None),
            content_type=getattr(p, "ContentType", None), payload_utf8=getattr(p, "PayloadFormatIndicator", 0) == 1,
            user_properties=user))

    def _on_pubrec(self, mid: int, reason: ReasonCode) -> None:
        if not self._recs:  # the PUBRECs read in this readable event, in one record (see _on_readable)
            self._recs_soon = self._loop.call_soon(self._take_recs)
        self._recs.append((mid, reason))

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: ReasonCode,
                    properties: Properties | None = None) -> None:
        once = self._once.pop(mid, None)
        if once is not None:
            _end(once[0], BrokerLostMessage(f"the broker answered PUBREL for packet id {mid} with {rc}")
                 if rc.is_failure else None)
            return
        fut = self._pending.pop(mid, None)
        if fut is None:
            return  # the caller timed out
        if rc.is_failure:
            _fail(fut, BrokerUnavailable(f"broker refused the publish: {rc}"))
        else:
            _succeed(fut)

    # -- exactly-once -------------------------------------------------------------------------------------------
    def _take_recs(self) -> None:
        self._recs_soon = None
        recs, self._recs = self._recs, []
        held: dict[BrokerHas, list[int]] = {}
        for mid, reason in recs:
            once = self._once.get(mid)
            if once is None:
                continue
            if reason.is_failure:
                self._client.drop(mid)
                self._once.pop(mid, None)
                _end(once[0], BrokerUnavailable(f"broker refused the publish: {reason}"))
            else:
                held.setdefault(once[1], []).append(mid)
        for record, mids in held.items():
            try:
                record(mids)
            except Exception as exc:
                # Not recorded: no PUBREL. The broker keeps the message; try again shortly (and paho resends the
                # PUBLISH after a reconnect, which the broker answers with PUBREC again).
                log.error("cannot record %d message(s) the broker holds (%s); retrying", len(mids), exc)
                if not self._recs:
                    self._loop.call_later(1.0, self._take_recs)
                self._recs.extend((mid, _OK) for mid in mids)
                continue
            self._client.release_many(mids)

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
        A connection loss does not fail the call: the exchange resumes after reconnecting.
        Raises `BrokerUnavailable` if the broker refuses the message in its PUBREC."""
        await self.start_exactly_once(
            packet_id, topic, payload, on_broker_has=on_broker_has, released=released, response_topic=response_topic,
            correlation_data=correlation_data, content_type=content_type, payload_utf8=payload_utf8,
            user_properties=user_properties)

    def start_exactly_once(self, packet_id: int, topic: str, payload: bytes, *, on_broker_has: BrokerHas,
                           released: bool = False, response_topic: str | None = None,
                           correlation_data: bytes | None = None, content_type: str | None = None,
                           payload_utf8: bool = False,
                           user_properties: tuple[tuple[str, str], ...] = ()) -> asyncio.Future[None]:
        """`publish_exactly_once` without the wait: the PUBLISH (or PUBREL) is written before this returns (no
        turn of the event loop in between, so a lone message waits for nothing), and the future completes at
        PUBCOMP (or fails as `publish_exactly_once` raises). Raises `BrokerUnavailable` at once if the publish
        cannot start."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self._start_once(fut, packet_id, topic, payload, on_broker_has, released,
                         PublishProperties(response_topic, correlation_data, content_type, payload_utf8,
                                           user_properties))
        return fut

    def begin_exactly_once(self, packet_id: int, topic: str, payload: bytes, properties: PublishProperties, *,
                           on_broker_has: BrokerHas, on_done: Done, released: bool = False) -> None:
        """`start_exactly_once` without a future per message (for a gateway handing hundreds to the broker per
        relay frame): `on_done(None)` is called at PUBCOMP, `on_done(exc)` with what `publish_exactly_once`
        would raise, directly from the bridge's read handler (it must not raise, nor publish again under the
        same id before it returns). Raises `BrokerUnavailable` at once if the publish cannot start."""
        self._start_once(on_done, packet_id, topic, payload, on_broker_has, released, properties)

    def _start_once(self, target: asyncio.Future[None] | Done, packet_id: int, topic: str, payload: bytes,
                    on_broker_has: BrokerHas, released: bool, props: PublishProperties) -> None:
        if packet_id in self._once:
            raise BrokerUnavailable(f"packet id {packet_id} is already being published")
        self._once[packet_id] = (target, on_broker_has)
        self._client.reserved_ids.add(packet_id)
        if released and self._session_kept is False:
            released = False  # stored before a restart, but the broker forgot us: a PUBREL would deliver nothing
            log.warning("publishing again a message the broker had acknowledged before it lost this gateway's "
                        "session (packet id %d; the agent may see it twice)", packet_id)
        try:
            if released:
                self._client.resume_released(packet_id, topic, payload, props)
                return
            rc = self._client.publish_with_id(packet_id, topic, payload, props)
        except BaseException:
            self._once.pop(packet_id, None)  # (an invalid topic: the id may be published again)
            raise
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._once.pop(packet_id, None)
            raise BrokerUnavailable(f"publish failed: {mqtt.error_string(rc)}")

    # -- agents' messages ---------------------------------------------------------------------------------------
    def ack(self, msg: AgentMessage) -> None:
        """PUBACK the agent's message: call only once it is durable in the outbox."""
        if msg.qos > 0:
            self._client.ack(msg.mid, msg.qos)

    def ack_many(self, msgs: Sequence[AgentMessage]) -> None:
        """`ack` for a stored batch: its QoS 1 PUBACKs queued as one packet of bytes, in order (paho otherwise
        queues, and its writer walks, one packet per PUBACK). Call only once the messages are durable."""
        c = self._client
        ones = [m.mid for m in msgs if m.qos == 1]
        for m in msgs:
            if m.qos > 1:
                c.ack(m.mid, m.qos)
        queue = getattr(c, "_packet_queue", None)  # paho 2.x's private queue; without it, one `ack` each
        if len(ones) > 1 and getattr(c, "_manual_ack", False) and queue is not None:
            queue(_PUBACK_CMD, b"".join([_PUBACK_PACKET.pack(_PUBACK_CMD, 2, mid) for mid in ones]), 0, 1)
        else:
            for mid in ones:
                c.ack(mid, 1)

    async def publish(self, topic: str, payload: bytes, *, response_topic: str | None = None,
                      correlation_data: bytes | None = None, content_type: str | None = None,
                      payload_utf8: bool = False, user_properties: tuple[tuple[str, str], ...] = (),
                      timeout: float = 10.0) -> None:
        """Publish QoS 1 to an agent and wait for the broker's PUBACK."""
        if not self._connected.is_set():
            raise BrokerUnavailable("not connected to the MQTT broker")
        props = PublishProperties(response_topic, correlation_data, content_type, payload_utf8, user_properties)
        info = self._client.publish(topic, payload, qos=1, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(f"publish failed: {mqtt.error_string(info.rc)}")
        if not self._connected.is_set():  # lost while writing it
            raise BrokerUnavailable("MQTT connection lost before PUBACK")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pending[info.mid] = fut  # the PUBACK is read by a later loop callback, never before this
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._pending.pop(info.mid, None)
            raise BrokerUnavailable(f"no PUBACK within {timeout:.0f} s") from None


def _end(target: asyncio.Future[None] | Done, exc: BaseException | None) -> None:
    """An exactly-once exchange ended: complete its future, or call its `on_done` (whose error is logged: it
    runs inside paho's read handler, which must go on)."""
    if isinstance(target, asyncio.Future):
        if exc is None:
            _succeed(target)
        else:
            _fail(target, exc)
        return
    try:
        target(exc)
    except Exception:
        log.exception("an exactly-once publish's completion failed")


def _succeed(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _fail(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
