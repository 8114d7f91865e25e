"""The bridge's MQTT reader (gateway/bridge.py `_PahoClient`): an agent's PUBLISH lying whole in the read buffer is
taken in one slice, anything else by paho's own reader. Whatever the socket hands over at a time (a byte, a
packet and a half, everything), the messages, their order, the packets handled by paho in between and the
protocol errors are the same as with paho's reader alone."""

from __future__ import annotations

import random
import struct

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTErrorCode

from gateway import bridge
from gateway.bridge import AgentMessage, _PahoClient, encode_publish_properties


def _vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, mid: int, qos: int = 1, dup: bool = False, props: bytes = b"\x00") -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode() + (struct.pack("!H", mid) if qos else b"") + props
    body += payload
    return bytes([0x30 | qos << 1 | (0x08 if dup else 0)]) + _vbi(len(body)) + body


class FakeSock:
    """Hands over `data` in the given chunk sizes, then 'would block'."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes = data, sizes

    def recv(self, n: int) -> bytes:
        if not self.data:
            raise BlockingIOError
        k = min(n, self.sizes.pop(0) if self.sizes else len(self.data))
        out, self.data = self.data[:k], self.data[k:]
        return out

    def close(self) -> None:
        pass


def read_all(data: bytes, sizes: list[int], fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    got: list[AgentMessage] = []
    pubacks: list[int] = []
    pubrecs: list[tuple[int, int]] = []
    c = _PahoClient(mqtt.CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5, manual_ack=True,
                    on_pubrec=lambda mid, rc: pubrecs.append((mid, int(rc.value))), on_agent_message=got.append)
    c._sock = FakeSock(data, list(sizes))  # type: ignore[assignment]
    c._out_messages[7] = mqtt.MQTTMessage(7, b"x")  # (a PUBACK for it is handled by paho's reader)
    c._out_messages[7].qos = 1
    c._out_messages[8] = mqtt.MQTTMessage(8, b"y")  # (QoS 2: its PUBREC and PUBCOMP)
    c._out_messages[8].qos = 2
    c._do_on_publish = lambda mid, *a: pubacks.append(mid) or MQTTErrorCode.MQTT_ERR_SUCCESS  # type: ignore
    if not fast:  # the reference: paho's own reader alone (neither of the bridge's fast paths)
        monkeypatch.setattr(c, "_packet_read", lambda: mqtt.Client._packet_read(c))
    rcs = []
    sock = c._sock
    for _ in range(1_000_000):
        rc = c._packet_read()
        if rc == MQTTErrorCode.MQTT_ERR_AGAIN:  # (paho's reader also stops after 100 reads of a packet's body)
            if not sock.data and not c.buffered():
                break
            continue
        rcs.append(rc)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            break
    return [got, pubacks, pubrecs], rcs


def stream(seed: int) -> bytes:
    rnd = random.Random(seed)
    out = b""
    for i in range(60):
        kind = rnd.random()
        if kind < 0.1:
            out += b"\x40\x02\x00\x07"  # PUBACK for packet id 7
        elif kind < 0.3:  # PUBREC / PUBCOMP for the QoS 2 message 8, an unknown id, with a reason code
            out += rnd.choice([b"\x50\x02\x00\x08", b"\x70\x02\x00\x08", b"\x50\x02\x01\x00",
                               b"\x50\x03\x00\x08\x80", b"\x70\x02\x00\x07"])
        else:
            size = rnd.choice([0, 1, 100, 127, 128, 300, 16_383, 16_384, 70_000])
            props = encode_publish_properties("r/t", b"c", "text/plain", True, (("k", "v"),)) if i % 3 else b"\x00"
            out += publish(f"agw/a/out/dev/b{i % 4}", rnd.randbytes(size), i + 1, qos=rnd.choice([0, 1]),
                           dup=rnd.random() < 0.2, props=props)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_any_split_of_the_stream_gives_what_pahos_reader_gives(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    data = stream(seed)
    want, want_rcs = read_all(data, [len(data)], fast=False, monkeypatch=monkeypatch)
    assert len(want[0]) > 30 and want[1] and want[2]
    rnd = random.Random(seed)
    for sizes in ([len(data)], [1] * 3000, [rnd.randint(1, 3000) for _ in range(1000)], [2, 3, 5, 7] * 1000):
        for fast in (True, False):
            got, rcs = read_all(data, sizes, fast=fast, monkeypatch=monkeypatch)
            assert (got, rcs) == (want, want_rcs), (sizes[:3], fast)


def test_the_fast_path_takes_whole_publishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """(So the test above compares two readers, not paho's twice.)"""
    calls = []
    real = bridge.decode_agent_publish
    monkeypatch.setattr(bridge, "decode_agent_publish", lambda h, p: calls.append(type(p)) or real(h, p))
    data = publish("agw/a/out/dev/b", b"x" * 300, 1) * 4
    (got, _, _), _ = read_all(data, [len(data)], fast=True, monkeypatch=monkeypatch)
    # The first comes through paho's reader (a bytearray), which fills the buffer; the rest in one slice each.
    assert len(got) == 4 and calls == [bytearray] + [bytes] * 3


@pytest.mark.parametrize("bad", [
    publish("agw/a/out/dev/b", b"x", 1, props=b"\x05\x01\x02"),  # payload format indicator 2
    publish("agw/a/out/dev/b", b"x", 1, props=b"\x09\x09\x00\x05abc"),  # correlation data past its end
    b"\x32\x80\x80\x80\x80\x01" + b"\x00" * 10,  # a 5-byte remaining length
])
def test_malformed_is_a_protocol_error_on_both_paths(bad: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    data = publish("agw/a/out/dev/b", b"ok", 1) + bad + publish("agw/a/out/dev/b", b"never", 2)
    for fast in (True, False):
        (got, _, _), rcs = read_all(data, [len(data)], fast=fast, monkeypatch=monkeypatch)
        assert [m.payload for m in got] == [b"ok"]
        assert rcs[-1] == MQTTErrorCode.MQTT_ERR_PROTOCOL


def test_messages_on_one_topic_share_one_topic_string() -> None:
    """Issue 7: the incoming queue holds up to ~1,500 agents' messages of 256 B; each carried its own decoded copy
    of the topic (~80 bytes). A recurring topic is now one str; invalid UTF-8 is still refused, a long topic is
    decoded each time and not kept, and the cache is bounded."""
    from paho.mqtt.exception import MalformedPacket

    def decode(packet: bytes) -> AgentMessage:
        header, n = packet[0], 1
        while packet[n] & 0x80:
            n += 1
        return bridge.decode_agent_publish(header, packet[n + 1:])

    a, b = decode(publish("agw/alice/out/dev-b/bob", b"1", 1)), decode(publish("agw/alice/out/dev-b/bob", b"2", 2))
    assert a.topic == "agw/alice/out/dev-b/bob" and a.topic is b.topic
    long = "agw/alice/out/dev-b/bob/" + "x" * 300
    assert decode(publish(long, b"1", 3)).topic == long and long.encode() not in bridge._TOPICS
    bad = bytes([0x32]) + _vbi(2 + 3 + 2 + 1) + b"\x00\x03a\xffb" + b"\x00\x04" + b"\x00"
    with pytest.raises(MalformedPacket):
        decode(bad)
    for i in range(bridge._TOPICS_MAX + 10):
        decode(publish(f"agw/alice/out/dev-b/bob{i}", b"", 4))
    assert len(bridge._TOPICS) <= bridge._TOPICS_MAX
