"""Store parts of the sender's in-memory hand-over and of the broker-redelivery marks (gateway/sending.py):
outbox entries stored due later and released at start-up, the due read leaving out blocked peers, the ids still
queued, marks in buckets that survive a restart, are rolled back with their transaction and still read the
per-id marks of stores written before the buckets, and batched delivered-id marks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gateway.store import InvalidRecord, OutboxFull, OutboxLimits, Store
from gateway.store.marks import CACHED_BUCKETS, PER_BUCKET, RedeliveryMarks

from .conftest import SoftStorageKey, mid


def digest(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(4, "big")).digest()[:16]


def test_entries_stored_due_later_are_not_read_back_until_released(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        # Handed over: stored due later with its first send counted (no attempt mark when it goes from memory).
        s.outbox.put_many([(mid(1), "dev-b", b"handed over", 10_000_000)], due_at_ms=1_060_000, attempts=1)
        s.outbox.put_many([(mid(2), "dev-b", b"read back", 10_000_000)])
        assert [e.msg_id for e in s.outbox.due(1_000_000)] == [mid(2)]
        s.outbox.mark_attempts([mid(2)], 1_001_000)
        s.outbox.mark_attempts([mid(2)], 1_005_000)  # sent twice
        assert s.outbox.mark_attempts([mid(1)], 1_060_000, count=False) == 1  # rescheduled, not counted again
    with Store.open(db_path, key) as s:  # a restart: what the last run meant to send from memory is due at once
        assert s.outbox.release_unsent(1_000_100) == 1  # the one sent twice keeps its retry time
        assert [(e.msg_id, e.record, e.attempts) for e in s.outbox.due(1_000_100)] == [(mid(1), b"handed over", 1)]
        assert [e.msg_id for e in s.outbox.due(1_005_000)] == [mid(1), mid(2)]


def test_due_leaves_out_blocked_peers_and_existing_names_what_is_queued(store: Store) -> None:
    store.outbox.put_many([(mid(i), f"dev-{i % 3}", b"x", 10_000) for i in range(9)])
    got = store.outbox.due(0, limit=100, except_peers={"dev-0", "dev-2"})
    assert [e.msg_id for e in got] == [mid(1), mid(4), mid(7)]
    assert len(store.outbox.due(0, limit=100, except_peers=())) == 9
    store.outbox.delete_many([mid(4)])
    assert store.outbox.existing([mid(1), mid(4), mid(99)]) == {mid(1)}
    assert store.outbox.existing([mid(i) for i in range(1200)]) == {mid(i) for i in range(9)} - {mid(4)}


def test_redelivery_marks_survive_a_restart_and_follow_packet_id_reuse(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        marks = RedeliveryMarks(s.secrets, "mqtt-in/")
        with s.transaction():
            marks.put([(i, digest(i)) for i in range(1, 200)])
        assert marks.is_copy(5, digest(5)) and not marks.is_copy(5, digest(6)) and not marks.is_copy(300, digest(300))
        with s.transaction():
            marks.put([(5, digest(1005))])  # the broker reused packet id 5 for another message
        count = s.secrets.count()
    assert count == (199 // PER_BUCKET) + 1  # one record per bucket, not per message
    with Store.open(db_path, key) as s:
        marks = RedeliveryMarks(s.secrets, "mqtt-in/")
        assert marks.is_copy(5, digest(1005)) and not marks.is_copy(5, digest(5))
        assert marks.is_copy(199, digest(199)) and marks.is_copy(1, digest(1))
        assert not marks.is_copy(0, digest(0)) and not marks.is_copy(65535, digest(65535))


def test_marks_of_a_failed_transaction_are_forgotten(store: Store) -> None:
    store.outbox.limits = OutboxLimits(max_entries=1)
    marks = RedeliveryMarks(store.secrets, "mqtt-in/")
    with pytest.raises(OutboxFull), store.transaction():
        store.outbox.put_many([(mid(1), "dev-b", b"a", 10), (mid(2), "dev-b", b"b", 10)])
        marks.put([(7, digest(7)), (8, digest(8))])
    marks.forget()  # what sending.py does when the ingest transaction fails
    assert not marks.is_copy(7, digest(7))  # not stored, so a redelivery must be stored, not dropped


def test_per_id_marks_from_before_the_buckets_are_still_read(store: Store) -> None:
    store.secrets.put_many([("mqtt-in/9", digest(9)), ("mqtt-in/70", digest(70))])  # the previous format
    marks = RedeliveryMarks(store.secrets, "mqtt-in/")
    assert marks.is_copy(9, digest(9)) and marks.is_copy(70, digest(70)) and not marks.is_copy(9, digest(8))
    with store.transaction():
        marks.put([(9, digest(900))])  # a newer message under id 9: its bucket slot wins over the old record
    assert marks.is_copy(9, digest(900)) and not marks.is_copy(9, digest(9))
    assert RedeliveryMarks(store.secrets, "mqtt-in/").is_copy(70, digest(70))


def test_marks_refuse_bad_packet_ids_and_digests(store: Store) -> None:
    marks = RedeliveryMarks(store.secrets, "mqtt-in/")
    for bad in ((-1, digest(1)), (65536, digest(1)), (1, b"short"), (1, bytes(16))):
        with pytest.raises(InvalidRecord):
            marks.put([bad])


def test_delivered_ids_marked_in_one_statement(store: Store) -> None:
    assert store.delivered.mark_many([mid(1), mid(2)], 1_000) == 2
    assert store.delivered.mark_many([mid(2), mid(3)], 1_001) == 1
    assert store.delivered.seen_many([mid(1), mid(3), mid(4)]) == {mid(1), mid(3)}
    assert store.delivered.mark_many([], 0) == 0


def test_delivered_ids_keys_computed_once_are_the_same_keys(store: Store) -> None:
    """`keys` (the receiver computes a frame's row keys once) gives the keys `seen_many`/`mark_many` compute
    themselves: ids marked with them are found without them, and the other way round."""
    ids = [mid(n) for n in range(1, 9)]
    keys = store.delivered.keys(ids)
    assert keys == [store.delivered._k(m) for m in ids]
    assert store.delivered.mark_many(ids[:4], 1_000, keys[:4]) == 4
    assert store.delivered.seen_many(ids) == set(ids[:4])
    assert store.delivered.mark_many(ids[2:6], 1_001) == 2
    assert store.delivered.seen_many(ids, keys) == set(ids[:6])
    assert store.delivered.seen(ids[5]) and not store.delivered.seen(ids[6])
    with pytest.raises(ValueError, match="one key per message id"):
        store.delivered.mark_many(ids[:2], 1_002, keys[:1])
    with pytest.raises(ValueError, match="one key per message id"):
        store.delivered.seen_many(ids[:2], keys[:1])
    with pytest.raises(InvalidRecord):
        store.delivered.keys([b"short"])


def test_keyed_blobs_delete_many(store: Store) -> None:
    store.inbox.put_many([("a", b"1"), ("b", b"2"), ("c", b"3")])
    assert store.inbox.delete_many(["a", "c", "zz"]) == 2
    assert store.inbox.items() == [("b", b"2")]
    assert store.inbox.delete_many([]) == 0


def test_a_marks_batch_over_buckets_reads_back_and_a_bad_mark_anywhere_refuses_it(store: Store) -> None:
    marks = RedeliveryMarks(store.secrets, "mqtt-in/")
    batch = [(i, digest(i)) for i in range(60, 140)] + [(65535, bytearray(digest(65535)))]
    with store.transaction():
        marks.put(batch)  # type: ignore[arg-type]
    assert store.secrets.count() == 4  # buckets 0, 1 and 2 (ids 60-139) and 1023 (id 65535)
    again = RedeliveryMarks(store.secrets, "mqtt-in/")
    assert all(again.is_copy(i, bytes(d)) for i, d in batch)
    for bad in ((70000, digest(1)), (True, bytes(16)), (3, "x" * 16)):
        with pytest.raises((InvalidRecord, TypeError)):
            marks.put([(1, digest(1)), bad])  # type: ignore[list-item]


def test_marks_keep_a_bounded_number_of_buckets_in_memory_and_read_the_others_back(store: Store) -> None:
    """Every packet id's bucket once (1,024 buckets: what a gateway touches in 65,536 messages): the marks object
    holds at most `CACHED_BUCKETS` of them (it kept all, 1 MiB, before), and the ones it dropped are read back
    from the store, also inside the transaction that wrote them."""
    import gc
    import tracemalloc

    marks = RedeliveryMarks(store.secrets, "mqtt-in/")
    ids = [b * PER_BUCKET + b % PER_BUCKET for b in range(65536 // PER_BUCKET)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, len(ids), 128):
            with store.transaction():
                marks.put([(p, digest(p)) for p in ids[i:i + 128]])
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4 * CACHED_BUCKETS * 1024 + 64 * 1024, held  # (all 1,024 buckets: > 1 MiB)
    assert CACHED_BUCKETS * PER_BUCKET * 16 <= 64 * 1024
    assert all(marks.is_copy(p, digest(p)) for p in ids)  # the dropped ones come back from the store
    assert not marks.is_copy(ids[0], digest(ids[0] + 1))
    # One transaction that touches more buckets than are kept, then some of its first ones again: the later
    # put reads what the earlier one wrote (same connection, not yet committed) and keeps both marks.
    with store.transaction():
        marks.put([(b * PER_BUCKET + 1, digest(b * PER_BUCKET + 1)) for b in range(3 * CACHED_BUCKETS)])
        marks.put([(b * PER_BUCKET + 2, digest(b * PER_BUCKET + 2)) for b in range(8)])
    again = RedeliveryMarks(store.secrets, "mqtt-in/")
    for b in range(3 * CACHED_BUCKETS):
        assert again.is_copy(b * PER_BUCKET + 1, digest(b * PER_BUCKET + 1))
        assert again.is_copy(ids[b], digest(ids[b]))
    assert all(again.is_copy(b * PER_BUCKET + 2, digest(b * PER_BUCKET + 2)) for b in range(8))
