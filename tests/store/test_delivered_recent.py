"""The delivered ids in three tables (schema version 6, `gateway/store/records.py` `DeliveredIds`): new ids wait in
`delivered_recent` (rowid order, their keys also in a set in memory), are folded into `delivered_mid` in key
order, and move from there into `delivered` by merge steps of a key range each.

Promised, whatever table an id sits in: an id recorded once is found (and marking it again says "duplicate")
until it is pruned, across restarts, rollbacks and a kill -9 at any moment, including in the middle of a fold or
a merge step; an id is in exactly one of the tables; no plaintext id is on disk; version 4 and 5 stores keep
their ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.receiving import Receiving
from gateway.store import Store, StoreError, StoreFull
from gateway.store.records import DeliveredIds
from gateway.store.schema import SCHEMA_VERSION

from .conftest import SoftStorageKey, mid

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[2]
ALL = "SELECT k FROM delivered UNION ALL SELECT k FROM delivered_mid UNION ALL SELECT k FROM delivered_recent"


def _rows(s: Store, table: str) -> int:
    with s._db.read("test") as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def _in_two(conn: sqlite3.Connection) -> int:
    """Ids in more than one of the tables (never: each is moved by one transaction that inserts and deletes)."""
    return int(conn.execute(f"SELECT COUNT(*) FROM (SELECT k FROM ({ALL}) GROUP BY k HAVING COUNT(*) > 1)"
                            ).fetchone()[0])


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fold thresholds small enough for a test."""
    monkeypatch.setattr(DeliveredIds, "FOLD_AT", 8)
    monkeypatch.setattr(DeliveredIds, "RECENT_MAX", 12)
    monkeypatch.setattr(DeliveredIds, "MID_MAX", 40)
    monkeypatch.setattr(DeliveredIds, "MERGE_SLICE", 10)


def test_new_ids_wait_in_the_recent_table_and_are_duplicates_there(store: Store) -> None:
    ids = [mid(n) for n in range(10)]
    assert store.delivered.mark_many(ids[:6], 1_000) == 6
    assert store.mark_delivered(ids[6], 1_001)
    assert _rows(store, "delivered_recent") == 7 and _rows(store, "delivered") == 0
    assert store.delivered.seen_many(ids) == set(ids[:7])
    assert store.delivered.seen(ids[3]) and not store.delivered.seen(ids[7])
    assert not store.mark_delivered(ids[3], 1_002)
    assert store.delivered.mark_many([ids[5], ids[7], ids[7], ids[8]], 1_003) == 2  # twice in a batch: once
    assert store.delivered.count() == 9 and _rows(store, "delivered_recent") == 9


def test_a_fold_moves_every_id_into_delivered_mid_with_its_time(store: Store) -> None:
    ids = [os.urandom(16) for _ in range(300)]
    store.delivered.mark_many(ids[:100], 1_000)
    store.delivered.mark_many(ids[100:], 5_000)
    assert store.delivered.fold() == 300
    assert _rows(store, "delivered_recent") == 0 and _rows(store, "delivered_mid") == 300
    assert _rows(store, "delivered") == 0
    assert store.delivered.seen_many(ids) == set(ids)
    assert store.delivered.mark_many(ids[::7], 9_000) == 0
    assert store.delivered.fold() == 0
    assert store.prune_delivered(older_than_ms=2_000) == 100  # the times came along
    assert store.delivered.seen_many(ids) == set(ids[100:])


def test_the_recent_ids_are_read_back_at_open(db_path: Path, key: SoftStorageKey) -> None:
    """Without the set read back, a restart would forget the ids not yet folded: a redelivery would go through."""
    with Store.open(db_path, key) as s:
        s.delivered.mark_many([mid(1), mid(2)], 1_000)
        s.delivered.fold()
        s.delivered.mark_many([mid(3), mid(4)], 2_000)
    with Store.open(db_path, key) as s:
        assert s.delivered.seen_many([mid(n) for n in range(1, 6)]) == {mid(1), mid(2), mid(3), mid(4)}
        assert not s.mark_delivered(mid(3), 3_000) and not s.mark_delivered(mid(1), 3_000)
        assert s.delivered.mark_many([mid(4), mid(5)], 3_000) == 1


def test_fold_due_and_the_bound_of_the_recent_set(store: Store, small: None) -> None:
    """The receiver folds once FOLD_AT ids wait; a write that would go past RECENT_MAX folds them first, so the
    set in memory never holds more than RECENT_MAX (or one larger batch)."""
    store.delivered.mark_many([mid(n) for n in range(7)], 1)
    assert not store.delivered.fold_due
    store.delivered.mark(mid(7), 1)
    assert store.delivered.fold_due
    store.delivered.mark_many([mid(n) for n in range(8, 12)], 1)
    assert _rows(store, "delivered_recent") == 12 and _rows(store, "delivered") == 0
    store.delivered.mark_many([mid(12), mid(13)], 1)  # 14 > 12: the 12 folded inside this write, then these two
    assert _rows(store, "delivered_recent") == 2 and _rows(store, "delivered_mid") == 12
    assert not store.delivered.fold_due and len(store.delivered._recent) == 2
    assert store.delivered.seen_many([mid(n) for n in range(15)]) == {mid(n) for n in range(14)}
    store.delivered.mark_many([mid(n) for n in range(100, 120)], 1)  # a batch larger than the bound: alone
    assert len(store.delivered._recent) == 20 and _rows(store, "delivered_mid") == 14


def test_a_rolled_back_mark_is_forgotten_and_a_rolled_back_fold_is_undone(store: Store) -> None:
    store.delivered.mark_many([mid(1), mid(2)], 1)
    with pytest.raises(RuntimeError), store.transaction():
        store.delivered.mark_many([mid(3), mid(4)], 2)
        assert store.delivered.seen(mid(3))
        raise RuntimeError("rolled back")
    assert store.delivered.seen_many([mid(n) for n in range(1, 5)]) == {mid(1), mid(2)}
    assert store.mark_delivered(mid(3), 3)  # new again: neither the table nor the set kept it
    with pytest.raises(RuntimeError), store.transaction():
        store.delivered.mark(mid(5), 4)
        store.delivered.fold()
        store.delivered.mark(mid(6), 4)
        raise RuntimeError("rolled back")
    assert _rows(store, "delivered_mid") == 0 and _rows(store, "delivered_recent") == 3
    assert store.delivered._recent == {store.delivered._k(mid(n)) for n in (1, 2, 3)}
    assert store.delivered.seen_many([mid(n) for n in range(1, 7)]) == {mid(1), mid(2), mid(3)}
    assert not store.mark_delivered(mid(2), 5) and store.mark_delivered(mid(5), 5)


def test_a_failed_fold_leaves_every_id_where_it_was(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.delivered.mark_many([mid(1), mid(2)], 1)
    real = store._db.write

    def full(action: str, *, durable: bool = True):  # type: ignore[no-untyped-def]
        if action.startswith("folding"):
            raise StoreFull("test: the disk is full")
        return real(action, durable=durable)

    monkeypatch.setattr(store._db, "write", full)
    with pytest.raises(StoreFull):
        store.delivered.fold()
    monkeypatch.undo()
    assert store.delivered.seen_many([mid(1), mid(2), mid(3)]) == {mid(1), mid(2)}
    assert store.delivered.fold() == 2


def test_a_lookup_then_a_mark_looks_in_delivered_once_unless_a_fold_came_between(store: Store) -> None:
    """`mark_many` after `seen_many` trusts that lookup for `delivered` (the receiver's frame: no second query)
    only while nothing was folded in since: an id folded in between is still a duplicate."""
    statements: list[str] = []
    with store._db.read("test") as conn:
        conn.set_trace_callback(statements.append)
    try:
        ids = [mid(n) for n in range(20, 30)]
        keys = store.delivered.keys(ids)
        assert store.delivered.seen_many(ids, keys) == set()
        statements.clear()
        assert store.delivered.mark_many(ids, 1, keys) == 10
        assert not [s for s in statements if "FROM delivered " in s]
        # The same lookup, then the id marked and folded by another path, then the mark: a duplicate.
        assert store.delivered.seen_many([mid(40)]) == set()
        store.delivered.mark(mid(40), 2)
        store.delivered.fold()
        assert store.delivered.mark_many([mid(40), mid(41)], 3) == 1
        assert store.delivered.count() == 12
    finally:
        with store._db.read("test") as conn:
            conn.set_trace_callback(None)


def test_a_lookup_inside_a_rolled_back_prune_is_not_trusted_after_it(store: Store) -> None:
    store.delivered.mark(mid(1), 1)
    store.delivered.fold()
    with pytest.raises(RuntimeError), store.transaction():
        assert store.prune_delivered(older_than_ms=2) == 1
        assert store.delivered.seen_many([mid(1)]) == set()  # (inside the prune's transaction)
        raise RuntimeError("rolled back")
    assert not store.mark_delivered(mid(1), 3)
    with store._db.read("test") as conn:
        assert _in_two(conn) == 0


def test_pruning_covers_the_recent_table_and_its_set(store: Store) -> None:
    store.delivered.mark_many([mid(1), mid(2)], 1_000)
    store.delivered.fold()
    store.delivered.mark_many([mid(3), mid(4)], 1_000)
    store.delivered.mark_many([mid(5)], 5_000)
    assert store.prune_delivered(older_than_ms=2_000) == 4
    assert store.delivered.seen_many([mid(n) for n in range(1, 6)]) == {mid(5)}
    assert store.mark_delivered(mid(3), 6_000)  # forgotten after pruning, from the set too
    store.delivered.mark_many([mid(6), mid(7)], 1_000)
    pruned = sum(store.delivered.prune_slice(2_000, i) for i in range(store.delivered.PRUNE_SLICES))
    assert pruned == 2 and store.delivered.seen_many([mid(n) for n in range(1, 8)]) == {mid(3), mid(5)}
    assert store.delivered.count() == 2


def test_a_rolled_back_prune_of_the_recent_table_keeps_its_ids(store: Store) -> None:
    store.delivered.mark_many([mid(1), mid(2)], 1_000)
    with pytest.raises(RuntimeError), store.transaction():
        assert store.prune_delivered(older_than_ms=2_000) == 2
        raise RuntimeError("rolled back")
    assert store.delivered.seen_many([mid(1), mid(2)]) == {mid(1), mid(2)}
    assert not store.mark_delivered(mid(1), 3_000)


def test_no_plaintext_id_in_either_table(db_path: Path, key: SoftStorageKey) -> None:
    marker = [b"PLAINID-%08d" % n for n in range(40)]
    with Store.open(db_path, key) as s:
        s.delivered.mark_many(marker[:20], 1)
        s.delivered.fold()
        s.delivered.mark_many(marker[20:], 1)
        for p in (db_path, Path(f"{db_path}-wal")):
            assert b"PLAINID-" not in p.read_bytes(), p.name
        with s._db.read("test") as conn:
            keys = [bytes(r[0]) for r in conn.execute(ALL)]
        assert sorted(keys) == sorted(s.delivered.keys(marker))  # the blind keys, 16 bytes each
    for p in db_path.parent.iterdir():
        assert b"PLAINID-" not in p.read_bytes(), p.name


def _copied(tmp_path: Path, name: str) -> tuple[Path, SoftStorageKey]:
    """A store file of tests/store/data (written by an older agw, tests/store/data/README.md) to open, and its key."""
    path = tmp_path / "agw.db"
    path.write_bytes((DATA / name).read_bytes())
    return path, SoftStorageKey(kek=b"\x11" * 32)


def _assert_version_6_with_each_id_once(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert _in_two(conn) == 0
    finally:
        conn.close()


def test_a_version_4_store_keeps_its_ids_in_delivered_and_gains_the_new_tables(tmp_path: Path) -> None:
    """tests/store/data/store-v4.db was written by the code of schema version 4 (tests/store/data/README.md)."""
    path, key = _copied(tmp_path, "store-v4.db")
    upgrades: list[tuple[int, int]] = []
    with Store.open(path, key, on_upgrade=lambda a, b: upgrades.append((a, b))) as s:
        assert upgrades == [(4, 6)]
        assert s.delivered.count() == 305 and _rows(s, "delivered_recent") == 0
        assert s.delivered.seen_many([mid(n) for n in (1, 5, 100, 399, 400)]) == {mid(1), mid(5), mid(100), mid(399)}
        assert not s.mark_delivered(mid(3), 9_000) and not s.delivered.mark_many([mid(200), mid(300)], 9_000)
        assert s.mark_delivered(mid(6), 9_000) and _rows(s, "delivered_recent") == 1
        assert s.inbox.get("dev-a/" + mid(9).hex()) == b"an inbox record"
    _assert_version_6_with_each_id_once(path)
    with Store.open(path, key) as s:  # and across a restart: the old ids in delivered, the new one in the set
        assert s.delivered.seen_many([mid(n) for n in (1, 6, 7, 399)]) == {mid(1), mid(6), mid(399)}
        assert s.delivered.fold() == 1 and s.delivered.count() == 306
        assert s.prune_delivered(older_than_ms=2_500) == 2


@pytest.mark.parametrize("table", ["delivered_recent", "delivered_mid"])  # (since versions 5 and 6)
def test_a_store_without_one_of_its_delivered_tables_is_refused(db_path: Path, key: SoftStorageKey,
                                                                  table: str) -> None:
    from gateway.store import StoreCorrupt

    with Store.open(db_path, key):
        pass
    conn = sqlite3.connect(db_path)
    conn.execute(f"DROP TABLE {table}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreCorrupt, match=table):
        Store.open(db_path, key)


def test_a_version_5_store_keeps_its_ids_in_both_tables_and_gains_delivered_mid(tmp_path: Path) -> None:
    """tests/store/data/store-v5.db was written by the code of schema version 5 (tests/store/data/README.md): 305
    ids in `delivered`, 20 waiting in `delivered_recent`."""
    path, key = _copied(tmp_path, "store-v5.db")
    upgrades: list[tuple[int, int]] = []
    with Store.open(path, key, on_upgrade=lambda a, b: upgrades.append((a, b))) as s:
        assert upgrades == [(5, 6)]
        assert s.delivered.count() == 325 and _rows(s, "delivered_recent") == 20 and _rows(s, "delivered_mid") == 0
        assert s.delivered.seen_many([mid(n) for n in (1, 100, 400, 505, 520)]) == {mid(1), mid(100), mid(505)}
        assert not s.mark_delivered(mid(3), 9_000) and not s.delivered.mark_many([mid(300), mid(519)], 9_000)
        assert s.mark_delivered(mid(6), 9_000) and _rows(s, "delivered_recent") == 21
        assert s.inbox.get("dev-a/" + mid(9).hex()) == b"an inbox record"
    _assert_version_6_with_each_id_once(path)
    with Store.open(path, key) as s:  # and across a restart: the recent ids read back, then folded into the new table
        assert s.delivered.seen_many([mid(n) for n in (1, 6, 7, 510)]) == {mid(1), mid(6), mid(510)}
        assert s.delivered.fold() == 21 and _rows(s, "delivered_mid") == 21 and s.delivered.count() == 326
        assert not s.mark_delivered(mid(510), 9_500) and not s.mark_delivered(mid(6), 9_500)
        assert s.prune_delivered(older_than_ms=55_000) == 306  # mid(1..6), mid(100..399): their times came along
        assert s.delivered.seen_many([mid(n) for n in (1, 6, 399, 500, 519)]) == {mid(500), mid(519)}


def _ids_where(s: Store, test: Callable[[bytes], bool], n: int = 8) -> list[bytes]:
    """`n` new ids whose blind keys pass `test`."""
    out: list[bytes] = []
    while len(out) < n:
        m = os.urandom(16)
        if test(s.delivered.keys([m])[0]):
            out.append(m)
    return out


def _mark_and_fold(s: Store, ids: list[bytes], at: int = 1) -> None:
    s.delivered.mark_many(ids, at)
    s.delivered.fold()


def test_delivered_mid_goes_into_delivered_by_merge_steps_of_a_key_range_each(store: Store, small: None) -> None:
    """Once `delivered_mid` holds MID_MAX ids, each `fold` is one merge step: the next MERGE_SLICE ids in key order
    into `delivered`, in a transaction of its own; the round ends with the rest. No step moves more, and a fold
    of the recent ids never writes `delivered` (the stall of version 5's fold grew with it)."""
    ids = [os.urandom(16) for _ in range(40)]
    for i in range(0, 40, 8):
        _mark_and_fold(store, ids[i:i + 8])
        assert _rows(store, "delivered") == 0
    assert _rows(store, "delivered_mid") == 40 and store.delivered.fold_due  # MID_MAX: a round is under way
    mid_keys = sorted(store.delivered.keys(ids))
    for step in range(3):
        assert store.delivered.fold() == 10 and store.delivered.fold_due
        with store._db.read("test") as conn:
            moved = sorted(bytes(r[0]) for r in conn.execute("SELECT k FROM delivered"))
        assert moved == mid_keys[:10 * (step + 1)]  # the lowest keys first, a slice at a time
        assert store.delivered.seen_many(ids) == set(ids)
    # 8 new ids, all above the round's position (FOLD_AT: due): the recent ids are folded first, then the round
    # goes on with them, its next step twice the ids marked since the last (16 > MERGE_SLICE: a step per frame
    # keeps ahead of frames of any size), then the rest.
    more = _ids_where(store, lambda k: k > mid_keys[30])  # (the position: the 31st key)
    store.delivered.mark_many(more, 2)
    assert store.delivered.fold() == 8 and _rows(store, "delivered_mid") == 18 and _rows(store, "delivered") == 30
    assert store.delivered.fold() == 16 and store.delivered.fold() == 2
    assert not store.delivered.fold_due and _rows(store, "delivered_mid") == 0 and _rows(store, "delivered") == 48
    ids += more
    assert store.delivered.seen_many(ids) == set(ids) and store.delivered.mark_many(ids, 3) == 0
    assert store.delivered.fold() == 0  # (nothing due: an explicit fold of an empty recent table)


def test_a_round_restarts_at_open_and_new_ids_below_its_position_wait_for_the_next(
    db_path: Path, key: SoftStorageKey, small: None
) -> None:
    ids = [os.urandom(16) for _ in range(56)]
    with Store.open(db_path, key) as s:
        for i in range(0, 40, 8):
            _mark_and_fold(s, ids[i:i + 8])
        assert s.delivered.fold() == 10
        for i in range(40, 56, 8):  # (the round's position is past the lowest key; 46 left in delivered_mid)
            _mark_and_fold(s, ids[i:i + 8])
        assert _rows(s, "delivered_mid") == 46
    with Store.open(db_path, key) as s:  # the position was in memory only: from the lowest key again
        assert s.delivered.fold_due and s.delivered.fold() == 10
        with s._db.read("test") as conn:
            moved = sorted(bytes(r[0]) for r in conn.execute("SELECT k FROM delivered"))
        assert moved == sorted(s.delivered.keys(ids))[:20]  # the first 10 before, and the 10 lowest of the rest
        low = _ids_where(s, lambda k: k < moved[0])
        _mark_and_fold(s, low)  # (folded into delivered_mid below the round's position: they wait for the next)
        while s.delivered.fold_due:
            s.delivered.fold()
        assert _rows(s, "delivered") == 56 and _rows(s, "delivered_mid") == 8
        assert s.delivered.seen_many(ids + low) == set(ids + low)


def test_a_rolled_back_merge_step_is_undone_and_done_again(store: Store, small: None) -> None:
    ids = [os.urandom(16) for _ in range(40)]
    for i in range(0, 40, 8):
        _mark_and_fold(store, ids[i:i + 8])
    assert store.delivered.fold() == 10
    with pytest.raises(RuntimeError), store.transaction():
        assert store.delivered.fold() == 10
        assert store.delivered.seen_many([]) == set()
        raise RuntimeError("rolled back")
    assert _rows(store, "delivered") == 10 and _rows(store, "delivered_mid") == 30
    assert store.delivered.seen_many(ids) == set(ids) and store.delivered.mark_many(ids, 2) == 0
    with store._db.read("test") as conn:
        before = {bytes(r[0]) for r in conn.execute("SELECT k FROM delivered")}
    assert store.delivered.fold() == 10  # the same slice again, not the one after it
    with store._db.read("test") as conn:
        moved = sorted({bytes(r[0]) for r in conn.execute("SELECT k FROM delivered")} - before)
    assert moved == sorted(store.delivered.keys(ids))[10:20]
    while store.delivered.fold_due:
        store.delivered.fold()
    assert _rows(store, "delivered") == 40 and _rows(store, "delivered_mid") == 0
    with pytest.raises(RuntimeError), store.transaction():  # a rolled-back start of a round: no round
        store.delivered.mark_many([os.urandom(16) for _ in range(40)], 3)
        store.delivered.fold()
        assert store.delivered.fold_due
        raise RuntimeError("rolled back")
    assert not store.delivered.fold_due and _rows(store, "delivered_mid") == 0


def test_a_lookup_then_a_mark_with_a_merge_step_between_looks_again(store: Store, small: None) -> None:
    """`mark_many` trusts `seen_many`'s look in the stored tables only while no fold or merge step came between.
    (Defensive for the merge step: an id it moves was in `delivered_mid` at the look, or came there by a fold,
    which ends the trust itself; here the id is put there behind the store's back.)"""
    ids = [os.urandom(16) for _ in range(40)]
    for i in range(0, 40, 8):
        _mark_and_fold(store, ids[i:i + 8])
    x = os.urandom(16)
    assert store.delivered.seen_many([x]) == set()
    with store._db.write("test") as conn:
        conn.execute("INSERT INTO delivered_mid (k, at_ms) VALUES (?, 2)", (store.delivered._k(x),))
    assert store.delivered.fold() == 10  # a merge step between the lookup and the mark
    assert store.delivered.mark_many([x], 3) == 0


def test_pruning_and_lookups_cover_delivered_mid(store: Store, small: None) -> None:
    store.delivered.mark_many([mid(1), mid(2)], 1_000)
    store.delivered.fold()
    assert _rows(store, "delivered_mid") == 2
    assert store.delivered.seen(mid(1)) and not store.mark_delivered(mid(2), 1_500)
    assert store.delivered.count() == 2 and store.prune_delivered(older_than_ms=2_000) == 2
    assert not store.delivered.seen(mid(1)) and store.delivered.count() == 0
    store.delivered.mark_many([mid(3), mid(4)], 1_000)
    store.delivered.fold()
    pruned = sum(store.delivered.prune_slice(2_000, i) for i in range(store.delivered.PRUNE_SLICES))
    assert pruned == 2 and _rows(store, "delivered_mid") == 0


def test_a_copy_of_the_files_at_any_statement_of_a_fold_has_every_id_in_one_table(
    db_path: Path, key: SoftStorageKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files as a kill -9 would leave them after each statement of a fold, of merge steps (the round's first
    and its last) and of the marks around them: each copy opens with every committed id found, none in two
    tables."""
    for name, value in (("FOLD_AT", 150), ("RECENT_MAX", 400), ("MID_MAX", 2000), ("MERGE_SLICE", 1400)):
        monkeypatch.setattr(DeliveredIds, name, value)
    committed: list[bytes] = []
    copies: list[tuple[Path, int]] = []
    with Store.open(db_path, key) as s:
        s.delivered.mark_many([os.urandom(16) for _ in range(3000)], 1)
        s.delivered.fold()
        assert _rows(s, "delivered_mid") == 3000 and s.delivered.fold_due  # (a round of merge steps is due)
        with s._db.read("test") as conn:
            committed.extend(bytes(r[0]) for r in conn.execute(ALL))

        def copy(_sql: str) -> None:
            to = tmp_path / f"copy{len(copies)}" / "agw.db"
            to.parent.mkdir()
            for suffix in ("", "-wal"):
                if Path(f"{db_path}{suffix}").exists():
                    shutil.copyfile(f"{db_path}{suffix}", f"{to}{suffix}")
            copies.append((to, len(committed)))

        new = [os.urandom(16) for _ in range(300)]
        with s._db.read("test") as conn:
            conn.set_trace_callback(copy)
        try:
            s.delivered.mark_many(new[:200], 2)
            committed.extend(s.delivered.keys(new[:200]))
            assert s.delivered.fold() == 200  # the recent ids first (200 >= FOLD_AT), into delivered_mid
            assert s.delivered.fold() == 1400  # a merge step: 1,400 of delivered_mid's 3,200 into delivered
            s.delivered.mark_many(new[200:], 3)
            committed.extend(s.delivered.keys(new[200:]))
            assert s.delivered.fold() == 1400 and s.delivered.fold() == 400  # the round's last step: the rest
            assert not s.delivered.fold_due
        finally:
            with s._db.read("test") as conn:
                conn.set_trace_callback(None)
        assert _rows(s, "delivered") == 3200 and _rows(s, "delivered_mid") == 0
    assert len(copies) >= 20
    for path, n in copies:
        conn = sqlite3.connect(path)
        try:
            keys = {bytes(r[0]) for r in conn.execute(ALL)}
            both = _in_two(conn)
        finally:
            conn.close()
        assert both == 0, path
        # Committed before this copy: found. (A statement's copy is taken before it runs, so the last mark's
        # ids may or may not be in it; every one before must be.)
        assert set(committed[:n]) <= keys, path
        with Store.open(path, key) as other:  # and the store opens, its set read back
            assert other.delivered.count() == len(keys)


_CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[3])
    from gateway.store import Store
    from gateway.store.records import DeliveredIds
    from tests.store.conftest import SoftStorageKey
    DeliveredIds.FOLD_AT, DeliveredIds.RECENT_MAX = 300, 400
    DeliveredIds.MID_MAX, DeliveredIds.MERGE_SLICE = 1000, 150
    s = Store.open(sys.argv[1], SoftStorageKey(kek=bytes.fromhex(sys.argv[2])))
    n = 0
    while True:
        ids = [os.urandom(16) for _ in range(37)]
        with s.transaction():
            s.delivered.mark_many(ids, n)
        sys.stdout.write("".join(i.hex() + "\\n" for i in ids))  # after the durable commit
        sys.stdout.flush()
        if s.delivered.fold_due:
            s.delivered.fold()
        n += 1
""")


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.15])
def test_kill_9_at_any_moment_loses_no_recorded_id(tmp_path: Path, delay: float) -> None:
    """A process marking ids (fsync'd commits, as the receiver's inbox commit), folding them and merging them
    (not fsync'd), killed with SIGKILL: every id it reported committed is found after a restart, none is in two
    tables. The kill comes `delay` after it reported 1,500 ids (several folds and the first merge steps are
    behind it by then, however slow the machine; a fixed time alone was too short on a loaded one)."""
    path = tmp_path / "agw.db"
    kek = os.urandom(32)
    Store.open(path, SoftStorageKey(kek=kek)).close()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), kek.hex(), str(ROOT)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[bytes] = []
    try:
        assert child.stdout is not None
        while len(lines) < 1500:
            line = child.stdout.readline()
            if not line:
                break  # (it died: the assertions below say how)
            lines.append(line)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, err.decode()
    reported = [bytes.fromhex(line) for line in (b"".join(lines) + out).decode().split("\n") if len(line) == 32]
    assert len(reported) > 300, err.decode()  # at least one fold happened
    with Store.open(path, SoftStorageKey(kek=kek)) as s:
        assert s.delivered.seen_many(reported) == set(reported)
        assert s.delivered.count() >= len(reported)
        with s._db.read("test") as conn:
            assert _in_two(conn) == 0
        assert _rows(s, "delivered") > 0, len(reported)  # merge steps happened


def test_the_receiver_folds_between_frames_and_a_failed_fold_only_waits(caplog: pytest.LogCaptureFixture) -> None:
    class FailingDelivered:
        fold_due = True
        calls = 0

        def fold(self) -> int:
            self.calls += 1
            raise StoreError("test: cannot write")

    class Rx:
        store = type("S", (), {"delivered": FailingDelivered()})()
        _fold_after = 0.0

    import time

    from gateway.receiving import FOLD_RETRY_S

    rx = Rx()
    Receiving._fold_delivered(rx)  # type: ignore[arg-type]
    assert rx.store.delivered.calls == 1
    assert "cannot fold the recent delivered ids" in caplog.text
    assert rx._fold_after > time.monotonic() + FOLD_RETRY_S - 5  # the next try waits (review finding L2)


async def test_the_receiver_folds_before_a_frame_not_inside_its_commits() -> None:
    """`_on_delivered` folds when due, in a transaction of its own before the frame's (decrypt, inbox): the
    fold's page writes never sit in a frame's fsync'd inbox commit; not due, no fold."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    order: list[str] = []

    @contextmanager
    def transaction(*, durable: bool = True):  # type: ignore[no-untyped-def]
        order.append("frame transaction")
        yield

    def fold() -> int:
        order.append("fold")
        return 0

    async def send_acks(acks: object) -> None:
        order.append("acks")

    delivered = SimpleNamespace(fold_due=True, fold=fold, keys=lambda ids: [], seen_many=lambda ids, keys: set())
    rx = SimpleNamespace(store=SimpleNamespace(delivered=delivered, transaction=transaction),
                         book=SimpleNamespace(flush=lambda: None), _open=lambda e: [], _send_acks=send_acks,
                         _fold_after=0.0)
    rx._fold_delivered = lambda: Receiving._fold_delivered(rx)  # type: ignore[arg-type]
    rx._open_slice = lambda *a: Receiving._open_slice(rx, *a)  # type: ignore[arg-type]
    rx._on_slice = lambda *a: Receiving._on_slice(rx, *a)  # type: ignore[arg-type]
    await Receiving._on_delivered(rx, ())  # type: ignore[arg-type]
    assert order == ["fold", "frame transaction", "acks"]
    assert rx._folded_at > time.monotonic() - 5  # (the maintenance tick leaves the steps to it: `_fold_idle`)
    order.clear()
    delivered.fold_due = False
    await Receiving._on_delivered(rx, ())  # type: ignore[arg-type]
    assert order == ["frame transaction", "acks"]
    order.clear()

    def failing_fold() -> int:  # (e.g. the store at its size cap: a fold inserts before it deletes)
        order.append("failed fold")
        raise StoreError("test: the store is full")

    delivered.fold_due, delivered.fold = True, failing_fold
    for _ in range(3):  # a failed fold is not tried again on each frame (review finding L2: a warning per frame)
        await Receiving._on_delivered(rx, ())  # type: ignore[arg-type]
    assert order == ["failed fold"] + ["frame transaction", "acks"] * 3


def _gateway(store: Any, tmp_path: Path) -> Any:
    """A `Gateway` with only what its maintenance loop needs: the store, a state directory, no status."""
    from gateway.daemon import Gateway

    gw = Gateway(SimpleNamespace(paths=SimpleNamespace(state_dir=tmp_path)))  # type: ignore[arg-type]
    gw.store = store
    gw.status = lambda: {}  # type: ignore[method-assign]
    return gw


def _keys_in(s: Store, table: str) -> set[bytes]:
    with s._db.read("test") as conn:
        return {bytes(r[0]) for r in conn.execute(f"SELECT k FROM {table}")}


async def test_the_maintenance_tick_moves_on_the_ids_nobody_else_folds(store: Store, small: None,
                                                                      tmp_path: Path) -> None:
    """The group service marks ids too (SDK group sends, one `mark` per message inside its batch's transaction)
    and never folds: the store's bound folds them into `delivered_mid`, a round of merge steps starts there, and
    before the daemon's maintenance tick made steps nobody finished it (`delivered_mid` kept growing). Now the
    tick makes them: every id that was in `delivered_mid` reaches `delivered`, each id in exactly one table at
    every moment, and a duplicate is found wherever it sits during the move."""
    ids = [os.urandom(16) for _ in range(60)]
    for i, m in enumerate(ids):  # (as `GroupKeys._take`: a durable transaction per batch, here one id each)
        with store.transaction():
            assert store.delivered.mark(m, 1_000 + i)
    assert _rows(store, "delivered") == 0 and _rows(store, "delivered_mid") >= DeliveredIds.MID_MAX
    assert store.delivered.fold_due  # a round is under way, and nobody makes its steps
    waiting = _keys_in(store, "delivered_mid")
    gw = _gateway(store, tmp_path)
    task = asyncio.create_task(gw._maintenance_loop(), name="maintenance")
    try:
        for _ in range(800):  # (a tick a second, FOLD_TICK_STEPS steps each: a few seconds at most)
            await asyncio.sleep(0.01)
            with store._db.read("test") as conn:
                assert _in_two(conn) == 0
            assert store.delivered.seen_many(ids) == set(ids)
            assert store.delivered.mark_many(ids[:5], 9_999) == 0  # (duplicates, wherever they sit)
            if waiting <= _keys_in(store, "delivered"):
                break
        else:
            pytest.fail(f"{len(waiting - _keys_in(store, 'delivered'))} ids left in delivered_mid")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # (a tick loop that had died would raise here)
    assert store.delivered.count() == 60 and not store.delivered.fold_due


async def test_the_tick_leaves_the_steps_to_a_busy_receiver_and_makes_a_few_per_tick() -> None:
    """While the receiver makes steps (one per frame), the tick makes none; once it has made none for
    FOLD_IDLE_S the tick makes at most FOLD_TICK_STEPS, each in a turn of the event loop of its own."""
    from gateway.receiving import FOLD_IDLE_S, FOLD_TICK_STEPS

    order: list[str] = []

    def fold() -> int:
        order.append("step")
        return 1

    rx = SimpleNamespace(store=SimpleNamespace(delivered=SimpleNamespace(fold_due=True, fold=fold)),
                         _fold_after=0.0, _folded_at=time.monotonic())
    rx._fold_delivered = lambda: Receiving._fold_delivered(rx)  # type: ignore[arg-type]
    assert await Receiving._fold_idle(rx) == 0 and order == []  # type: ignore[arg-type]
    rx._folded_at = time.monotonic() - FOLD_IDLE_S

    async def other() -> None:
        for _ in range(FOLD_TICK_STEPS):
            order.append("other")
            await asyncio.sleep(0)

    other_task = asyncio.create_task(other())
    assert await Receiving._fold_idle(rx) == FOLD_TICK_STEPS  # type: ignore[arg-type]
    await other_task
    assert order.count("step") == FOLD_TICK_STEPS
    assert "step" not in {order[i] for i in range(len(order) - 1) if order[i + 1] == "step"}  # never two in a turn
    order.clear()
    rx.store.delivered.fold_due = False
    assert await Receiving._fold_idle(rx) == 0 and order == []  # type: ignore[arg-type]


async def test_a_store_error_in_a_tick_step_is_logged_and_the_daemon_goes_on(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture
                                                                              ) -> None:
    """A step the tick makes fails as the receiver's do (e.g. the store at its size cap): one warning, the next
    try after FOLD_RETRY_S, and the maintenance loop (hence the daemon) keeps running."""
    class FailingDelivered:
        fold_due = True
        calls = 0

        def fold(self) -> int:
            self.calls += 1
            raise StoreFull("test: the store is full")

    delivered = FailingDelivered()
    gw = _gateway(SimpleNamespace(delivered=delivered), tmp_path)
    task = asyncio.create_task(gw._maintenance_loop(), name="maintenance")
    try:
        await asyncio.sleep(1.5)  # (two ticks)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert delivered.calls == 1  # the second tick waits for FOLD_RETRY_S
    assert "cannot fold the recent delivered ids" in caplog.text
