"""Held inbox entries (gateway/receipts.py) published again while every exactly-once packet id is taken.

A republish claims the agent's HANDED entries before its task starts. An ack that names one of them meanwhile is
kept as an early ack (the entry leaves the index of held entries), meant to drop it at PUBCOMP. If the entry then
gets no packet id, no PUBCOMP comes: the acknowledged entry must be deleted there and then, not left in the store
outside the index, neither published again nor expired until a restart (review finding (g) of 2026-12-07)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from gateway.daemon import Gateway
from gateway.inbox import InboxEntry, Phase, PubrecMarks
from gateway.protocol.message import InnerMessage, Kind
from gateway.protocol.receipts import GOODBYE, encode_ids
from gateway.receipts import ACKING_KEY
from gateway.store import Store, StoreError

from .conftest import mid


class _NoIdsBridge:
    """The MQTT bridge with all 16,384 exactly-once packet ids held by exchanges under way."""

    connected, connects = True, 1

    def reserve_packet_id(self) -> None:
        return None

    def free_packet_id(self, packet_id: int) -> None:
        raise AssertionError("no packet id was given")


def _gateway(store: Store) -> Gateway:
    """The receiving half and receipts of a gateway over a real store; no broker, relay or group service."""
    g = object.__new__(Gateway)
    g.cfg = SimpleNamespace(agents={"bob": []}, store=SimpleNamespace(held_max_per_agent=10_000),
                            mqtt=SimpleNamespace(topic_prefix="agw"))
    g.store = store
    g.bridge = _NoIdsBridge()  # type: ignore[assignment]
    g.groups = SimpleNamespace(acked=lambda agent, ids: ids)  # type: ignore[assignment]
    g.pubrec_marks = PubrecMarks(store.secrets)
    g._publishing, g._in_flight, g._background = set(), {}, set()
    g._publish_room = asyncio.Event()
    with store.transaction(durable=False):
        store.secrets.put(ACKING_KEY + "bob", b"\x01")
    g._init_receipts()
    return g


def _held_entry(store: Store, n: int) -> InboxEntry:
    msg = InnerMessage(kind=Kind.DATA, message_id=mid(n), sender_agent="alice", recipient_agent="bob",
                       created_at_ms=1, expires_at_ms=10**13, payload=b"m%d" % n)
    e = InboxEntry.new("dev-a", n, msg)
    e.handed()
    with store.transaction(durable=False):
        store.inbox.put(e.name, e.record())
    return e


async def _background_done(g: Gateway) -> None:
    for _ in range(10):
        await asyncio.sleep(0)
    assert not g._background


async def test_an_ack_while_a_republish_waits_for_a_packet_id_deletes_the_entry(store: Store) -> None:
    g = _gateway(store)
    acked, kept = _held_entry(store, 1), _held_entry(store, 2)
    g._restored_held([acked, kept])
    g._republish_held("bob")  # claims both; the task starts at the next turn of the loop
    assert g._publishing == {acked.name, kept.name}
    g._on_ack("bob", encode_ids([acked.message.message_id]))  # before that turn: kept as an early ack
    await _background_done(g)
    assert g._publishing == set()
    assert store.inbox.get(acked.name) is None  # acknowledged: deleted, though it was never published again
    assert ("bob", acked.message.message_id) not in g._early_acks
    record = store.inbox.get(kept.name)  # not acknowledged: still held, in the store and the index
    assert record is not None and InboxEntry.from_record(kept.name, record).phase is Phase.HANDED
    assert set(g._held["bob"]) == {kept.message.message_id}
    g._on_ack("bob", encode_ids([kept.message.message_id]))  # its ack later deletes it as usual
    assert store.inbox.get(kept.name) is None and not g._held["bob"]


async def test_a_store_error_deleting_an_entry_acked_while_claimed_keeps_it_held(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delete fails (a store error): the entry goes back into the index of held entries, with its early ack,
    so the next republish (or its PUBCOMP) settles it, and the gateway keeps running."""
    g = _gateway(store)
    e = _held_entry(store, 1)
    g._restored_held([e])
    g._republish_held("bob")
    g._on_ack("bob", encode_ids([e.message.message_id]))

    def failing(name: str) -> None:
        raise StoreError("disk I/O error (injected)")

    monkeypatch.setattr(store.inbox, "delete", failing)
    await _background_done(g)
    assert store.inbox.get(e.name) is not None and set(g._held["bob"]) == {e.message.message_id}
    assert ("bob", e.message.message_id) in g._early_acks and g._publishing == set()
    monkeypatch.undo()
    g._republish_held("bob")  # the next try: still no packet id, and now the delete goes through
    await _background_done(g)
    assert store.inbox.get(e.name) is None and not g._held["bob"] and not g._early_acks


class _Bridge:
    connected, connects = True, 1

    def free_packet_id(self, packet_id: int) -> None:
        pass


async def test_a_goodbye_right_after_a_pubcomp_keeps_the_entry_for_the_next_client(store: Store) -> None:
    """The broker completed the exchange of a message to the agent (PUBCOMP; the entry's commit waits up to
    FINISHED_WAIT_MAX to share a transaction), then the agent's last client said goodbye without acknowledging it
    (it had the message in its queue, the application had not taken it). That PUBCOMP came while the agent still
    acknowledged: the entry is held for its next client. Before, the goodbye was handled first and the entry was
    deleted at the timer, so the next client never got it."""
    g = _gateway(store)
    g.bridge = _Bridge()  # type: ignore[assignment]
    g._finished, g.counters = [], SimpleNamespace(delivered=0)  # type: ignore[assignment]
    e = _held_entry(store, 1)
    e.phase, e.packet_id, e.exchange_connect = Phase.BROKER_HAS, 7, 1  # (an exchange of the current connection)
    with store.transaction(durable=False):
        store.inbox.put(e.name, e.record())
    g._publishing.add(e.name)
    g._delivered_to_broker(e)  # PUBCOMP
    g._on_ack("bob", GOODBYE)  # the last client's goodbye, in the same turn of the loop
    assert "bob" not in g._acking
    await asyncio.sleep(0.05)  # past FINISHED_WAIT_MAX
    record = store.inbox.get(e.name)
    assert record is not None and InboxEntry.from_record(e.name, record).phase == Phase.HANDED
    assert e.message.message_id in g._held["bob"]
    assert g.counters.delivered == 1 and g._publishing == set()
