"""The receiver's PUBLISH to a local agent (`Receiving._publish_to_agent`): the topic and properties kept per shape
of message (`_publish_shape`) give, message after message and across shapes, exactly the topic and the property
bytes built from scratch for each message (paho's `Properties`, as the receiver built them before)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import receiving, topics
from gateway.inbox import InboxEntry, Phase
from gateway.protocol.message import InnerMessage, Kind, new_message_id
from gateway.receiving import Receiving

PREFIX = "agw"


def expected(peer_device: str, inner: InnerMessage) -> tuple[str, bytes]:
    """The topic and properties, built from nothing for this message alone (paho's class)."""
    agent = inner.recipient_agent
    topic = f"{PREFIX}/{agent}/in"
    user = [(k, v) for k, v in inner.user_properties if not k.startswith("agw:")]
    deliver_to = dict(inner.user_properties).get("agw:deliver-to")
    if deliver_to is not None and topics.agent_may_receive_on(PREFIX, agent, deliver_to):
        topic = deliver_to
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if inner.payload_utf8:
        p.PayloadFormatIndicator = 1
    if inner.content_type:
        p.ContentType = inner.content_type
    if inner.response_topic:
        p.ResponseTopic = f"{PREFIX}/{agent}/out/{peer_device}/{inner.sender_agent}/r/{inner.response_topic}"
    if inner.correlation_data is not None:
        p.CorrelationData = inner.correlation_data
    p.UserProperty = [*user, ("agw:from", f"{peer_device}/{inner.sender_agent}"),
                      ("agw:message-id", inner.message_id.hex())]
    return topic, p.pack()  # type: ignore[no-untyped-call]


def _receiver() -> Any:
    sent: list[tuple[int, str, bytes, bytes, bool]] = []

    def begin_exactly_once(packet_id: int, topic: str, payload: bytes, properties: Any, *, released: bool,
                           **_: Any) -> None:
        sent.append((packet_id, topic, payload, properties.pack(), released))

    r = SimpleNamespace(cfg=SimpleNamespace(mqtt=SimpleNamespace(topic_prefix=PREFIX)), _publish_shapes={},
                        bridge=SimpleNamespace(begin_exactly_once=begin_exactly_once), _broker_has=None, sent=sent)
    r._publish_shape = lambda peer, inner: Receiving._publish_shape(r, peer, inner)  # type: ignore[arg-type]
    return r


def _message(recipient: str, sender: str, **kw: Any) -> InnerMessage:
    return InnerMessage(kind=Kind.DATA, message_id=new_message_id(), sender_agent=sender, recipient_agent=recipient,
                        created_at_ms=1, expires_at_ms=10**13, payload=b"p", **kw)


SHAPES: list[dict[str, Any]] = [
    {},
    {"user_properties": (("k", "v"),)},
    {"user_properties": (("k", "w"),)},
    {"user_properties": (("agw:deliver-to", "agw/bob/in/jobs"), ("k", "v"))},
    {"user_properties": (("agw:deliver-to", "agw/bob/out/x"),)},  # not allowed: the inbox topic
    {"response_topic": "r1"},
    {"response_topic": "r2", "correlation_data": b"c1"},
    {"response_topic": "r2", "correlation_data": b"c2"},
    {"content_type": "text/plain", "payload_utf8": True},
    {"content_type": "text/plain"},
]


def test_each_publish_is_what_the_message_alone_gives_across_shapes() -> None:
    r = _receiver()
    messages = []
    for (recipient, sender, peer), shape in itertools.product(
            [("bob", "alice", "dev-a"), ("carol", "alice", "dev-a"), ("bob", "alice", "dev-b"),
             ("bob", "dave", "dev-a")], SHAPES):
        messages += [(peer, _message(recipient, sender, **shape)) for _ in range(2)]
    for i, (peer, inner) in enumerate(messages * 2):  # every shape seen before, then again
        e = InboxEntry.new(peer, i, inner)
        e.packet_id, e.phase = i + 1, Phase.BROKER_HAS if i % 3 else Phase.PUBLISHED
        Receiving._publish_to_agent(r, e, lambda exc: None)  # type: ignore[arg-type]
        packet_id, topic, payload, props, released = r.sent[-1]
        assert (topic, props) == expected(peer, inner)
        assert (packet_id, payload, released) == (i + 1, b"p", e.phase is Phase.BROKER_HAS)
    # a shape with correlation data is not kept (it is a request's own); the others once each
    assert len(r._publish_shapes) == 4 * (len(SHAPES) - 2)  # (all of them small)


def test_the_table_of_shapes_is_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(receiving, "PUBLISH_SHAPES", 3)
    r = _receiver()
    for i in range(10):
        inner = _message("bob", "alice", user_properties=(("n", str(i)),))
        e = InboxEntry.new("dev-a", i, inner)
        e.packet_id, e.phase = i + 1, Phase.PUBLISHED
        Receiving._publish_to_agent(r, e, lambda exc: None)  # type: ignore[arg-type]
        assert r.sent[-1][1:4:2] == expected("dev-a", inner)
        assert len(r._publish_shapes) <= 3


def test_large_properties_are_encoded_per_message_not_kept() -> None:
    """A peer's large user properties (up to 16 KiB a message) would make the table hold megabytes: such a shape is
    encoded for each message, as before, and not kept."""
    r = _receiver()
    big = (("k", "v" * 600),)
    for i in range(3):
        inner = _message("bob", "alice", user_properties=big)
        e = InboxEntry.new("dev-a", i, inner)
        e.packet_id, e.phase = i + 1, Phase.PUBLISHED
        Receiving._publish_to_agent(r, e, lambda exc: None)  # type: ignore[arg-type]
        assert r.sent[-1][1:4:2] == expected("dev-a", inner)
    assert r._publish_shapes == {}
    inner = _message("bob", "alice", user_properties=(("k", "v" * 300),))
    e = InboxEntry.new("dev-a", 9, inner)
    e.packet_id, e.phase = 9, Phase.PUBLISHED
    Receiving._publish_to_agent(r, e, lambda exc: None)  # type: ignore[arg-type]
    assert len(r._publish_shapes) == 1


def test_a_shape_whose_key_is_large_is_not_kept() -> None:
    """The key holds every user property, the `agw:` ones too, which the PUBLISH does not carry: a peer sending
    large ones with small encoded properties must not fill the table with them."""
    r = _receiver()
    for i in range(3):
        inner = _message("bob", "alice", user_properties=((f"agw:x{i}", "v" * 4000), ("k", "v")))
        e = InboxEntry.new("dev-a", i, inner)
        e.packet_id, e.phase = i + 1, Phase.PUBLISHED
        Receiving._publish_to_agent(r, e, lambda exc: None)  # type: ignore[arg-type]
        assert r.sent[-1][1:4:2] == expected("dev-a", inner)
    assert r._publish_shapes == {}
