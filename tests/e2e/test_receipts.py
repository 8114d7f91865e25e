"""End-to-end receipts and acks (gateway/receipts.py, docs/protocol.md "Receipts and acks"), with real gateways,
brokers and the shipped ACL. Raw MQTT clients play the SDK's part here so that each step can be seen (and
withheld): an ack that is not sent, a retransmission with the same id, a malformed id.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.client import AgentClient, MessageRefused
from gateway.protocol.receipts import derive_message_id, encode_ids
from gateway.receipts import HELLO_EVERY, HELLO_GRACE
from gateway.testbed import Testbed

PW = "agent-secret"
HELD_CAP = 3  # dev-b's store.held_max_per_agent


class Raw:
    """A raw MQTT 5 client of one agent: records what it receives and the broker's answer to each publish."""

    def __init__(self, agent: str, port: int, *subscriptions: str) -> None:
        self.agent = agent
        self.got: list[tuple[str, bytes, dict[str, str]]] = []
        self.acks: dict[int, Any] = {}  # mid -> PUBACK reason code
        self.lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{agent}-raw-{uuid.uuid4().hex[:6]}",
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(agent, PW)
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        subacked: set[int] = set()
        c.on_subscribe = lambda _c, _u, mid, *_: subacked.add(mid)
        c.connect("127.0.0.1", port)
        c.loop_start()
        deadline = time.monotonic() + 20
        while not c.is_connected():
            assert time.monotonic() < deadline, f"{agent} cannot connect"
            time.sleep(0.02)
        mids = {c.subscribe(t, qos=1)[1] for t in subscriptions}
        while not mids <= subacked:  # (what is published before the SUBACK may not reach this client)
            assert time.monotonic() < deadline, f"{agent} cannot subscribe"
            time.sleep(0.02)
        self.client = c

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        props = dict(getattr(msg.properties, "UserProperty", None) or [])
        with self.lock:
            self.got.append((msg.topic, bytes(msg.payload), props))

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, rc: Any, _p: object = None) -> None:
        with self.lock:
            self.acks[mid] = rc

    def publish(self, topic: str, payload: bytes, user: list[tuple[str, str]] | None = None) -> Any:
        """Publish QoS 1; returns the broker's PUBACK reason code."""
        props = Properties(PacketTypes.PUBLISH)
        if user:
            props.UserProperty = user
        info = self.client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(10)
        deadline = time.monotonic() + 10
        while info.mid not in self.acks:
            assert time.monotonic() < deadline, "no PUBACK"
            time.sleep(0.01)
        return self.acks[info.mid]

    def wait_for(self, n: int, topic_part: str, timeout: float = 30.0) -> list[tuple[str, bytes, dict[str, str]]]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                got = [g for g in self.got if topic_part in g[0]]
            if len(got) >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def receipts_of(gw: Any) -> dict[str, Any]:
    return gw.status()["receipts"]  # type: ignore[no-any-return]


def wait_status(gw: Any, pred: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = receipts_of(gw)
        if pred(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    tb = Testbed(tmp_path_factory.mktemp("receipts"))
    try:
        tb.start_relay()
        tb.add_gateway("dev-a", agents={"alice": ["dev-b/*"]})
        b = tb.add_gateway("dev-b", agents={"bob": ["dev-a/alice"], "carol": ["dev-a/alice"],
                                            "dave": ["dev-a/alice"], "erin": ["dev-a/alice"],
                                            "frank": ["dev-a/alice"]})
        with b.config.open("a") as f:
            f.write(f"store:\n  held_max_per_agent: {HELD_CAP}\n")
        for gw in tb.gateways.values():
            gw.start()
        for gw in tb.gateways.values():
            gw.wait_ready(90)
        yield tb
    finally:
        tb.close()


async def sdk_send(tb: Testbed, payload: bytes) -> None:
    async with AgentClient("alice", port=tb.gateways["dev-a"].broker.port, password=PW) as alice:
        await alice.send("dev-b/bob", payload)  # returns on the gateway's receipt


@pytest.fixture
def raw_bob(bed: Testbed) -> Iterator[Raw]:
    """bob as a raw client that announces itself as acknowledging, then acknowledges only when told to."""
    b = bed.gateways["dev-b"]
    bob = Raw("bob", b.broker.port, "agw/bob/in")
    assert bob.publish("agw/bob/ack", b"").is_failure is False
    assert "bob" in wait_status(b, lambda st: "bob" in st["acking_agents"])["acking_agents"]
    yield bob
    bob.close()


async def test_an_ack_cannot_delete_another_agents_entries(bed: Testbed, raw_bob: Raw) -> None:
    b = bed.gateways["dev-b"]
    await sdk_send(bed, b"for bob only")
    (_, payload, props), = raw_bob.wait_for(1, "agw/bob/in")
    assert payload == b"for bob only"
    mid = bytes.fromhex(props["agw:message-id"])
    assert wait_status(b, lambda st: st["held"] == 1)["held"] == 1  # handed, not yet acknowledged: kept
    carol = Raw("carol", b.broker.port)
    try:
        # The ACL: carol may not publish on bob's ack topic (MQTT 5: PUBACK "Not authorized").
        rc = carol.publish("agw/bob/ack", mid)
        assert rc.is_failure and rc.value == 0x87, rc
    finally:
        carol.close()  # (Mosquitto 2.0 may close the connection after the refusal; a fresh one for the rest)
    carol = Raw("carol", b.broker.port)
    try:
        # The gateway: carol's own ack naming bob's message deletes nothing of bob's.
        assert not carol.publish("agw/carol/ack", mid).is_failure
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert receipts_of(b)["held"] == 1
            time.sleep(0.2)
    finally:
        carol.close()
    # bob's own ack does.
    assert not raw_bob.publish("agw/bob/ack", mid).is_failure
    assert wait_status(b, lambda st: st["held"] == 0)["held"] == 0


async def test_malformed_ack_and_message_id_are_logged_not_fatal(bed: Testbed, raw_bob: Raw) -> None:
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    bad_before = receipts_of(b)["bad_input"]
    assert not raw_bob.publish("agw/bob/ack", b"\x01" * 5).is_failure
    assert wait_status(b, lambda st: st["bad_input"] > bad_before)["bad_input"] == bad_before + 1
    assert "bob sent a malformed ack" in b.log_text()
    # A malformed agw:sdk-id: the message still goes (with a fresh id), without a receipt.
    alice = Raw("alice", a.broker.port, "agw/alice/receipt")
    try:
        assert not alice.publish("agw/alice/out/dev-b/bob", b"odd id", [("agw:sdk-id", "xyz")]).is_failure
        (_, payload, props), = raw_bob.wait_for(1, "agw/bob/in")
        assert payload == b"odd id" and len(props["agw:message-id"]) == 32
        assert "malformed agw:sdk-id" in a.log_text()
        time.sleep(1.0)
        assert alice.wait_for(1, "receipt", timeout=0.1) == []
    finally:
        alice.close()
    assert not raw_bob.publish("agw/bob/ack", bytes.fromhex(props["agw:message-id"])).is_failure
    assert wait_status(b, lambda st: st["held"] == 0)["held"] == 0
    assert a.proc is not None and a.proc.poll() is None and b.proc is not None and b.proc.poll() is None


async def test_a_retransmitted_message_is_delivered_once(bed: Testbed, raw_bob: Raw) -> None:
    a = bed.gateways["dev-a"]
    sdk_id = os.urandom(16)
    alice = Raw("alice", a.broker.port, "agw/alice/receipt")
    user = [("agw:sdk-id", sdk_id.hex())]
    try:
        # Twice at once (the second finds the first in the outbox) ...
        assert not alice.publish("agw/alice/out/dev-b/bob", b"only once", user).is_failure
        assert not alice.publish("agw/alice/out/dev-b/bob", b"only once", user).is_failure
        got = raw_bob.wait_for(1, "agw/bob/in")
        # ... and once more after delivery, when the sender's outbox no longer has it (the peer ACKed it): the
        # receiving gateway's delivered ids recognise it.
        deadline = time.monotonic() + 30
        while a.status()["queue"]["outbox_depth"] and time.monotonic() < deadline:  # type: ignore[index]
            time.sleep(0.1)
        assert a.status()["queue"]["outbox_depth"] == 0  # type: ignore[index]
        assert not alice.publish("agw/alice/out/dev-b/bob", b"only once", user).is_failure
        # Every copy is receipted (the SDK's retransmission means an earlier receipt was lost).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            receipted = b"".join(p for _, p, _ in alice.wait_for(0, "receipt", timeout=0))
            if receipted.count(sdk_id) >= 3:
                break
            time.sleep(0.1)
        assert receipted.count(sdk_id) == 3
        time.sleep(3.0)  # a second copy, if any, would have arrived by now
        got = raw_bob.wait_for(1, "agw/bob/in")
        assert [p for _, p, _ in got] == [b"only once"]
        assert got[0][2]["agw:message-id"] == derive_message_id("alice", sdk_id).hex()
    finally:
        alice.close()
    assert not raw_bob.publish("agw/bob/ack", derive_message_id("alice", sdk_id)).is_failure


async def test_the_gateway_keeps_held_entries_across_its_restart(bed: Testbed, raw_bob: Raw) -> None:
    b = bed.gateways["dev-b"]
    await sdk_send(bed, b"keep me")
    first = raw_bob.wait_for(1, "agw/bob/in")
    assert [p for _, p, _ in first] == [b"keep me"]
    mid = first[0][2]["agw:message-id"]
    assert wait_status(b, lambda st: st["held"] == 1)["held"] == 1
    b.stop(signal.SIGKILL)
    b.start()
    b.wait_ready(60)
    # Published again at start-up (a new QoS 2 exchange), same message id; still held.
    again = raw_bob.wait_for(2, "agw/bob/in")
    assert [(p, props["agw:message-id"]) for _, p, props in again] == [(b"keep me", mid)] * 2
    assert receipts_of(b)["held"] == 1 and "bob" in receipts_of(b)["acking_agents"]
    assert not raw_bob.publish("agw/bob/ack", bytes.fromhex(mid)).is_failure
    assert wait_status(b, lambda st: st["held"] == 0)["held"] == 0
    b.stop()
    b.start()
    b.wait_ready(60)
    time.sleep(2.0)
    assert len(raw_bob.wait_for(3, "agw/bob/in", timeout=0.5)) == 2  # acknowledged: not published again


async def test_the_sdk_survives_a_malformed_receipt(bed: Testbed, caplog: pytest.LogCaptureFixture) -> None:
    """A receipt that is not a multiple of 16 bytes (only the gateway's user may publish there) is logged and
    ignored by the SDK, which keeps working."""
    a = bed.gateways["dev-a"]
    async with AgentClient("alice", port=a.broker.port, password=PW) as alice:
        gateway = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fake-gw-{uuid.uuid4().hex[:6]}",
                              protocol=mqtt.MQTTv5)
        gateway.username_pw_set("agw-gateway", "gateway-secret")
        gateway.connect("127.0.0.1", a.broker.port)
        gateway.loop_start()
        try:
            gateway.publish("agw/alice/receipt", b"\x01" * 17, qos=1).wait_for_publish(10)
            deadline = time.monotonic() + 10
            while "malformed receipt" not in caplog.text and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert "alice: ignoring a malformed receipt" in caplog.text
        finally:
            gateway.loop_stop()
            gateway.disconnect()
        await asyncio.wait_for(alice.send("dev-b/bob", b"after a bad receipt"), 30)


async def test_a_raw_client_forwarding_agw_message_id_is_not_deduplicated(bed: Testbed, raw_bob: Raw) -> None:
    """Every delivered message carries agw:message-id; a raw client that forwards one with its properties, twice,
    sends two messages (only the SDK's own agw:sdk-id marks retransmissions of one message)."""
    a = bed.gateways["dev-a"]
    alice = Raw("alice", a.broker.port)
    echoed = [("agw:message-id", os.urandom(16).hex())]
    try:
        assert not alice.publish("agw/alice/out/dev-b/bob", b"forwarded", echoed).is_failure
        assert not alice.publish("agw/alice/out/dev-b/bob", b"forwarded", echoed).is_failure
        got = [g for g in raw_bob.wait_for(2, "agw/bob/in") if g[1] == b"forwarded"]
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:  # (a message of an earlier test may come first)
            got = [g for g in raw_bob.wait_for(0, "agw/bob/in", timeout=0) if g[1] == b"forwarded"]
            time.sleep(0.05)
        assert [p for _, p, _ in got] == [b"forwarded", b"forwarded"]
        ids = [props["agw:message-id"] for _, _, props in got]
        assert len(set(ids)) == 2 and echoed[0][1] not in ids
    finally:
        alice.close()
    for i in ids:  # (acknowledged, so the next tests start with nothing of this one held)
        assert not raw_bob.publish("agw/bob/ack", bytes.fromhex(i)).is_failure


async def test_the_sdk_acknowledges_only_what_the_application_took(bed: Testbed) -> None:
    """A message that reached the SDK but that the application never took is not acknowledged: closing the client
    leaves it held at the gateway, and the next client of the agent gets it."""
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    async with AgentClient("carol", port=b.broker.port, password=PW) as carol:
        await asyncio.sleep(0.5)  # announced
        async with AgentClient("alice", port=a.broker.port, password=PW) as alice:
            await alice.send("dev-b/carol", b"taken")
            await alice.send("dev-b/carol", b"left in the queue")
        got = await carol.receive(timeout=30)
        assert got.payload == b"taken"
        deadline = time.monotonic() + 30
        while carol._inbox.empty() and time.monotonic() < deadline:  # the second reached the SDK, not the app
            await asyncio.sleep(0.05)
        assert not carol._inbox.empty()
    # The first client's session is gone with it (a clean close drops it), so only the gateway, which still holds
    # the unacknowledged message, can give it to the next client.
    async with AgentClient("carol", port=b.broker.port, password=PW) as carol_again:
        again = await carol_again.receive(timeout=30)
        assert again.payload == b"left in the queue"
        with pytest.raises(TimeoutError):
            await carol_again.receive(timeout=3)  # and "taken" was acknowledged: not given again


async def test_a_message_refused_at_ingest_fails_the_send(bed: Testbed) -> None:
    """A message the gateway refuses for good at ingest (here: more user properties than an inner message may
    carry) is not stored and not sent; its receipt carries the reason, so send() and request() raise
    MessageRefused instead of returning as if it were on its way. Other messages of the same client go through."""
    a = bed.gateways["dev-a"]
    too_many = [(f"k{i}", "v") for i in range(65)]
    stored_before = a.status()["counters"]["sent"]
    async with AgentClient("alice", port=a.broker.port, password=PW) as alice:
        with pytest.raises(MessageRefused, match="user properties"):
            await asyncio.wait_for(alice.send("dev-b/bob", b"refused", user_properties=too_many), 30)
        assert not alice._unreceipted  # not published again
        # Over the outbox's record limit (1 MiB) though within the inner message's: refused the same way. Before,
        # the ingest loop retried the whole batch every second, forever, stalling every agent of the device.
        with pytest.raises(MessageRefused, match="max_record_bytes"):
            await asyncio.wait_for(alice.send("dev-b/bob", b"x" * (1024 * 1024 + 1)), 30)
        await asyncio.wait_for(alice.send("dev-b/bob", b"accepted", user_properties=too_many[:64]), 30)
    deadline = time.monotonic() + 20  # (the status the gateway reports lags a little)
    while a.status()["counters"]["sent"] < stored_before + 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    assert a.status()["counters"]["sent"] == stored_before + 1  # only the accepted one was stored


async def test_held_messages_are_capped_per_agent(bed: Testbed) -> None:
    """An agent that announces itself and never acknowledges: dev-b holds HELD_CAP of its messages, no more;
    the others are delivered all the same and deleted at PUBCOMP, as for a raw agent."""
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    dave = Raw("dave", b.broker.port, "agw/dave/in")
    try:
        assert not dave.publish("agw/dave/ack", b"").is_failure
        wait_status(b, lambda st: "dave" in st["acking_agents"])
        before = receipts_of(b)
        sent = [b"capped %d" % i for i in range(HELD_CAP + 2)]
        async with AgentClient("alice", port=a.broker.port, password=PW) as alice:
            await asyncio.gather(*(alice.send("dev-b/dave", p) for p in sent))  # one burst: batched by dev-b
        got = dave.wait_for(len(sent), "agw/dave/in")
        assert sorted(p for _, p, _ in got) == sorted(sent)
        st = wait_status(b, lambda st: st["not_held_over_cap"] - before["not_held_over_cap"] == 2)
        assert st["not_held_over_cap"] - before["not_held_over_cap"] == 2
        assert st["held"] - before["held"] == HELD_CAP
        assert "its cap (store.held_max_per_agent)" in b.log_text()
        # At the cap, an announcement publishes the held ones again: they keep their places (not over the cap).
        assert not dave.publish("agw/dave/ack", b"").is_failure
        again = wait_status(b, lambda st: st["republished"] - before["republished"] >= HELD_CAP,
                            timeout=HELLO_EVERY + HELLO_GRACE + 5)
        assert again["republished"] - before["republished"] == HELD_CAP
        assert again["not_held_over_cap"] - before["not_held_over_cap"] == 2
        assert again["held"] - before["held"] == HELD_CAP
        assert len(dave.wait_for(len(sent) + HELD_CAP, "agw/dave/in")) == len(sent) + HELD_CAP
        assert not dave.publish("agw/dave/ack", encode_ids([bytes.fromhex(props["agw:message-id"])
                                                            for _, _, props in got])).is_failure
        assert wait_status(b, lambda st: st["held"] == before["held"])["held"] == before["held"]
    finally:
        dave.close()


async def test_a_flood_of_announcements_publishes_held_messages_again_once(bed: Testbed) -> None:
    """Each announcement asks for the agent's older held messages again; a local agent announcing in a loop gets
    one republish per HELLO_EVERY, not one per announcement."""
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    dave = Raw("dave", b.broker.port, "agw/dave/in")
    try:
        assert not dave.publish("agw/dave/ack", b"").is_failure
        wait_status(b, lambda st: "dave" in st["acking_agents"])
        async with AgentClient("alice", port=a.broker.port, password=PW) as alice:
            await alice.send("dev-b/dave", b"held once")
        first = dave.wait_for(1, "agw/dave/in")
        assert [p for _, p, _ in first] == [b"held once"]
        before = receipts_of(b)["republished"]
        flood_end = time.monotonic() + 2.5 * HELLO_GRACE  # announcements for longer than the grace, twice over
        while time.monotonic() < flood_end:
            dave.publish("agw/dave/ack", b"")
            time.sleep(0.05)
        # The republish came HELLO_GRACE after the flood began (or HELLO_EVERY after dave's previous one). One per
        # announcement older than the copy's hand-over would have brought a copy every HELLO_GRACE.
        dave.wait_for(2, "agw/dave/in", timeout=HELLO_EVERY + HELLO_GRACE)
        time.sleep(max(0.0, flood_end + HELLO_GRACE + 1 - time.monotonic()))
        copies = dave.wait_for(3, "agw/dave/in", timeout=0)
        assert [p for _, p, _ in copies] == [b"held once"] * 2  # the original and one copy
        assert wait_status(b, lambda st: st["republished"] > before)["republished"] - before == 1  # (status lags)
        assert not dave.publish("agw/dave/ack", bytes.fromhex(first[0][2]["agw:message-id"])).is_failure
    finally:
        dave.close()


async def await_status(gw: Any, pred: Any, timeout: float = 20.0) -> dict[str, Any]:
    """`wait_status` without holding the event loop (the SDK clients of the test run on it)."""
    deadline = time.monotonic() + timeout
    while True:
        st = receipts_of(gw)
        if pred(st) or time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.1)


async def _wait_delivered(gw: Any, more_than: int) -> None:
    """Until the gateway's broker completed more than `more_than` hand-overs in all (its status lags ~1 s)."""
    deadline = time.monotonic() + 30
    while gw.status()["counters"]["delivered"] <= more_than:
        assert time.monotonic() < deadline, "not handed to the broker"
        await asyncio.sleep(0.1)


async def test_one_of_two_sdk_clients_of_an_agent_closing_keeps_holding_for_the_other(bed: Testbed) -> None:
    """Two SDK clients of one agent (review finding (d) of 2026-11-22): one closes cleanly (its goodbye names its
    instance); the agent's messages sent afterwards are still held for the other until it acknowledges. Before,
    the goodbye stopped holding for the agent, so the other client ran without the guarantee until its next
    reconnect. The last client's goodbye stops it."""
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    async with AgentClient("erin", port=b.broker.port, password=PW, auto_ack=False) as stays:
        async with AgentClient("erin", port=b.broker.port, password=PW):
            st = await await_status(b, lambda st: st.get("acking_clients", {}).get("erin") == 2)
            assert "erin" in st["acking_agents"] and st["acking_clients"]["erin"] == 2, st
        await asyncio.sleep(2.0)  # (its goodbye handled, and the status written since)
        st = receipts_of(b)
        assert "erin" in st["acking_agents"], st
        held = st["held"]
        async with AgentClient("alice", port=a.broker.port, password=PW) as alice:
            await alice.send("dev-b/erin", b"after one goodbye")
        msg = await stays.receive(timeout=30)
        assert msg.payload == b"after one goodbye"
        assert (await await_status(b, lambda st: st["held"] == held + 1))["held"] == held + 1  # kept until acked
        msg.ack()
        assert (await await_status(b, lambda st: st["held"] == held))["held"] == held
    st = await await_status(b, lambda st: "erin" not in st["acking_agents"])
    assert "erin" not in st["acking_agents"] and "erin" not in st["acking_clients"]
    delivered = b.status()["counters"]["delivered"]
    async with AgentClient("alice", port=a.broker.port, password=PW) as alice:
        await alice.send("dev-b/erin", b"after the last goodbye")
    await _wait_delivered(b, delivered)
    await asyncio.sleep(1.0)
    assert receipts_of(b)["held"] == held  # not held: deleted at PUBCOMP, as for a raw agent


async def test_goodbyes_and_announcements_without_an_instance_keep_their_meaning(bed: Testbed) -> None:
    """An older SDK (or a raw client) announces without `agw:instance`: a newer client's goodbye does not stop
    holding for it. A goodbye without one (an older SDK closing, or the operator's one-byte goodbye of
    docs/operations.md) stops holding for every client of the agent, as before."""
    b = bed.gateways["dev-b"]
    old = Raw("frank", b.broker.port, "agw/frank/in")
    try:
        assert not old.publish("agw/frank/ack", b"").is_failure  # an announcement without an instance
        async with AgentClient("frank", port=b.broker.port, password=PW):
            st = await await_status(b, lambda st: st.get("acking_clients", {}).get("frank") == 2)
            assert st["acking_clients"]["frank"] == 2, st
        await asyncio.sleep(2.0)
        st = receipts_of(b)
        assert "frank" in st["acking_agents"] and st["acking_clients"]["frank"] == 1, st
        async with AgentClient("frank", port=b.broker.port, password=PW):
            st = await await_status(b, lambda st: st.get("acking_clients", {}).get("frank") == 2)
            assert st["acking_clients"]["frank"] == 2, st
            assert not old.publish("agw/frank/ack", b"\x00").is_failure  # a goodbye without an instance
            st = await await_status(b, lambda st: "frank" not in st["acking_agents"])
            assert "frank" not in st["acking_agents"]
    finally:
        old.close()
    assert "frank" not in receipts_of(b)["acking_agents"]
