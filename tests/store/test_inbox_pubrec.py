"""The inbox's PUBREC marks (gateway/inbox.py `PubrecMarks`): the broker's PUBREC of an inbox entry is one slot
per packet id in a sealed bucket record, not the entry re-sealed. A restart must read PUBLISHED + mark as
BROKER_HAS (only PUBREL is sent: a new PUBLISH would deliver a second copy), and a mark left from an earlier
exchange under the same packet id must never count (a PUBREL alone would then be answered PUBCOMP by Mosquitto
without delivery: a lost message)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.inbox import PUBREC_PER_BUCKET, InboxEntry, Phase, PubrecMarks
from gateway.protocol.message import InnerMessage, Kind
from gateway.receiving import Receiving
from gateway.store import OutboxFull, OutboxLimits, Store, StoreError, StoreFull

from .conftest import SoftStorageKey, mid


def entry(n: int, packet_id: int) -> InboxEntry:
    msg = InnerMessage(kind=Kind.DATA, message_id=mid(n), sender_agent="alice", recipient_agent="bob",
                       created_at_ms=1, expires_at_ms=10**13, payload=b"m%d" % n)
    e = InboxEntry.new("dev-a", n, msg)
    e.packet_id, e.phase = packet_id, Phase.PUBLISHED
    return e


def read_back(s: Store, marks: PubrecMarks, name: str) -> InboxEntry:
    record = s.inbox.get(name)
    assert record is not None
    return Receiving._inbox_entry(SimpleNamespace(pubrec_marks=marks), name, record)  # type: ignore[arg-type]


def test_a_pubrec_mark_survives_a_restart_and_reads_as_broker_has(db_path: Path, key: SoftStorageKey) -> None:
    a, b = entry(1, 7), entry(2, 8)
    with Store.open(db_path, key) as s:
        marks = PubrecMarks(s.secrets)
        with s.transaction():  # the inbox commit: records PUBLISHED, their slots cleared
            s.inbox.put_many([(e.name, e.record()) for e in (a, b)])
            marks.write(cleared=[7, 8])
        with s.transaction(durable=False):  # the broker's PUBREC for a only
            marks.write(marked=[(7, a.name)])
        assert s.secrets.count() == 1  # one bucket record, the inbox records untouched
        assert s.inbox.get(a.name) == a.record()
    with Store.open(db_path, key) as s:  # kill -9 and restart
        marks = PubrecMarks(s.secrets)
        assert read_back(s, marks, a.name).phase is Phase.BROKER_HAS
        assert read_back(s, marks, b.name).phase is Phase.PUBLISHED
        assert not marks.has(7, b.name)  # the slot names its entry


def test_a_mark_from_an_earlier_exchange_under_the_same_packet_id_does_not_count(store: Store) -> None:
    a = entry(1, 7)
    marks = PubrecMarks(store.secrets)
    with store.transaction():
        store.inbox.put(a.name, a.record())
        marks.write(cleared=[7])
    with store.transaction(durable=False):
        marks.write(marked=[(7, a.name)])
    # The broker lost it (gateway/receiving.py `_exchange_lost`): WAITING, then published again and given the same
    # packet id 7: the transaction that stores the new exchange clears the old mark.
    a.phase, a.packet_id = Phase.WAITING, 0
    with store.transaction(durable=False):
        store.inbox.put(a.name, a.record())
    a.phase, a.packet_id = Phase.PUBLISHED, 7
    with store.transaction(durable=False):
        store.inbox.put(a.name, a.record())
        marks.write(cleared=[7])
    assert read_back(store, PubrecMarks(store.secrets), a.name).phase is Phase.PUBLISHED


def test_a_write_touching_more_buckets_than_the_cache_keeps_every_mark(db_path: Path, key: SoftStorageKey) -> None:
    ids = [1 + i * PUBREC_PER_BUCKET for i in range(6)] + [65535]
    with Store.open(db_path, key) as s:
        marks = PubrecMarks(s.secrets, cache=2)
        with s.transaction(durable=False):
            marks.write(marked=[(p, f"dev-a/{p}") for p in ids])
        assert all(marks.has(p, f"dev-a/{p}") for p in ids)
        assert s.secrets.count() == len(ids)
    with Store.open(db_path, key) as s:
        marks = PubrecMarks(s.secrets, cache=2)
        assert all(marks.has(p, f"dev-a/{p}") for p in ids)
        assert not any(marks.has(p + 1, f"dev-a/{p}") for p in ids[:-1])
        with pytest.raises(ValueError, match="packet ids"):
            marks.has(0, "dev-a/0")


def test_marks_of_a_failed_transaction_are_forgotten(store: Store) -> None:
    store.outbox.limits = OutboxLimits(max_entries=1)
    marks = PubrecMarks(store.secrets)
    with pytest.raises(OutboxFull), store.transaction():
        marks.write(marked=[(9, "dev-a/9")])
        store.outbox.put_many([(mid(1), "dev-b", b"a", 10), (mid(2), "dev-b", b"b", 10)])
    marks.forget()  # what receiving.py's `_inbox_writes` does
    assert not marks.has(9, "dev-a/9")


def stored_and_marked(s: Store, e: InboxEntry) -> PubrecMarks:
    """Entry `e` stored PUBLISHED under its packet id (the inbox commit clears that slot), then its PUBREC marked."""
    marks = PubrecMarks(s.secrets)
    with s.transaction():
        s.inbox.put(e.name, e.record())
        marks.write(cleared=[e.packet_id])
    with s.transaction(durable=False):
        marks.write(marked=[(e.packet_id, e.name)])
    return marks


def test_a_broker_that_lost_our_session_clears_the_marks_of_what_is_published_again(
        db_path: Path, key: SoftStorageKey) -> None:
    """CONNACK without our session: the bridge publishes the interrupted exchanges again as new PUBLISHes and
    calls `_broker_lost_session`. Their marks must go at once: after a kill -9 before the broker's new PUBREC, a
    restart reading BROKER_HAS would send a lone PUBREL, which Mosquitto answers PUBCOMP without delivering."""
    a = entry(1, 7)
    with Store.open(db_path, key) as s:
        marks = stored_and_marked(s, a)  # the broker's PUBREC, before it lost the session
        a.phase = Phase.BROKER_HAS  # in memory, as `_broker_has` leaves it
        receiver = SimpleNamespace(_in_flight={7: a}, store=s, pubrec_marks=marks)
        receiver._inbox_writes = lambda: Receiving._inbox_writes(receiver)  # type: ignore[arg-type]
        Receiving._broker_lost_session(receiver, [7, 9])  # type: ignore[arg-type]  # (9: a group's exchange)
        assert a.phase is Phase.PUBLISHED
    with Store.open(db_path, key) as s:  # kill -9 before the new PUBREC, and restart
        assert read_back(s, PubrecMarks(s.secrets), a.name).phase is Phase.PUBLISHED


class _Bridge:
    """What `Receiving._start_publishes` asks of the MQTT bridge: packet ids (always `packet_id` here, as when
    an id is freed and taken again) and the exchange's connection count."""

    connects, connected = 1, True

    def __init__(self, packet_id: int) -> None:
        self.packet_id = packet_id
        self.reserved = 0

    def reserve_packet_id(self) -> int:
        self.reserved += 1
        return self.packet_id

    def free_packet_id(self, packet_id: int) -> None:
        assert packet_id == self.packet_id
        self.reserved -= 1


def _receiver(s: Store, marks: PubrecMarks, bridge: _Bridge) -> SimpleNamespace:
    """The receiving half's state that `_start_publishes` uses, over a real store; the PUBLISH itself is not sent
    (`_publish_to_agent` only records the entry): this is about what is stored before it leaves."""
    r = SimpleNamespace(store=s, pubrec_marks=marks, bridge=bridge, _publishing=set(), _in_flight={},
                        _publish_room=asyncio.Event(), sent=[])
    r._inbox_writes = lambda: Receiving._inbox_writes(r)  # type: ignore[arg-type]
    r._give_packet_id = lambda e: Receiving._give_packet_id(r, e)  # type: ignore[arg-type]
    r._exchange_connect = lambda: 1
    r._publish_to_agent = lambda e, done: r.sent.append((e.name, e.packet_id))
    return r


async def test_an_entry_published_again_under_its_old_packet_id_loses_that_ids_old_mark(
        db_path: Path, key: SoftStorageKey) -> None:
    """Through `Receiving._start_publishes` itself: entry a was marked under id 7, then went back to WAITING (the
    broker lost it); given id 7 again, the transaction that stores it PUBLISHED under 7 must clear the old mark,
    or a kill -9 before the new PUBREC restarts it as BROKER_HAS (a lone PUBREL: lost)."""
    a = entry(1, 7)
    with Store.open(db_path, key) as s:
        marks = stored_and_marked(s, a)  # the first exchange's PUBREC
        a.phase, a.packet_id = Phase.WAITING, 0  # (`_exchange_lost`)
        with s.transaction(durable=False):
            s.inbox.put(a.name, a.record())
        r = _receiver(s, marks, _Bridge(7))
        Receiving._start_publishes(r, [a])  # type: ignore[arg-type]
        assert r.sent == [(a.name, 7)]
    with Store.open(db_path, key) as s:  # kill -9 before the new PUBREC, and restart
        assert read_back(s, PubrecMarks(s.secrets), a.name).phase is Phase.PUBLISHED


async def test_a_store_error_while_storing_packet_ids_leaves_the_entries_waiting(
        db_path: Path, key: SoftStorageKey) -> None:
    """The transaction that stores packet ids for waiting entries fails after the ids were taken (here: the store
    is at its size cap, as on a full disk): nothing is published, the ids go back to the bridge, the entries wait
    for the next try, and the daemon keeps running (review finding (i): the error used to end it)."""
    big = InnerMessage(kind=Kind.DATA, message_id=mid(1), sender_agent="alice", recipient_agent="bob",
                       created_at_ms=1, expires_at_ms=10**13, payload=os.urandom(256 * 1024))  # pages the cap refuses
    a = InboxEntry.new("dev-a", 1, big)
    assert a.phase is Phase.WAITING
    with Store.open(db_path, key) as s:
        s.set_max_bytes(s.stats().db_bytes)
        bridge = _Bridge(7)
        r = _receiver(s, PubrecMarks(s.secrets), bridge)
        assert Receiving._start_publishes(r, [a]).started == 0  # type: ignore[arg-type]
        assert (a.phase, a.packet_id, bridge.reserved, r.sent) == (Phase.WAITING, 0, 0, [])
        assert a.name not in r._publishing  # the inbox loop may take it again


def _pubrec_receiver(s: Store, marks: PubrecMarks, in_flight: dict[int, InboxEntry],
                     finished: list[InboxEntry]) -> SimpleNamespace:
    """The receiving half's state that `_broker_has` and `_drop_finished` use, over a real store."""
    freed: list[int] = []
    r = SimpleNamespace(store=s, pubrec_marks=marks, _in_flight=in_flight, _finished=finished, _ack_waits={},
                        _drop_due=None,
                        _publishing={e.name for e in [*in_flight.values(), *finished]}, _publish_room=asyncio.Event(),
                        counters=SimpleNamespace(delivered=0), freed=freed,
                        bridge=SimpleNamespace(free_packet_id=freed.append))
    r._inbox_writes = lambda: Receiving._inbox_writes(r)  # type: ignore[arg-type]
    r._hold_on_pubcomp = lambda e: False  # (no acking agent)
    r._after_pubcomp = lambda held: None
    r._store_finished = lambda done: Receiving._store_finished(r, done)  # type: ignore[arg-type]
    r._finished_stored = lambda done, held: Receiving._finished_stored(r, done, held)  # type: ignore[arg-type]
    r._drop_finished = lambda: Receiving._drop_finished(r)  # type: ignore[arg-type]
    r._delivered_to_broker = lambda e: Receiving._delivered_to_broker(r, e)  # type: ignore[arg-type]
    return r


def _files_now(db_path: Path, to: Path) -> Path:
    """The store's files as a kill -9 would leave them now (the database and its WAL), copied to `to`."""
    to.parent.mkdir(parents=True, mode=0o700)
    for suffix in ("", "-wal"):
        src = Path(f"{db_path}{suffix}")
        if src.exists():
            shutil.copyfile(src, f"{to}{suffix}")
    return to


def _count_commits(s: Store, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The outermost transactions begun on `s` from now on (their `durable` flags)."""
    begun: list[bool] = []
    real = s.transaction

    def counted(*, durable: bool = True):  # type: ignore[no-untyped-def]
        if not s._db._depth:
            begun.append(durable)
        return real(durable=durable)

    monkeypatch.setattr(s, "transaction", counted)
    return begun


async def test_completed_entries_wait_for_the_next_pubrec_commit(
        db_path: Path, key: SoftStorageKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PUBCOMP read alone does not cost a transaction of its own: the entry is deleted in the commit of the next
    PUBREC batch, if one comes within FINISHED_WAIT_MAX (one commit for both, the `_drop_finished` scheduled for the
    entry cancelled). Meanwhile the entry keeps its packet id and its claim (neither may be reused before the
    delete is committed), but leaves room under PUBLISH_BACKLOG at once (the relay link waits for nothing)."""
    from gateway import receiving

    FINISHED_WAIT_MAX = 0.2  # (5 ms in the daemon: a busy test machine can stall longer between two steps)
    monkeypatch.setattr(receiving, "FINISHED_WAIT_MAX", FINISHED_WAIT_MAX)
    a, b = entry(1, 7), entry(2, 8)  # b: its PUBCOMP is read first; a: its PUBREC comes after it
    with Store.open(db_path, key) as s:
        with s.transaction(durable=False):
            s.inbox.put_many([(a.name, a.record()), (b.name, b.record())])
        r = _pubrec_receiver(s, PubrecMarks(s.secrets), {7: a}, [])
        r._publishing = {a.name, b.name}
        begun = _count_commits(s, monkeypatch)
        r._delivered_to_broker(b)
        assert r._publish_room.is_set() and len(r._publishing) - len(r._finished) == 1
        await asyncio.sleep(0)  # (was: `_drop_finished` at the next turn of the loop, a transaction of its own)
        await asyncio.sleep(0)
        assert begun == [] and s.inbox.get(b.name) is not None
        assert r.freed == [] and b.name in r._publishing  # packet id and claim held until the delete's commit
        Receiving._broker_has(r, [7])  # type: ignore[arg-type]
        assert begun == [False]  # one commit: a's PUBREC mark and b's delete
        assert s.inbox.get(b.name) is None and r.freed == [8] and r._publishing == {a.name}
        assert r._finished == [] and r._drop_due is None
        await asyncio.sleep(FINISHED_WAIT_MAX * 3)
        assert begun == [False] and r.counters.delivered == 1  # the scheduled drop was cancelled
    with Store.open(db_path, key) as s:  # kill -9 now, and restart: a resumes with a PUBREL, b is gone
        assert read_back(s, PubrecMarks(s.secrets), a.name).phase is Phase.BROKER_HAS
        assert s.inbox.get(b.name) is None


async def test_completed_entries_without_a_pubrec_are_dropped_within_the_bound(
        db_path: Path, key: SoftStorageKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """No PUBREC comes (the end of a burst, or a lone message): the entries completed meanwhile go in one commit
    FINISHED_WAIT_MAX after the first of them, not later. Killed before it, a restart finds the entry as it was
    (BROKER_HAS: it resumes with a PUBREL, which the broker answers with PUBCOMP without delivering again)."""
    from gateway import receiving

    FINISHED_WAIT_MAX = 0.2  # (5 ms in the daemon: a busy test machine can stall longer between two steps)
    monkeypatch.setattr(receiving, "FINISHED_WAIT_MAX", FINISHED_WAIT_MAX)
    a, b, c = entry(1, 7), entry(2, 8), entry(3, 9)
    with Store.open(db_path, key) as s:
        marks = PubrecMarks(s.secrets)
        with s.transaction(durable=False):
            s.inbox.put_many([(e.name, e.record()) for e in (a, b, c)])
            marks.write(marked=[(7, a.name), (8, b.name), (9, c.name)])
        for e in (a, b, c):
            e.phase = Phase.BROKER_HAS
        r = _pubrec_receiver(s, marks, {}, [])
        r._publishing = {a.name, b.name, c.name}
        begun = _count_commits(s, monkeypatch)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r._delivered_to_broker(a)
        await asyncio.sleep(FINISHED_WAIT_MAX / 2)
        r._delivered_to_broker(b)
        assert begun == [] and s.inbox.get(a.name) is not None
        crashed = _files_now(db_path, db_path.parent.parent / "crashed" / db_path.name)
        with Store.open(crashed, key) as other:  # a kill -9 now: both entries as they were, c untouched
            assert {read_back(other, PubrecMarks(other.secrets), e.name).phase for e in (a, b, c)} == {
                Phase.BROKER_HAS}
        while r._finished and loop.time() < t0 + 1:
            await asyncio.sleep(FINISHED_WAIT_MAX / 10)
        assert loop.time() - t0 < FINISHED_WAIT_MAX + 0.5  # (the bound, and a generous margin for a busy machine)
        assert begun == [False] and r.freed == [7, 8] and r._publishing == {c.name}
        assert s.inbox.get(a.name) is None and s.inbox.get(b.name) is None and s.inbox.get(c.name) is not None


async def test_entries_completed_in_the_same_read_are_dropped_in_the_pubrec_commit(
        db_path: Path, key: SoftStorageKey) -> None:
    """Under load one read from the broker brings the PUBREC of one message and the PUBCOMP of an earlier one:
    `_broker_has` records the mark and deletes the completed entry in one commit; the packet id and the claim go
    right after it (not a loop turn later: an acking agent's ack handled in between would leave the entry held for
    good), and the `_drop_finished` scheduled for the entry finds nothing left to do."""
    a, b = entry(1, 7), entry(2, 8)  # a: PUBREC now; b: its PUBCOMP was just read
    with Store.open(db_path, key) as s:
        with s.transaction(durable=False):
            s.inbox.put_many([(a.name, a.record()), (b.name, b.record())])
        r = _pubrec_receiver(s, PubrecMarks(s.secrets), {7: a}, [b])
        Receiving._broker_has(r, [7])  # type: ignore[arg-type]
        assert a.phase is Phase.BROKER_HAS and r._finished == []
        assert s.inbox.get(b.name) is None and s.inbox.get(a.name) is not None
        assert r.freed == [8] and r._publishing == {a.name} and r.counters.delivered == 1
        r._drop_finished()
        assert r.freed == [8] and r.counters.delivered == 1
    with Store.open(db_path, key) as s:  # kill -9 now, and restart: a resumes with a PUBREL, b is gone
        assert read_back(s, PubrecMarks(s.secrets), a.name).phase is Phase.BROKER_HAS
        assert s.inbox.get(b.name) is None


async def test_a_failed_pubrec_commit_leaves_the_completed_entries_to_drop_finished(
        db_path: Path, key: SoftStorageKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared commit fails (here: the delete raises a store error): the PUBREC is not recorded (the bridge
    retries it), and the completed entry goes back to `_finished`, whose `_drop_finished` deletes it later."""
    a, b = entry(1, 7), entry(2, 8)
    with Store.open(db_path, key) as s:
        with s.transaction(durable=False):
            s.inbox.put_many([(a.name, a.record()), (b.name, b.record())])
        r = _pubrec_receiver(s, PubrecMarks(s.secrets), {7: a}, [b])
        real_delete = s.inbox.delete_many

        def failing_delete(names: list[str]) -> int:
            raise StoreFull("test: the disk is full")

        monkeypatch.setattr(s.inbox, "delete_many", failing_delete)
        with pytest.raises(StoreFull):
            Receiving._broker_has(r, [7])  # type: ignore[arg-type]
        assert a.phase is Phase.PUBLISHED and r._finished == [b] and r.freed == []
        assert read_back(s, r.pubrec_marks, a.name).phase is Phase.PUBLISHED  # the mark was rolled back
        monkeypatch.setattr(s.inbox, "delete_many", real_delete)
        r._drop_finished()
        assert s.inbox.get(b.name) is None and r.freed == [8] and r._finished == []


async def test_a_failure_after_the_pubrec_commit_does_not_reach_the_bridge(
        db_path: Path, key: SoftStorageKey) -> None:
    """What follows the shared commit (indexing held entries, publishing again those whose exchange spanned a
    reconnect: a store read) runs inside the bridge's PUBREC callback: an error there must not escape into it,
    or the bridge would report the recorded PUBRECs unrecorded and hold their PUBRELs back. The commit stands,
    the ids are freed and the delivery counted."""
    a, b = entry(1, 7), entry(2, 8)
    with Store.open(db_path, key) as s:
        with s.transaction(durable=False):
            s.inbox.put_many([(a.name, a.record()), (b.name, b.record())])
        r = _pubrec_receiver(s, PubrecMarks(s.secrets), {7: a}, [b])

        def failing(held: list[InboxEntry]) -> None:
            raise StoreError("test: reading back an entry failed")

        r._after_pubcomp = failing
        Receiving._broker_has(r, [7])  # type: ignore[arg-type]  (no exception)
        assert a.phase is Phase.BROKER_HAS and read_back(s, r.pubrec_marks, a.name).phase is Phase.BROKER_HAS
        assert s.inbox.get(b.name) is None and r.freed == [8] and r.counters.delivered == 1
        assert r._publish_room.is_set()


async def test_shutdown_commits_the_waiting_deletes_and_leaves_no_timer_on_the_closed_store(
        db_path: Path, key: SoftStorageKey, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A PUBCOMP read just before shutdown: its delete waits up to FINISHED_WAIT_MAX for a PUBREC commit. The
    daemon's `_close_receiving` (run before `store.close`) commits it then and cancels the timer, which used to fire
    on the closed store while the loop wound down (an error line, then a retry each second). A timer that fires
    after the close anyway gives up quietly: the restart's PUBREL settles the entry."""
    from gateway.receiving import FINISHED_WAIT_MAX

    a, b = entry(1, 7), entry(2, 8)
    with Store.open(db_path, key) as s:
        with s.transaction(durable=False):
            s.inbox.put_many([(a.name, a.record()), (b.name, b.record())])
        r = _pubrec_receiver(s, PubrecMarks(s.secrets), {}, [])
        r._publishing = {a.name, b.name}
        r._delivered_to_broker(a)
        assert r._drop_due is not None
        Receiving._close_receiving(r)  # type: ignore[arg-type]
        assert r._drop_due is None and s.inbox.get(a.name) is None and r.freed == [7]
    with Store.open(db_path, key) as s:  # the delete was committed before the close
        assert s.inbox.get(a.name) is None and s.inbox.get(b.name) is not None
        r = _pubrec_receiver(s, PubrecMarks(s.secrets), {}, [])
        r._publishing = {b.name}
        r._delivered_to_broker(b)  # a timer left behind by a path that did not flush: the store closes under it
    with caplog.at_level("ERROR", logger="gateway.receiving"):
        await asyncio.sleep(FINISHED_WAIT_MAX * 4)
    assert r._drop_due is None and caplog.records == []  # no error line, no retry scheduled


def test_a_mark_is_the_digest_stores_already_hold() -> None:
    """The slot's digest of an entry's name is part of the store format (marks written by an earlier version are
    read after an upgrade): BLAKE2b-128 of the name, personalised "agw-inbox-rec", a zero digest nudged to 0x01."""
    import hashlib

    from gateway import inbox

    for name in ["dev-a/" + "00" * 16, "dev-a/" + mid(7).hex(), "ünïcödé-dev/" + "ff" * 16, "x"]:
        want = hashlib.blake2b(name.encode(), digest_size=16, person=b"agw-inbox-rec").digest()
        assert inbox._name_digest(name) == want
        assert inbox._name_digest(name) == want  # (the shared state is copied, never updated itself)


@pytest.mark.parametrize("seq, packet_id, phase", [(0, 0, Phase.WAITING), (1, 7, Phase.PUBLISHED),
                                                    (2**64 - 1, 0xFFFF, Phase.BROKER_HAS), (12345, 0, Phase.HANDED)])
def test_an_entry_record_is_the_documented_layout(seq: int, packet_id: int, phase: Phase) -> None:
    """version 0x02 | seq u64 | packet id u16 | phase u8 | message (the module docstring), byte for byte, read back
    as written."""
    e = entry(3, 0)
    e.seq, e.packet_id, e.phase = seq, packet_id, phase
    record = e.record()
    assert record == bytes([2]) + seq.to_bytes(8, "big") + packet_id.to_bytes(2, "big") + bytes([phase]) + e.encoded
    if not (phase in (Phase.PUBLISHED, Phase.BROKER_HAS) and packet_id == 0):
        back = InboxEntry.from_record(e.name, record)
        assert (back.seq, back.packet_id, back.phase, back.encoded, back.message) == (
            seq, packet_id, phase, e.encoded, e.message)
