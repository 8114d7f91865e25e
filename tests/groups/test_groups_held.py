"""Group messages kept for an agent that acknowledges (gateway/groups_held.py), in process: real stores, fleet
credentials and the relay's DeliveryService, the broker replaced by the in-memory stand-in of
test_groups_service.py. The paths a real broker and SDK rarely hit on cue: an ack that overtakes the PUBCOMP,
expiry, the cap, a restart with held entries. (With real processes: test_group_sdk_held.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest

from gateway.inbox import Phase
from tests.groups.test_groups_service import FakeBridge, FakeRelay, bridge, make_gateway
from tests.relay.conftest import make_fleet
from tests.store.conftest import SoftStorageKey

if TYPE_CHECKING:
    from gateway.groups import Groups


B_KEY = SoftStorageKey()  # dev-b's storage key, so a restart opens its store again


def limits(gw: Groups, *, ttl_s: int = 3600, cap: int = 100) -> None:
    gw.cfg.store = SimpleNamespace(message_ttl_seconds=ttl_s, held_max_per_agent=cap)


async def until(pred: Callable[[], bool], what: str) -> None:
    for _ in range(300):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def ids_published(gw: Groups) -> list[bytes]:
    return [bytes.fromhex(props["agw:message-id"]) for t, _, props in bridge(gw).published if t.endswith("/in")]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Groups, Groups, Any]]:
    fleet, relay = make_fleet(), FakeRelay()
    a = await make_gateway(relay, fleet, tmp_path, "dev-a", ["a1"])
    b = await make_gateway(relay, fleet, tmp_path, "dev-b", ["b1"], storage_key=B_KEY)
    for gw in (a, b):
        limits(gw)
    b.acking_groups = {"b1": frozenset({"g"})}  # (the daemon's, from b1's announcement: gateway/receipts.py)
    a.create("a1", "g")
    await a.change("a1", "g", add=["dev-b/b1"])
    await until(lambda: ("b1", "g") in b.members, "b1 to join")
    yield a, b, (relay, fleet, tmp_path)
    for gw in (a, b):
        for t in list(gw._tasks):
            t.cancel()
        gw.store.close()


async def test_held_until_the_agents_ack_names_it(pair: Any) -> None:
    a, b, _ = pair
    a.send("a1", "g", b"hello")
    await until(lambda: b.held_count() == 1, "the message to be held")
    [entry] = b.records.inbox()
    assert entry.phase == Phase.HANDED and entry.packet_id == 0 and entry.expires_ms > 0
    assert ids_published(b) == [entry.entry_id]
    # Another agent's ack, or ids it does not hold, delete nothing and are handed back (the pairwise ones).
    other = bytes(16)
    assert b.acked("someone-else", [entry.entry_id]) == [entry.entry_id]
    assert b.acked("b1", [other]) == [other]
    assert b.held_count() == 1
    assert b.acked("b1", [entry.entry_id, other]) == [other]
    assert b.held_count() == 0 and b.records.inbox() == []
    assert b.records.secrets.get(f"grp/in/{entry.entry_id.hex()}") is None


@pytest.mark.parametrize("groups", [{}, {"b1": frozenset({"other"})}])
async def test_an_agent_that_does_not_acknowledge_the_group_gets_it_deleted_at_pubcomp(
        pair: Any, groups: dict[str, frozenset[str]]) -> None:
    """A raw agent (or an SDK client that predates group acks), or one that reads other groups only: not kept."""
    a, b, _ = pair
    b.acking_groups.clear()
    b.acking_groups.update(groups)
    a.send("a1", "g", b"raw")
    await until(lambda: len(ids_published(b)) == 1 and not b.records.inbox(), "the hand-over")
    assert b.held_count() == 0


async def test_published_again_under_the_same_message_id(pair: Any) -> None:
    a, b, _ = pair
    a.send("a1", "g", b"again")
    await until(lambda: b.held_count() == 1, "the message to be held")
    b.republish_held(before=float("-inf"))  # handed after that: nothing
    b.republish_held(before_connect=0)  # its exchange was in connection 1: nothing
    await asyncio.sleep(0.05)
    assert len(ids_published(b)) == 1
    b.republish_held("b1")
    await until(lambda: len(ids_published(b)) == 2, "the second publish")
    first, second = ids_published(b)
    assert first == second and b.counters.held_republished == 1
    await until(lambda: b.records.inbox()[0].phase == Phase.HANDED, "held again after its PUBCOMP")
    assert b.held_count() == 1


async def test_not_published_again_once_no_client_of_the_agent_reads_the_group(pair: Any) -> None:
    """After the goodbye of the group's last reading client, its held messages wait for a client that announces
    the group again (or their expiry): published now, they would be deleted at PUBCOMP with nobody to take them."""
    a, b, _ = pair
    a.send("a1", "g", b"kept")
    await until(lambda: b.held_count() == 1, "the message to be held")
    for groups in ({}, {"b1": frozenset({"other"})}):
        b.acking_groups.clear()
        b.acking_groups.update(groups)
        b.republish_held("b1")
        b.republish_held(before_connect=99)  # (a reconnect's)
        await asyncio.sleep(0.05)
        assert len(ids_published(b)) == 1 and b.held_count() == 1, groups
        assert b.records.inbox()[0].phase == Phase.HANDED
    b.acking_groups["b1"] = frozenset({"g"})  # a client reading the group announced itself
    b.republish_held("b1")
    await until(lambda: len(ids_published(b)) == 2, "the second publish")
    assert b.counters.held_republished == 1


async def test_an_ack_that_overtakes_the_pubcomp_deletes_it_then(pair: Any, monkeypatch: Any) -> None:
    a, b, _ = pair
    gate = asyncio.Event()
    publish = FakeBridge.publish_exactly_once

    async def slow(self: FakeBridge, *args: Any, **kw: Any) -> None:
        await publish(self, *args, **kw)  # the agent has it now ...
        await gate.wait()  # ... and the PUBCOMP is late

    monkeypatch.setattr(FakeBridge, "publish_exactly_once", slow)
    a.send("a1", "g", b"fast agent")
    await until(lambda: len(ids_published(b)) == 1, "the publish")
    [mid] = ids_published(b)
    assert b.acked("b1", [mid]) == []  # named, though not handed yet
    assert b.records.inbox() != []  # kept until the exchange ends
    gate.set()
    await until(lambda: b.records.inbox() == [], "the entry to go at PUBCOMP")
    assert b.held_count() == 0


async def test_expired_held_messages_are_deleted(pair: Any) -> None:
    a, b, _ = pair
    a.send("a1", "g", b"never acked")
    await until(lambda: b.held_count() == 1, "the message to be held")
    b.expire_held()
    assert b.held_count() == 1  # not yet
    expires = b.records.inbox()[0].expires_ms
    b.now_ms = lambda: expires
    b.expire_held()
    assert b.held_count() == 0 and b.records.inbox() == [] and b.counters.held_expired == 1


async def test_past_the_cap_messages_are_not_kept(pair: Any) -> None:
    a, b, _ = pair
    limits(b, cap=1)
    a.send("a1", "g", b"one")
    await until(lambda: b.held_count() == 1, "the first to be held")
    a.send("a1", "g", b"two")
    await until(lambda: len(ids_published(b)) == 2 and len(b.records.inbox()) == 1, "the second hand-over")
    assert b.held_count() == 1 and b.counters.held_not_kept_over_cap == 1


async def test_held_messages_survive_a_restart_and_go_again_at_the_first_connection(pair: Any) -> None:
    a, b, (relay, fleet, tmp_path) = pair
    a.send("a1", "g", b"kept across a restart")
    await until(lambda: b.held_count() == 1, "the message to be held")
    [entry] = b.records.inbox()
    for t in list(b._tasks):
        t.cancel()
    b.store.close()
    b2 = await make_gateway(relay, fleet, tmp_path, "dev-b", ["b1"], storage_key=B_KEY)
    try:
        limits(b2)
        b2.acking_groups = {"b1": frozenset({"g"})}
        assert b2.held_count() == 1 and b2.records.inbox()[0].phase == Phase.HANDED
        await asyncio.sleep(0.05)
        assert ids_published(b2) == []  # HANDED: not published by the inbox loop on its own
        b2.republish_held(before_connect=1)  # what the daemon does at its first connection (gateway/receipts.py)
        await until(lambda: ids_published(b2) == [entry.entry_id], "the publish after the restart")
        await until(lambda: b2.records.inbox()[0].phase == Phase.HANDED, "held again")
    finally:
        for t in list(b2._tasks):
            t.cancel()
        b2.store.close()


async def test_an_exchange_that_spanned_a_broker_reconnect_is_published_again(pair: Any, monkeypatch: Any) -> None:
    """A restarted broker answers the PUBREL of an exchange it lost with PUBCOMP: the message may not have reached
    the agent's session, so once held it goes again at once (not only at the agent's next announcement)."""
    a, b, _ = pair
    gate = asyncio.Event()
    publish = FakeBridge.publish_exactly_once

    async def across_a_reconnect(self: FakeBridge, *args: Any, **kw: Any) -> None:
        await publish(self, *args, **kw)
        if not gate.is_set():
            self.connects += 1  # the broker connection dropped and came back before the PUBCOMP
            gate.set()

    monkeypatch.setattr(FakeBridge, "publish_exactly_once", across_a_reconnect)
    a.send("a1", "g", b"lost by a restarted broker?")
    await until(lambda: len(ids_published(b)) == 2, "the publish after the reconnect")
    first, second = ids_published(b)
    assert first == second and b.counters.held_republished == 1
    await until(lambda: b.records.inbox()[0].phase == Phase.HANDED, "held after the second exchange")
    assert b.held_count() == 1


@pytest.mark.parametrize("cap", ["HELD_MAX_BYTES", "HELD_MAX_BYTES_PER_AGENT"], ids=["all-agents", "one-agent"])
async def test_past_a_byte_cap_messages_are_not_kept(pair: Any, monkeypatch: Any, cap: str) -> None:
    """Held group payloads stay in memory with the group inbox: all agents together hold at most HELD_MAX_BYTES,
    and one agent at most HELD_MAX_BYTES_PER_AGENT (it cannot take every agent's share)."""
    import gateway.groups_held

    a, b, _ = pair
    monkeypatch.setattr(gateway.groups_held, cap, 1000)
    a.send("a1", "g", b"x" * 600)
    await until(lambda: b.held_count() == 1, "the first to be held")
    a.send("a1", "g", b"y" * 600)
    await until(lambda: len(ids_published(b)) == 2 and len(b.records.inbox()) == 1, "the second hand-over")
    assert b.held_count() == 1 and b.counters.held_not_kept_over_cap == 1
    assert b.acked("b1", ids_published(b)[:1]) == []


async def test_an_exchange_begun_before_a_restart_is_published_again_once_held(pair: Any, monkeypatch: Any) -> None:
    """The gateway died between the broker's PUBREC and its PUBCOMP: the restarted gateway sends PUBREL, and a
    broker restarted meanwhile answers PUBCOMP for an id it lost. So a held entry whose exchange began in an
    earlier run is published again at once (its exchange connection is 0), as pairwise ones are."""
    a, b, (relay, fleet, tmp_path) = pair
    stuck = asyncio.Event()

    async def dies_before_pubcomp(self: FakeBridge, packet_id: int, *args: Any, on_broker_has: Any, **kw: Any
                                  ) -> None:
        on_broker_has([packet_id])
        stuck.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(FakeBridge, "publish_exactly_once", dies_before_pubcomp)
    a.send("a1", "g", b"in flight at the crash")
    await until(lambda: stuck.is_set() and b.records.inbox()[0].phase == Phase.BROKER_HAS, "the PUBREC")
    for t in list(b._tasks):
        t.cancel()
    b.store.close()
    monkeypatch.undo()
    b2 = await make_gateway(relay, fleet, tmp_path, "dev-b", ["b1"], storage_key=B_KEY)
    try:
        limits(b2)
        b2.acking_groups = {"b1": frozenset({"g"})}
        b2._inbox_wake.set()
        await until(lambda: len(ids_published(b2)) == 2, "the resumed exchange, then a new one")
        assert b2.counters.held_republished == 1
        await until(lambda: b2.held_count() == 1 and b2.records.inbox()[0].phase == Phase.HANDED, "held")
    finally:
        for t in list(b2._tasks):
            t.cancel()
        b2.store.close()


async def test_an_ack_of_an_entry_whose_exchange_waits_keeps_its_packet_id_until_pubcomp(
        pair: Any, monkeypatch: Any) -> None:
    """A republished copy refused by the broker waits in PUBLISHED (holding a packet id) for the next try; the
    late ack of the first copy must not delete it there (its packet id would never be freed): it goes at PUBCOMP."""
    from gateway.bridge import BrokerUnavailable

    a, b, _ = pair
    freed: list[int] = []
    monkeypatch.setattr(FakeBridge, "free_packet_id", lambda self, p: freed.append(p))
    a.send("a1", "g", b"m")
    await until(lambda: b.held_count() == 1, "held")
    [e] = b.records.inbox()
    publish = FakeBridge.publish_exactly_once

    async def refuse(self: FakeBridge, packet_id: int, *args: Any, **kw: Any) -> None:
        raise BrokerUnavailable("the broker went away")

    monkeypatch.setattr(FakeBridge, "publish_exactly_once", refuse)
    freed.clear()
    b.republish_held("b1")
    await until(lambda: b.records.inbox()[0].phase == Phase.PUBLISHED and e.entry_id not in b._publishing,
                "the refused exchange")
    packet_id = b.records.inbox()[0].packet_id
    assert b.acked("b1", [e.entry_id]) == []
    assert len(b.records.inbox()) == 1  # still there, with its packet id
    monkeypatch.setattr(FakeBridge, "publish_exactly_once", publish)
    b._inbox_wake.set()
    await until(lambda: b.records.inbox() == [], "deleted at its PUBCOMP")
    assert packet_id in freed and b.held_count() == 0

