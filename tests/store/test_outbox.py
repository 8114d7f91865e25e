"""The outbox: group commits, due order, attempts, deletes, expiry, limits and persistence."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.store import InvalidRecord, OutboxFull, OutboxLimits, Store, StoreFull
from gateway.store.schema import DDL_V1, SCHEMA_VERSION

from .conftest import SoftStorageKey, mid

FAR = 10**13


def test_put_many_and_due_round_trip(store: Store) -> None:
    items = [(mid(i), f"dev{i % 2}", b"rec%d" % i, FAR) for i in range(10)]
    assert store.outbox.put_many(items) == 10
    due = store.outbox.due(now_ms=1, limit=100)
    assert [(e.msg_id, e.peer_device, e.record, e.expires_at_ms, e.attempts) for e in due] == [
        (m, p, r, x, 0) for m, p, r, x in items
    ]
    assert [e.msg_id for e in store.outbox.due(1, limit=3)] == [mid(0), mid(1), mid(2)]
    assert [e.msg_id for e in store.outbox.due(1, 100, peer_device="dev1")] == [mid(i) for i in range(1, 10, 2)]
    assert store.outbox.depth() == 10 and store.outbox.depth("dev0") == 5
    assert store.outbox.usage() == (10, sum(len(r) for _, _, r, _ in items))


def _count_unsealed(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The ids of the outbox rows unsealed from now on, in order."""
    unsealed: list[bytes] = []
    entry = store.outbox._entry

    def counting(*args: object) -> object:
        e = entry(*args)  # type: ignore[arg-type]
        unsealed.append(e.msg_id)
        return e

    monkeypatch.setattr(store.outbox, "_entry", counting)
    return unsealed


@pytest.mark.parametrize("by_index", [True, False], ids=["few-due", "many-due"])
def test_due_reads_at_most_a_peers_limit_and_unseals_nothing_past_it(
        store: Store, by_index: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`peer_limits` (the sender's room in a peer's window): past it, that peer's due rows are not unsealed, on
    both read paths (through the due index, and in queue order past DUE_BY_INDEX due rows)."""
    from gateway.store import outbox as outbox_module

    monkeypatch.setattr(outbox_module, "DUE_BY_INDEX", 2048 if by_index else 2)
    store.outbox.put_many([(mid(i), "slow" if i < 10 else "fast", b"r", FAR) for i in range(15)])
    unsealed = _count_unsealed(store, monkeypatch)
    due = store.outbox.due(1, limit=100, peer_limits={"slow": 3, "idle": 5})
    assert [e.msg_id for e in due] == [mid(i) for i in (0, 1, 2, *range(10, 15))]
    assert unsealed == [e.msg_id for e in due]
    assert store.outbox.due(1, limit=100, peer_limits={"slow": 0, "fast": 1}) == [store.outbox.get(mid(10))]


def test_a_slow_peer_at_the_head_of_a_long_backlog_leaves_room_for_the_others(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past DUE_BY_INDEX due rows (read in queue order), the rows of a peer past its quota neither count towards
    `limit` nor keep the other peers' rows out of the pass: each peer gets what fits in its window."""
    from gateway.store import outbox as outbox_module

    monkeypatch.setattr(outbox_module, "DUE_BY_INDEX", 2)
    rows = [(mid(i), "slow", b"r", FAR) for i in range(40)]
    rows += [(mid(100 + i), "other" if i % 2 else "third", b"r", FAR) for i in range(6)]
    store.outbox.put_many(rows)
    unsealed = _count_unsealed(store, monkeypatch)
    due = store.outbox.due(1, limit=10, peer_limits={"slow": 2, "third": 1})
    assert [e.msg_id for e in due] == [mid(0), mid(1), mid(100), mid(101), mid(103), mid(105)]
    assert unsealed == [e.msg_id for e in due]
    # `limit` still bounds the pass, counting only what is returned.
    assert [e.msg_id for e in store.outbox.due(1, limit=3, peer_limits={"slow": 1})] == [mid(0), mid(100), mid(101)]
    assert store.outbox.due(1, limit=10, peer_limits={"slow": 0, "other": 0, "third": 0}) == []


def test_put_is_idempotent_per_msg_id(store: Store) -> None:
    assert store.outbox.put(mid(1), "devA", b"first", FAR)
    assert not store.outbox.put(mid(1), "devA", b"second", FAR)
    batch = [(mid(1), "devA", b"x", FAR), (mid(2), "devA", b"y", FAR), (mid(2), "devA", b"z", FAR)]
    assert store.outbox.put_many(batch) == 1
    entry = store.outbox.get(mid(1))
    assert entry is not None and entry.record == b"first"
    assert store.outbox.usage() == (2, len(b"first") + len(b"y"))


def test_mark_attempt_counts_and_reschedules(store: Store) -> None:
    store.outbox.put_many([(mid(1), "devA", b"a", FAR), (mid(2), "devA", b"b", FAR)])
    assert store.outbox.mark_attempt(mid(1), next_due_ms=5_000) == 1
    assert store.outbox.mark_attempt(mid(1), next_due_ms=9_000) == 2
    assert [e.msg_id for e in store.outbox.due(1_000, 10)] == [mid(2)]
    assert [e.msg_id for e in store.outbox.due(9_000, 10)] == [mid(1), mid(2)]
    assert store.outbox.due(9_000, 10)[0].attempts == 2
    assert store.outbox.mark_attempt(mid(99), 1) is None
    assert store.outbox.mark_attempts([mid(1), mid(2), mid(3)], 20_000) == 2
    assert store.outbox.due(19_999, 10) == []
    assert store.outbox.reschedule_peer("devA", 0) == 2
    assert [e.attempts for e in store.outbox.due(1, 10)] == [3, 1]


def test_delete_and_delete_many(store: Store) -> None:
    store.outbox.put_many([(mid(i), "devA", b"r", FAR) for i in range(5)])
    assert store.outbox.delete(mid(0))
    assert not store.outbox.delete(mid(0))
    assert store.outbox.delete_many([mid(1), mid(2), mid(42)]) == 2
    assert [e.msg_id for e in store.outbox.due(1, 10)] == [mid(3), mid(4)]
    assert store.outbox.usage() == (2, 2)
    assert store.outbox.delete_many([]) == 0


def test_expire_returns_and_removes_expired(store: Store) -> None:
    store.outbox.put_many([(mid(1), "devA", b"old", 100), (mid(2), "devA", b"new", 1_000)])
    assert [e.msg_id for e in store.outbox.due(100, 10)] == [mid(2)]  # expired entries are never due
    expired = store.outbox.expire(now_ms=100)
    assert [(e.msg_id, e.record) for e in expired] == [(mid(1), b"old")]
    assert store.outbox.depth() == 1
    assert store.outbox.expire(100) == []


def test_total_entry_limit_refuses_whole_batch(db_path: Path, key: SoftStorageKey) -> None:
    limits = OutboxLimits(max_entries=5, max_entries_per_peer=5)
    with Store.open(db_path, key, limits=limits) as s:
        s.outbox.put_many([(mid(i), f"d{i}", b"x", FAR) for i in range(4)])
        with pytest.raises(OutboxFull) as err:
            s.outbox.put_many([(mid(10), "d9", b"x", FAR), (mid(11), "d9", b"x", FAR)])
        assert err.value.limit == "max_entries"
        assert isinstance(err.value, StoreFull)
        assert s.outbox.depth() == 4 and s.outbox.get(mid(10)) is None
        assert s.outbox.put(mid(10), "d9", b"x", FAR)  # exactly at the limit is fine


def test_per_peer_limits(db_path: Path, key: SoftStorageKey) -> None:
    limits = OutboxLimits(max_entries_per_peer=2, max_bytes_per_peer=10)
    with Store.open(db_path, key, limits=limits) as s:
        s.outbox.put_many([(mid(1), "slow", b"a", FAR), (mid(2), "slow", b"b", FAR)])
        with pytest.raises(OutboxFull) as err:
            s.outbox.put(mid(3), "slow", b"c", FAR)
        assert (err.value.limit, err.value.peer_device) == ("max_entries_per_peer", "slow")
        assert s.outbox.put(mid(4), "fast", b"0123456789", FAR)  # another peer is unaffected
        with pytest.raises(OutboxFull) as err:
            s.outbox.put(mid(5), "fast", b"!", FAR)
        assert err.value.limit == "max_bytes_per_peer"
        s.outbox.delete(mid(1))
        assert s.outbox.put(mid(3), "slow", b"c", FAR)  # room again after a delivery


def test_total_bytes_and_record_size_limits(db_path: Path, key: SoftStorageKey) -> None:
    limits = OutboxLimits(max_bytes=100, max_record_bytes=60)
    with Store.open(db_path, key, limits=limits) as s:
        with pytest.raises(OutboxFull) as err:
            s.outbox.put(mid(1), "d", b"x" * 61, FAR)
        assert err.value.limit == "max_record_bytes"
        s.outbox.put(mid(1), "d", b"x" * 60, FAR)
        with pytest.raises(OutboxFull) as err:
            s.outbox.put(mid(2), "e", b"x" * 41, FAR)
        assert err.value.limit == "max_bytes"
        assert s.outbox.usage() == (1, 60)


def test_limits_validate() -> None:
    with pytest.raises(InvalidRecord):
        OutboxLimits(max_entries=0)


def test_bad_input_rejected(store: Store) -> None:
    with pytest.raises(InvalidRecord):
        store.outbox.put(b"short", "d", b"x", FAR)
    with pytest.raises(InvalidRecord):
        store.outbox.put(mid(1), "", b"x", FAR)
    with pytest.raises(InvalidRecord):
        store.outbox.put(mid(1), "d", "text", FAR)  # type: ignore[arg-type]
    assert store.outbox.depth() == 0


def test_outbox_survives_restart(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        s.outbox.put_many([(mid(i), "devA", b"r%d" % i, FAR) for i in range(3)])
        s.outbox.mark_attempt(mid(0), 0)
        s.outbox.delete(mid(1))
    with Store.open(db_path, key) as s:
        due = s.outbox.due(1, 10)
        assert [(e.msg_id, e.record, e.attempts) for e in due] == [(mid(0), b"r0", 1), (mid(2), b"r2", 0)]
        assert s.outbox.usage() == (2, 4)


def test_usage_follows_rollbacks_purges_expiry_and_a_restart(db_path: Path, key: SoftStorageKey) -> None:
    # Usage is counted in memory (no triggers): every path that changes rows keeps it, a rollback puts it back.
    limits = OutboxLimits(max_entries_per_peer=3)
    with Store.open(db_path, key, limits=limits) as s:
        s.outbox.put_many([(mid(1), "a", b"xx", FAR), (mid(2), "b", b"yyy", 50)])
        with pytest.raises(RuntimeError), s.transaction():
            s.outbox.put_many([(mid(3), "a", b"zzzz", FAR)])
            s.outbox.delete_many([mid(1)])
            assert s.outbox.usage() == (2, 7) and s.outbox.usage("a") == (1, 4)
            raise RuntimeError("rolled back")
        assert s.outbox.usage() == (2, 5) and s.outbox.usage("a") == (1, 2) and s.outbox.get(mid(3)) is None
        with pytest.raises(OutboxFull), s.transaction():  # the limit is checked after the first put counted
            s.outbox.put_many([(mid(4), "a", b"1", FAR), (mid(5), "a", b"2", FAR)])
            s.outbox.put_many([(mid(6), "a", b"3", FAR)])
        assert s.outbox.usage("a") == (1, 2) and s.outbox.depth() == 2
        assert [e.msg_id for e in s.outbox.expire(50)] == [mid(2)]
        assert s.outbox.usage() == (1, 2) and s.outbox.usage("b") == (0, 0)
        s.outbox.put_many([(mid(7), "c", b"c", FAR), (mid(8), "c", b"cc", FAR)])
        assert s.purge_peer("c")["outbox"] == 2
        assert s.outbox.usage() == (1, 2) and s.outbox.usage("c") == (0, 0)
        s.outbox.put_many([(mid(9), "a", b"aaa", FAR), (mid(1), "a", b"known id", FAR)])  # one new, one known
        assert s.outbox.usage("a") == (2, 5)
    with Store.open(db_path, key, limits=limits) as s:  # loaded with one aggregate query at open
        assert s.outbox.usage() == (2, 5) and s.outbox.usage("a") == (2, 5)
        s.outbox.put(mid(10), "a", b"!", FAR)
        with pytest.raises(OutboxFull) as err:
            s.outbox.put(mid(11), "a", b"!", FAR)
        assert err.value.limit == "max_entries_per_peer"


def test_a_version_1_store_loses_its_usage_triggers(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        s.outbox.put_many([(mid(i), "devA", b"r%d" % i, FAR) for i in range(3)])
    conn = sqlite3.connect(db_path)  # back to version 1: its usage table and triggers
    conn.executescript(DDL_V1[DDL_V1.index("CREATE TABLE outbox_usage"):DDL_V1.index("CREATE TABLE delivered")])
    conn.execute("INSERT INTO outbox_usage (peer, n, bytes) SELECT peer, COUNT(*), SUM(size) FROM outbox GROUP BY peer")
    conn.commit()
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with Store.open(db_path, key) as s:
        assert s.outbox.usage() == (3, 6)
        s.outbox.delete(mid(0))  # (with the triggers left, their table would count it too: see below)
        assert s.outbox.usage() == (2, 4)
    conn = sqlite3.connect(db_path)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE name LIKE 'outbox_usage%'")}
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    assert names == set() and version == SCHEMA_VERSION == 6


def test_a_row_is_sealed_as_the_codec_packs_it(store: Store) -> None:
    """`put_many` builds each row's plaintext from parts: it must be the codec's `pack` of the same tuple (what
    every reader, and stores written before, expect)."""
    from gateway.store.codec import pack

    items = [(mid(1), "dev-b", b"x" * 300, FAR), (mid(2), "d\u00e9v", b"", 2**62), (mid(3), "dev-b", b"y", 0)]
    store.outbox.put_many(items, due_at_ms=5, attempts=1)
    keys = store._keys  # type: ignore[attr-defined]
    with store._db.read("test") as conn:  # type: ignore[attr-defined]
        rows = conn.execute("SELECT k, v FROM outbox ORDER BY seq").fetchall()
    for (k, blob), (m, peer, record, expires) in zip(rows, items, strict=True):
        assert keys.open("outbox", k, blob) == pack((m, peer, record, expires, 0))


@pytest.mark.parametrize("n", [1, 2, 3, 127, 128, 129, 255, 300, 511, 512, 513, 1100])
def test_batches_of_any_size_are_stored_counted_and_deleted_once(store: Store, n: int) -> None:
    """Multi-row INSERTs (128 rows, then powers of two) and IN lists padded to a power of two by repeating a
    value: every row is stored, counted and deleted exactly once, whatever the batch size."""
    items = [(mid(i), f"dev{i % 3}", b"r" * (i % 7), FAR) for i in range(n)]
    assert store.outbox.put_many(items) == n
    assert store.outbox.put_many(items[: n // 2 + 1]) == 0  # known ids: nothing new
    assert store.outbox.usage() == (n, sum(i % 7 for i in range(n)))
    assert [e.msg_id for e in store.outbox.due(1, limit=n + 10)] == [mid(i) for i in range(n)]
    ids = [mid(i) for i in range(0, n, 2)]
    assert store.outbox.mark_attempts(ids, 2) == len(ids)
    attempts = {e.msg_id: e.attempts for e in store.outbox.entries()}
    assert all(attempts[m] == 1 for m in ids) and sum(attempts.values()) == len(ids)  # (each once, padded or not)
    assert store.outbox.existing([mid(i) for i in range(n + 5)]) == {mid(i) for i in range(n)}
    assert store.outbox.delete_many(ids) == len(ids)
    assert store.outbox.delete_many(ids) == 0
    left = [mid(i) for i in range(1, n, 2)]
    assert store.outbox.usage()[0] == len(left)
    assert sorted(e.msg_id for e in store.outbox.entries()) == sorted(left)
    assert all(e.attempts == 0 for e in store.outbox.entries())


def test_in_lists_pad_to_few_statement_forms() -> None:
    from gateway.store.db import IN_CHUNK, in_lists

    forms = set()
    for n in range(1, 1200):
        chunks = list(in_lists(list(range(n))))
        assert sorted({v for _, c in chunks for v in c}) == list(range(n))
        for marks, chunk in chunks:
            assert len(chunk) <= IN_CHUNK and len(chunk) & (len(chunk) - 1) == 0 and marks.count("?") == len(chunk)
            forms.add(marks)
    assert len(forms) == 10
    assert list(in_lists([])) == []


def test_a_version_2_store_loses_its_peer_index(db_path: Path, key: SoftStorageKey) -> None:
    """Version 3 drops `outbox_by_peer`; a version 2 store (with the index) opens, is upgraded, and keeps its
    rows, usage counts and per-peer operations."""
    with Store.open(db_path, key) as s:
        s.outbox.put_many([(mid(i), f"dev{i % 2}", b"r%d" % i, FAR) for i in range(4)])
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE INDEX outbox_by_peer ON outbox (peer)")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with Store.open(db_path, key) as s:
        assert s.outbox.usage() == (4, 8) and s.outbox.usage("dev1") == (2, 4)
        assert [e.msg_id for e in s.outbox.due(1, 10, peer_device="dev1")] == [mid(1), mid(3)]
        assert s.outbox.reschedule_peer("dev0", 7) == 2
        assert s.purge_peer("dev1")["outbox"] == 2
        assert s.outbox.usage() == (2, 4)
    conn = sqlite3.connect(db_path)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'index'")}
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    assert "outbox_by_peer" not in names and {"outbox_by_due", "outbox_by_expiry"} <= names
    assert version == SCHEMA_VERSION == 6



def test_row_keys_kept_for_live_rows_only_and_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The outbox keeps the row keys of what it stored until the row leaves (the ACK's delete needs no HMAC per
    id); a kept key is the blind index, the map is bounded, and an id it does not hold is computed."""
    from gateway.store import outbox as outbox_module

    box = store.outbox
    live = box._live_keys  # type: ignore[attr-defined]
    keys = store._keys  # type: ignore[attr-defined]
    box.put_many([(mid(i), "a", b"r", FAR if i < 8 else 50) for i in range(10)])
    assert live == {mid(i): keys.blind("outbox.msg", mid(i)) for i in range(10)}
    assert box.delete_many([mid(0), mid(1), mid(99)]) == 2 and mid(0) not in live and len(live) == 8
    assert [e.msg_id for e in box.expire(100)] == [mid(8), mid(9)] and len(live) == 6
    assert box.mark_attempts([mid(2)], 5) == 1
    box.purge_peer("b")
    assert not live and box.delete_many([mid(2)]) == 1  # computed again
    monkeypatch.setattr(outbox_module, "LIVE_KEYS", 3)
    box.put_many([(mid(i), "b", b"r", FAR) for i in range(20, 30)])
    assert len(live) == 3 and box.delete_many([mid(i) for i in range(20, 30)]) == 10 and not live


def test_a_refused_or_rolled_back_batch_leaves_no_row_keys(db_path: Path, key: SoftStorageKey) -> None:
    """Keys of rows that were never stored would stay in the bounded map until a purge (with a peer at its limit,
    each refused batch adds more, until the map is full and the ACKs' deletes compute every key again)."""
    limits = OutboxLimits(max_entries=5, max_entries_per_peer=5, max_record_bytes=10)
    with Store.open(db_path, key, limits=limits) as s:
        live = s.outbox._live_keys  # type: ignore[attr-defined]
        s.outbox.put_many([(mid(i), "d", b"x", FAR) for i in range(4)])
        assert set(live) == {mid(i) for i in range(4)}
        with pytest.raises(OutboxFull):  # over max_entries: refused after the INSERT, rolled back
            s.outbox.put_many([(mid(10), "d", b"x", FAR), (mid(11), "d", b"x", FAR)])
        with pytest.raises(OutboxFull):  # a record over max_record_bytes, after a good one in the same batch
            s.outbox.put_many([(mid(12), "d", b"x", FAR), (mid(13), "d", b"x" * 11, FAR)])
        with pytest.raises(RuntimeError), s.transaction():  # stored, then the caller's transaction rolls back
            s.outbox.put_many([(mid(14), "d", b"x", FAR)])
            raise RuntimeError("later in the same transaction")
        assert set(live) == {mid(i) for i in range(4)} and s.outbox.depth() == 4


def test_a_batchs_row_keys_are_its_blind_indexes_and_each_row_has_its_own_nonce(store: Store) -> None:
    """`put_many` derives the row keys and seals for the whole batch at once: each row's key is still the blind
    index of its id (what `get`, the ACK's delete and stores written before look up) and each seal has a nonce of
    its own, in a batch longer than one block of the nonce pool and with two peers."""
    items = [(mid(i), "dev-b" if i % 3 else "dev-c", bytes([i % 251]) * (i % 40), FAR - i) for i in range(400)]
    assert store.outbox.put_many(items) == 400
    keys = store._keys  # type: ignore[attr-defined]
    with store._db.read("test") as conn:  # type: ignore[attr-defined]
        rows = conn.execute("SELECT k, peer, size, expires_at_ms, v FROM outbox ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == [keys.blind("outbox.msg", m, memo=False) for m, *_ in items]
    assert [r[1] for r in rows] == [keys.blind("outbox.peer", p) for _, p, _, _ in items]
    assert [(r[2], r[3]) for r in rows] == [(len(rec), e) for _, _, rec, e in items]
    assert len({r[4][1:13] for r in rows}) == 400
    assert store.outbox.usage("dev-c") == (134, sum(len(rec) for _, p, rec, _ in items if p == "dev-c"))
    assert [store.outbox.get(m) for m, *_ in items[:3]] == [
        (m, p, rec, e, 0, 0) for m, p, rec, e in items[:3]]


def test_message_ids_must_be_16_bytes_of_bytes(store: Store) -> None:
    class Id(bytes):
        pass

    for bad in (bytearray(16), "x" * 16, bytes(15), bytes(17), 16):
        with pytest.raises(InvalidRecord):
            store.outbox.put_many([(mid(1), "d", b"a", FAR), (bad, "d", b"b", FAR)])  # type: ignore[list-item]
    assert store.outbox.depth() == 0
    assert store.outbox.put(Id(mid(2)), "d", b"c", FAR)  # (a bytes subclass of 16 bytes, as before)
    assert store.outbox.get(mid(2)) is not None


def test_a_batch_is_sealed_one_statement_at_a_time(store: Store) -> None:
    """Issue 7: `put_many` seals each INSERT's rows (128 at most) just before it, so only one statement's
    plaintexts and sealed copies exist at once, not a whole batch's (512 messages of 256 B: ~0.45 MB of
    short-lived copies at the sender's peak, against ~0.15 MB). Every row is stored as sealed per row."""
    import tracemalloc

    from gateway.store.codec import pack

    items = [(mid(i), "dev-b", bytes([i % 251]) * 300, FAR) for i in range(512)]
    store.outbox.put_many([(mid(10_000), "dev-b", b"warm", FAR)])  # (the statement cache, the peer's key)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        assert store.outbox.put_many(items, due_at_ms=5, attempts=1) == 512
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 200_000, peak
    keys = store._keys  # type: ignore[attr-defined]
    with store._db.read("test") as conn:  # type: ignore[attr-defined]
        rows = conn.execute("SELECT k, v, due_at_ms, attempts, size FROM outbox ORDER BY seq").fetchall()[1:]
    assert len(rows) == 512
    for (k, blob, due, attempts, size), (m, peer, record, expires) in zip(rows, items, strict=True):
        assert k == keys.blind("outbox.msg", m, memo=False) and (due, attempts, size) == (5, 1, len(record))
        assert keys.open("outbox", k, blob) == pack((m, peer, record, expires, 0))
