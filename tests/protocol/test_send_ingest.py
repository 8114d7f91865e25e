"""The sender's ingest (gateway/sending.py `_agent_loop`) on a real store: a broker redelivery (DUP) of a PUBLISH
already stored is acknowledged and not stored again, across a restart (store closed and opened again, marks
read back from their bucket records); a DUP under a reused packet id with other content, or a new PUBLISH that
reuses a packet id, is stored. Each stored batch is also handed to the sender loop in memory, its outbox row due
only later. (The MQTT side is a queue here; the real broker and SIGKILL cases are in tests/torture and
tests/e2e/test_handover.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.bridge import AgentMessage, IncomingQueue
from gateway.receipts import Receipts
from gateway.runtime import Counters, now_ms
from gateway.sending import HANDOVER_DUE_MS, Sending
from gateway.store import Store, StoreError
from tests.relay.conftest import eventually
from tests.store.conftest import SoftStorageKey


class _NoGroups:
    async def on_agent_messages(self, messages: list[AgentMessage]) -> list[tuple[AgentMessage, str]]:
        raise AssertionError("no group topics in this test")


class Ingest(Sending, Receipts):
    """The sending half (with its receipts hooks) over a real store, fed through a queue as the MQTT bridge
    feeds it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cfg = SimpleNamespace(mqtt=SimpleNamespace(topic_prefix="agw"), agents={"alice": None},
                                   store=SimpleNamespace(message_ttl_seconds=3600, durability="power-loss"))
        self._background: set[asyncio.Task[None]] = set()
        self._publishing: set[str] = set()
        self._init_receipts()
        self.acked: list[AgentMessage] = []
        self.bridge = SimpleNamespace(incoming=IncomingQueue(), ack=self.acked.append, ack_many=self.acked.extend)
        self.groups = _NoGroups()
        self.counters = Counters()
        self._wake_sender = asyncio.Event()
        self.link = SimpleNamespace(state=SimpleNamespace(value="connecting"),  # no sender pass runs here
                                    queued=0, room=lambda: (1 << 30, 10_000))

    async def feed(self, *messages: AgentMessage) -> None:
        before = len(self.acked)
        for m in messages:
            self.bridge.incoming.put_nowait(m)
        task = asyncio.create_task(self._agent_loop())
        try:
            async with asyncio.timeout(30):
                while len(self.acked) < before + len(messages):
                    if task.done():
                        task.result()  # the loop died: show why
                        raise AssertionError("the ingest loop returned")
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()


def publish(mid: int, payload: bytes, *, dup: bool = False) -> AgentMessage:
    return AgentMessage(topic="agw/alice/out/dev-b/bob", payload=payload, mid=mid, qos=1, dup=dup,
                        response_topic=None, correlation_data=None, content_type=None, payload_utf8=False,
                        user_properties=())


async def test_redelivery_is_not_stored_twice_across_a_restart(tmp_path: Path) -> None:
    key, path = SoftStorageKey(), tmp_path / "agw.db"
    with Store.open(path, key) as store:
        first = Ingest(store)
        await first.feed(*(publish(mid, f"m{mid}".encode()) for mid in range(1, 101)))
        assert store.outbox.depth() == 100 and first.counters.sent == 100
        held = first._handover.ids("dev-b")
        assert len(held) == 100  # handed over in memory ...
        assert store.outbox.due(now_ms() + HANDOVER_DUE_MS // 2, limit=1000) == []  # ... and not read back
    with Store.open(path, key) as store:  # a restart: the broker resends what it has no PUBACK for
        again = Ingest(store)
        await again.feed(publish(7, b"m7", dup=True), publish(99, b"m99", dup=True))
        assert store.outbox.depth() == 100 and again.counters.sent == 0  # acknowledged, not stored again
        assert len(again.acked) == 2
        await again.feed(publish(8, b"other content", dup=True),  # not the message stored under id 8
                         publish(9, b"m9"))  # a new PUBLISH reusing id 9 (not DUP): a new message
        assert store.outbox.depth() == 102 and again.counters.sent == 2
        await again.feed(publish(8, b"other content", dup=True))  # its own redelivery now is a copy
        assert store.outbox.depth() == 102


async def test_fields_outside_the_inner_rules_are_refused_at_ingest_and_the_rest_stored_as_built(
        tmp_path: Path) -> None:
    """Ingest encodes records without an `InnerMessage` (`encode_data`): what the agent decoder lets through but
    the inner format refuses is still refused (acknowledged, not stored); what it stores decodes to the message
    `InnerMessage` would have built."""
    from gateway.protocol.message import InnerMessage, Kind

    refused = [publish(1, b"\xff\xfe")._replace(payload_utf8=True),  # flagged UTF-8, is not
               publish(2, b"x")._replace(response_topic="agw/bob/+"),
               publish(3, b"x")._replace(correlation_data=b"c" * 4097),
               publish(4, b"x")._replace(content_type="text/\x01"),
               publish(5, b"x")._replace(user_properties=(("k", "\ufeff"),))]
    stored = [publish(10, b"caf\xc3\xa9")._replace(payload_utf8=True), publish(11, b"plain"),
              publish(12, b"x")._replace(response_topic="agw/alice/in", correlation_data=b"c",
                      content_type="text/plain", user_properties=(("k", "v"),))]
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        ingest = Ingest(store)
        await ingest.feed(*refused, *stored)
        assert len(ingest.acked) == len(refused) + len(stored)
        assert store.outbox.depth() == len(stored) and ingest.counters.sent == len(stored)
        records = {InnerMessage.decode(e.record).payload: InnerMessage.decode(e.record)
                   for e in ingest._handover.first("dev-b", 100)}
        assert set(records) == {m.payload for m in stored}
        for m in stored:
            got = records[m.payload]
            assert got == InnerMessage(Kind.DATA, got.message_id, "alice", "bob", got.created_at_ms,
                                       got.created_at_ms + 3600 * 1000, payload=m.payload,
                                       response_topic=m.response_topic, correlation_data=m.correlation_data,
                                       content_type=m.content_type, payload_utf8=m.payload_utf8,
                                       user_properties=m.user_properties)


async def test_a_stored_batch_is_not_held_through_the_send_pass(tmp_path: Path) -> None:
    """Issue 7: once a batch is stored and acknowledged, the agent loop drops its messages before the send pass
    (whose encryption buffers are the sender's largest, and which may wait for room on the link): up to 512
    agents' messages, payloads and all, are not held through it."""
    import gc

    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        ingest = Ingest(store)
        holders: list[int] = []

        async def send_now() -> None:
            gc.collect()
            held = {id(r) for m in ingest.acked for r in gc.get_referrers(m)
                    if isinstance(r, list) and r is not ingest.acked and r is not messages}
            holders.append(len(held))

        ingest._send_now = send_now  # type: ignore[method-assign]
        messages = [publish(mid, b"x" * 256) for mid in range(1, 201)]
        await ingest.feed(*messages)
        assert ingest.counters.sent == 200 and holders and holders == [0] * len(holders)


async def test_a_store_error_reading_a_redelivery_mark_holds_the_resend_and_keeps_ingest_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """After a restart the marks are read from the store (`RedeliveryMarks`). A failing read used to end the agent
    loop (and the daemon): now the resent message waits, unacknowledged, and the read is retried; once it works the
    copy is recognised (acknowledged, not stored twice) and ingest goes on."""
    key, path = SoftStorageKey(), tmp_path / "agw.db"
    with Store.open(path, key) as store:
        await Ingest(store).feed(*(publish(mid, f"m{mid}".encode()) for mid in range(1, 11)))
    with Store.open(path, key) as store:
        again = Ingest(store)
        real_get, failures = store.secrets.get, [0]

        def failing_get(name: str) -> bytes | None:
            if failures[0] < 1:
                failures[0] += 1
                raise StoreError("test: the disk returned an I/O error")
            return real_get(name)

        monkeypatch.setattr(store.secrets, "get", failing_get)
        again.bridge.incoming.put_nowait(publish(7, b"m7", dup=True))
        task = asyncio.create_task(again._agent_loop())
        try:
            await asyncio.sleep(0.3)
            assert failures == [1] and again.acked == [] and not task.done()  # held, not acknowledged, running
            assert "holding the resent message unacknowledged" in caplog.text and "m7" not in caplog.text
            await eventually(lambda: len(again.acked) == 1, what="the copy acknowledged after the retry")
            assert store.outbox.depth() == 10 and again.counters.sent == 0  # recognised: not stored twice
            again.bridge.incoming.put_nowait(publish(11, b"m11"))
            await eventually(lambda: len(again.acked) == 2, what="ingest going on")
            assert store.outbox.depth() == 11 and not task.done()
        finally:
            task.cancel()
