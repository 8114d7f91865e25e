"""The sender loop (gateway/sending.py `_sender_loop`) on a real store, with the relay link and the pairwise
sessions faked: a batch handed over in memory goes out once, and its first send within HANDOVER_FRESH_MS of
being stored writes nothing (the insert counted the attempt and set the retry time); sent later, or after its rows
were rescheduled, purged or released, each entry is marked (rescheduled, not counted again) and what left the
outbox is not sent. An unanswered entry is retried from the outbox after its stored due time, not before."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway import sending
from gateway.protocol.envelope import Envelope
from gateway.sending import HANDOVER_DUE_MS, HANDOVER_FRESH_MS, RETRY_MIN_MS
from gateway.store import OutboxEntry, Store
from tests.protocol.test_send_ingest import Ingest, publish
from tests.relay.conftest import eventually
from tests.store.conftest import SoftStorageKey

T0 = 1_900_000_000_000


class _Book:
    def has_session(self, peer: str) -> bool:
        return True

    def encrypt_batch(self, peer: str, records: list[bytes]) -> bytes:
        return b"".join(records)

    def flush(self) -> None:
        pass


class _Link:
    def __init__(self) -> None:
        self.state = SimpleNamespace(value="ready")
        self.config = SimpleNamespace(max_envelope_size=256 * 1024)
        self.sent: list[Envelope] = []
        self.queued = 0  # envelopes waiting for the link's writer

    async def send(self, envelopes: list[Envelope]) -> None:
        self.sent.extend(envelopes)

    def room(self) -> tuple[int, int]:
        return 1 << 30, 10_000  # (never full)


class Sender(Ingest):
    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.link = _Link()
        self.book = _Book()
        self.device_id = "dev-a"
        self._peer_retry_at: dict[str, int] = {}
        self._inflight: defaultdict[str, dict[bytes, int]] = defaultdict(dict)
        self._fetching: dict[str, object] = {}

    async def pass_(self) -> list[bytes]:
        """Let the running sender loop make one pass; the message ids it sent."""
        before = len(self.link.sent)
        self._wake_sender.set()
        for _ in range(5):
            await asyncio.sleep(0)
        return [e.envelope_id for e in self.link.sent[before:]]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    now = [T0]
    monkeypatch.setattr(sending, "now_ms", lambda: now[0])
    return now


def _rows(store: Store) -> dict[bytes, tuple[int, int]]:
    return {e.msg_id: (e.due_at_ms, e.attempts) for e in store.outbox.entries()}


async def test_a_first_send_from_memory_writes_nothing_and_is_retried_after_its_due_time(
        tmp_path: Path, clock: list[int]) -> None:
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        s = Sender(store)
        loop = asyncio.create_task(s._sender_loop())
        try:
            await s.pass_()  # (start-up: release_unsent)
            s.link.state.value = "connecting"
            await s.feed(*(publish(i, f"m{i}".encode()) for i in range(1, 6)))
            stored = _rows(store)
            assert set(stored.values()) == {(T0 + HANDOVER_DUE_MS, 1)}
            clock[0] += HANDOVER_FRESH_MS // 2  # still fresh
            s.link.state.value = "ready"
            sent = await s.pass_()
            assert len(sent) == 1 and len(s.link.sent[0].ciphertext) > 0  # one batch of five
            assert _rows(store) == stored and not s._handover.peers  # no attempt mark
            s._inflight.clear()  # (the window: nothing answered)
            clock[0] = T0 + HANDOVER_DUE_MS - 1
            assert await s.pass_() == []  # not retried before the stored due time ...
            clock[0] = T0 + HANDOVER_DUE_MS
            assert len(await s.pass_()) == 1  # ... then from the outbox, marked as a second attempt
            assert set(_rows(store).values()) == {(T0 + HANDOVER_DUE_MS + 2 * RETRY_MIN_MS, 2)}
        finally:
            loop.cancel()


async def test_a_clock_step_back_before_the_first_send_does_not_delay_the_first_retry(
        tmp_path: Path, clock: list[int]) -> None:
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        s = Sender(store)
        loop = asyncio.create_task(s._sender_loop())
        try:
            await s.pass_()
            s.link.state.value = "connecting"
            await s.feed(*(publish(i, f"m{i}".encode()) for i in range(1, 4)))
            assert set(_rows(store).values()) == {(T0 + HANDOVER_DUE_MS, 1)}
            clock[0] = T0 - 3_600_000  # the wall clock steps back an hour (NTP) before the send
            s.link.state.value = "ready"
            assert len(await s.pass_()) == 1
            # Marked (not counted again): retried RETRY_MIN_MS after the send, not an hour + HANDOVER_DUE_MS later.
            assert set(_rows(store).values()) == {(clock[0] + RETRY_MIN_MS, 1)}
        finally:
            loop.cancel()


async def test_late_rescheduled_or_purged_entries_are_marked_and_what_left_is_not_sent(
        tmp_path: Path, clock: list[int]) -> None:
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        s = Sender(store)
        s.link.state.value = "connecting"  # nothing goes out yet
        loop = asyncio.create_task(s._sender_loop())
        try:
            await s.pass_()
            await s.feed(*(publish(i, f"m{i}".encode()) for i in range(1, 4)))
            ids = list(_rows(store))
            store.outbox.delete_many([ids[0]])  # left the outbox while held (as if purged one by one)
            clock[0] += HANDOVER_FRESH_MS + 1  # too late for the stored retry time
            s.link.state.value = "ready"
            await s.pass_()
            assert s.link.sent[0].envelope_id == ids[1]  # the one that left is not sent
            assert _rows(store) == {i: (clock[0] + RETRY_MIN_MS, 1) for i in ids[1:]}  # rescheduled, not counted

            s.link.state.value = "connecting"
            await s.feed(*(publish(i, f"n{i}".encode()) for i in range(10, 13)))
            new = [i for i in _rows(store) if i not in ids]
            store.purge_peer("dev-b")  # by the operator, through the control socket (same loop)
            s.link.state.value = "ready"
            assert await s.pass_() == [] and not s._handover.peers  # fresh, but its rows are gone

            s.link.state.value = "connecting"
            await s.feed(*(publish(i, f"o{i}".encode()) for i in range(20, 23)))
            store.outbox.reschedule_peer("dev-b", clock[0] + 250)  # the relay said congested
            s._inflight.clear()
            s.link.state.value = "ready"
            assert len(await s.pass_()) == 1
            assert {v for i, v in _rows(store).items() if i not in new} == {(clock[0] + RETRY_MIN_MS, 1)}
        finally:
            loop.cancel()


async def test_a_batch_waits_for_room_only_behind_its_own_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Handover.wait_room`: a batch that does not fit waits (bounded) while the sender drains the same peer's held
    messages, but never behind another peer's: a slow peer filling the hand-over must not delay the PUBACKs and
    receipts of agents that send elsewhere."""
    monkeypatch.setattr(sending, "HANDOVER_ENTRIES", 4)
    hand = sending.Handover()
    hand.add([(bytes([i]) * 16, "slow", b"r", T0 + 10**9) for i in range(4)], T0, counted=True)
    hand.taken_at = time.monotonic()  # the sender is moving
    other = [(b"o" * 16, "other", b"r", T0 + 10**9)]
    t = asyncio.get_running_loop().time()
    assert await hand.wait_room(other) is False
    assert asyncio.get_running_loop().time() - t < 0.1  # refused at once, no wait
    same = [(b"s" * 16, "slow", b"r", T0 + 10**9)]
    asyncio.get_running_loop().call_later(0.05, hand.remove, "slow", [bytes([0]) * 16])
    t = asyncio.get_running_loop().time()
    assert await hand.wait_room(same) is True  # room made by the sender within the wait
    assert 0.04 <= asyncio.get_running_loop().time() - t < sending.HANDOVER_WAIT_S


async def test_a_slow_peers_held_entries_are_not_read_back_on_every_pass(
        tmp_path: Path, clock: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding (h): entries held in memory for a peer whose send window stays (nearly) full become due in
    the outbox after HANDOVER_DUE_MS. The sender must not read and unseal all of them, only to skip them, on
    every pass: it reads from the outbox at most the peer's room, oldest first (the entries it then sends from
    memory), and nothing while the window is full; each is sent once, rescheduled and not counted again."""
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        s = Sender(store)
        s.link.state.value = "connecting"
        loop = asyncio.create_task(s._sender_loop())
        try:
            await s.pass_()
            await s.feed(*(publish(i, f"m{i}".encode()) for i in range(1, 41)))
            ids = list(_rows(store))
            assert len(s._handover.ids("dev-b")) == 40
            unsealed: list[bytes] = []
            entry = store.outbox._entry

            def counting(*args: object, **kw: object) -> object:
                e = entry(*args, **kw)  # type: ignore[arg-type]
                unsealed.append(e.msg_id)
                return e

            monkeypatch.setattr(store.outbox, "_entry", counting)
            clock[0] += HANDOVER_DUE_MS + 1  # the held entries' rows are due now
            others = [i.to_bytes(16, "big") for i in range(sending.SEND_WINDOW)]  # sent and not answered yet
            s._inflight["dev-b"] = dict.fromkeys(others[2:], clock[0])  # room for two
            s.link.state.value = "ready"
            for n in range(4):
                before = len(unsealed)
                assert len(await s.pass_()) == 1  # one batch ...
                assert unsealed[before:] == ids[2 * n:2 * n + 2]  # ... of the two oldest, the only rows read
                assert len(await s.pass_()) == 0 and len(unsealed) == before + 2  # window full: nothing read
                s._settled("dev-b", tuple(ids[2 * n:2 * n + 2]))  # answered: room for two again
            rows = _rows(store)
            assert {rows[i] for i in ids[:8]} == {(clock[0] + RETRY_MIN_MS, 1)}  # rescheduled, not counted again
            assert s._handover.ids("dev-b") == ids[8:]
        finally:
            loop.cancel()


async def test_a_stored_batch_is_sent_by_the_ingest_task_after_its_commit_and_pubacks(
        tmp_path: Path, clock: list[int]) -> None:
    """With the link ready, the agent loop runs the sender's pass itself once a batch is stored (no sender task
    here at all): the batch goes out at once, and only after its outbox rows are committed (read back through a
    second connection, which sees only committed data) and its PUBACKs were queued. A batch stored while a pass
    waits in `link.send` is not sent from the ingest task (no two passes interleave): the sender task sends it
    once that pass is over, each message once."""
    path = tmp_path / "agw.db"
    with Store.open(path, SoftStorageKey()) as store:
        s = Sender(store)
        seen: list[tuple[int, int]] = []  # at each encryption: (PUBACKs queued, rows committed)
        encrypt = s.book.encrypt_batch

        def watching(peer: str, records: list[bytes]) -> bytes:
            with sqlite3.connect(path) as other:
                committed = other.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            seen.append((len(s.acked), committed))
            return encrypt(peer, records)

        s.book.encrypt_batch = watching  # type: ignore[method-assign]
        await s.feed(*(publish(i, f"m{i}".encode()) for i in range(1, 6)))
        await s.feed(publish(6, b"m6"))
        assert [len(e.ciphertext) > 0 for e in s.link.sent] == [True, True]  # two batches, no sender task
        assert seen == [(5, 5), (6, 6)]
        assert not s._wake_sender.is_set() and not s._handover.peers

    with Store.open(tmp_path / "other.db", SoftStorageKey()) as store:
        s = Sender(store)
        gate = asyncio.Event()
        real_send = s.link.send

        async def slow(envelopes: list[Envelope]) -> None:
            await gate.wait()  # the link's queue is full
            await real_send(envelopes)

        s.link.send = slow  # type: ignore[method-assign]
        loop = asyncio.create_task(s._sender_loop())
        try:
            await s.pass_()  # (start-up)
            s.link.queued = 1  # a backlog for the link's writer: the sender task is woken, and waits in send
            await s.feed(publish(1, b"m1"))
            await eventually(lambda: s._send_busy, what="the sender task's pass waiting in link.send")
            s.link.queued = 0
            await s.feed(publish(2, b"m2"))  # stored while that pass waits: not sent from the ingest task
            assert s.link.sent == [] and s._send_busy
            gate.set()
            await eventually(lambda: len(s.link.sent) == 2, what="m1, then m2")
            assert [e.envelope_id for e in s.link.sent] == list(_rows(store))
            await s.pass_()
            assert len(s.link.sent) == 2  # each sent once
        finally:
            loop.cancel()


def test_held_messages_cost_their_record_and_a_dict_slot() -> None:
    """Issue 7: the hand-over holds ~3,500-4,100 messages of 256 B under load, at the sender's peak, and takes in
    and gives up ~4,000 a second. Held as records in per-batch dicts, a message costs its record and a dict slot
    (~36 bytes), also while the sender takes messages and ingest adds them (a single dict of `OutboxEntry`s cost
    ~124 bytes over the record, and under that churn CPython regrew it to a ~295 KB table: ~160 KB more); what
    the sender takes is the same entries, oldest first."""
    import tracemalloc

    hand = sending.Handover()
    expires = T0 + 3_600_000
    batches = [[(i.to_bytes(4, "big") + bytes(12), "dev-b", b"r" * 300 + bytes([i % 251]), expires)
                for i in range(b * 512, (b + 1) * 512)] for b in range(48)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for items in batches[:8]:
            hand.add(items, T0 + HANDOVER_DUE_MS, counted=True)
        held = (tracemalloc.get_traced_memory()[0] - before) / 4096
        assert hand.first("dev-b", 3) == [OutboxEntry(*batches[0][i], 1, T0 + HANDOVER_DUE_MS) for i in range(3)]
        tracemalloc.reset_peak()
        for n, items in enumerate(batches[8:]):  # the sender takes 512 (in two sends), ingest adds 512
            for _ in range(2):
                taken = hand.first("dev-b", 256)
                hand.remove("dev-b", [e.msg_id for e in taken])
            assert [e.msg_id for e in taken][-1] == batches[n][-1][0]
            del taken
            hand.add(items, T0 + HANDOVER_DUE_MS, counted=True)
        churn = (tracemalloc.get_traced_memory()[1] - before) / 4096
    finally:
        tracemalloc.stop()
    assert hand.count == 4096 and hand.bytes == 4096 * 301 and len(hand.peers["dev-b"]) == 8
    assert held < 45, held  # (the records are the test's: not counted here)
    assert churn < 80, churn  # (with the sender's `OutboxEntry`s of 256 messages at a time)


def test_stale_marks_only_entries_held_before_it() -> None:
    """`stale` zeroes the due time of every entry held at that moment (shared metas included), not of entries
    added afterwards; expiry removes by each entry's own expiry."""
    hand = sending.Handover()
    hand.add([(b"a" * 16, "p", b"r", 100), (b"b" * 16, "p", b"r", 200)], 7_000, counted=True)
    hand.stale()
    hand.add([(b"c" * 16, "p", b"r", 200), (b"d" * 16, "q", b"r", 300)], 9_000, counted=False)
    assert [(e.msg_id[:1], e.expires_at_ms, e.attempts, e.due_at_ms) for e in hand.first("p", 9)] == [
        (b"a", 100, 1, 0), (b"b", 200, 1, 0), (b"c", 200, 0, 9_000)]
    hand.remove_expired(200)
    assert list(hand.peers) == ["q"] and hand.count == 1 and hand.bytes == 1
    assert hand.first("q", 1)[0].due_at_ms == 9_000


def test_runs_keep_each_entry_as_added_and_an_id_once() -> None:
    """The hand-over's runs: a small batch joins the peer's last run, an entry with another expiry than its run's
    keeps its own, an id already held (in any run, or twice in a batch) is held once as first added, batches
    that alternate peers keep each peer's order, and removal finds ids in any run."""
    hand = sending.Handover()
    m = [bytes([i]) * 16 for i in range(12)]
    hand.add([(m[0], "p", b"a", 100), (m[1], "p", b"bb", 150), (m[2], "q", b"c", 100), (m[3], "p", b"d", 100)],
             7_000, counted=True)
    hand.add([(m[1], "p", b"dup", 100), (m[4], "p", b"e", 100), (m[4], "p", b"dup", 100)], 7_000, counted=True)
    hand.add([(m[5], "p", b"f", 300), (m[0], "p", b"dup", 300)], 8_000, counted=False)  # another due: its own
    assert hand.count == 6 and hand.bytes == 7
    assert [(e.msg_id, e.record, e.expires_at_ms, e.attempts, e.due_at_ms) for e in hand.first("p", 9)] == [
        (m[0], b"a", 100, 1, 7_000), (m[1], b"bb", 150, 1, 7_000), (m[3], b"d", 100, 1, 7_000),
        (m[4], b"e", 100, 1, 7_000), (m[5], b"f", 300, 0, 8_000)]
    assert hand.ids("q") == [m[2]] and hand.holds(hand.first("p", 5)[4]) and len(hand.peers["p"]) == 1
    hand.remove("p", [m[5], m[1], m[11], m[1]])  # in the last run and the first, one not held, one twice
    assert hand.ids("p") == [m[0], m[3], m[4]] and hand.count == 4 and hand.bytes == 4
    hand.remove_expired(100)
    assert hand.ids("p") == [] and "p" not in hand.peers and hand.ids("q") == []
    assert hand.count == 0 and hand.bytes == 0 and not hand.peers


def test_a_trickle_of_small_batches_shares_runs() -> None:
    """Review finding M1 (tenth session): each batch is stored at its own millisecond, i.e. with its own due time,
    and a batch joined the last run only with equal values, so a trickle of small batches (the relay link down,
    agents publishing slowly) made one run per message, up to 4,096, each looked through on every add and every
    `holds`. A small last run now takes any batch; the messages keep their own values."""
    hand = sending.Handover()
    for i in range(200):
        counted = i % 3 != 0
        hand.add([(i.to_bytes(16, "big"), "p", b"r", 10_000 + i)], 7_000 + i, counted=counted)
    assert len(hand.peers["p"]) <= 200 // sending.HANDOVER_RUN_MIN + 1
    assert [(e.msg_id, e.expires_at_ms, e.attempts, e.due_at_ms) for e in hand.first("p", 200)] == [
        (i.to_bytes(16, "big"), 10_000 + i, int(i % 3 != 0), 7_000 + i) for i in range(200)]
    hand.stale()
    hand.add([(b"x" * 16, "p", b"r", 10_500)], 7_500, counted=True)
    assert {e.due_at_ms for e in hand.first("p", 200)} == {0} and hand.first("p", 201)[-1].due_at_ms == 7_500


async def test_the_ingest_tasks_pass_takes_only_what_the_links_queue_holds(tmp_path: Path, clock: list[int]) -> None:
    """The agent loop's sender pass (`_send_now`) used to queue a whole window on the link, which can be more than
    the link's `send_queue_bytes` (512 messages of 16 KiB are 8 MiB): `link.send` then waited for the writer, and
    ingest (its PUBACKs) with it, for as long as the relay did not read. Now it takes what the real link's queue
    holds without waiting and leaves the rest to the sender task: the two together send each message once."""
    from gateway.link import LinkStatus, RelayLink, RelayLinkConfig

    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        s = Sender(store)
        cfg = RelayLinkConfig(url="wss://127.0.0.1:9/", ca_file=tmp_path / "ca.pem", send_queue_bytes=256 * 1024)
        link = RelayLink(cfg, lambda challenge, audience: "")
        s.link = link  # type: ignore[assignment]  (never started: no writer, nothing leaves its queue)
        encrypted: list[bytes] = []

        def encrypt(peer: str, records: list[bytes]) -> bytes:
            encrypted.extend(records)
            return b"".join(records)

        s.book.encrypt_batch = encrypt  # type: ignore[method-assign]
        sender = asyncio.create_task(s._sender_loop())  # (its start-up first, as in the daemon)
        try:
            await s.feed(*(publish(i, bytes([i]) * 16 * 1024) for i in range(1, 41)))  # stored; the link not ready
            assert encrypted == [] and len(s._handover.ids("dev-b")) == 40
            link._status = LinkStatus.READY  # authenticated, and the relay reads nothing
            s._wake_sender.clear()
            async with asyncio.timeout(5):  # (in this task: the sender task does not run meanwhile)
                await s._send_now()  # returns: it did not wait for room
            assert 0 < len(encrypted) < 40 and link.queued > 0
            assert link._outgoing_bytes <= cfg.send_queue_bytes
            assert s._wake_sender.is_set()  # the rest is the sender task's
            delivered: list[Envelope] = []
            for _ in range(200):  # the writer, at last: the queue drains, and the sender task goes on
                while not link._outgoing.empty():
                    delivered.append(link._outgoing.get_nowait())
                link._outgoing_bytes = 0
                link._room.set()
                if len(encrypted) == 40 and sum(len(e.ciphertext) for e in delivered) == 40 * len(encrypted[0]):
                    break
                await asyncio.sleep(0.01)
        finally:
            sender.cancel()
        assert len(encrypted) == len(set(encrypted)) == 40
        assert b"".join(e.ciphertext for e in delivered) == b"".join(encrypted)  # each once, in order
