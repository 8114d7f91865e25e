"""Delivered ids, sessions, secrets and peers: round trips, dedupe and persistence across restarts."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from gateway.store import InvalidRecord, Peer, Store, StoreCorrupt
from gateway.store.schema import SCHEMA_VERSION

from .conftest import SoftStorageKey, mid


def test_mark_delivered_dedupes_across_restart(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        assert s.mark_delivered(mid(1), 1_000)
        assert not s.mark_delivered(mid(1), 1_001)
        assert s.mark_delivered(mid(2), 5_000)
    with Store.open(db_path, key) as s:
        assert not s.mark_delivered(mid(1), 9_000)
        assert s.delivered.seen(mid(2)) and not s.delivered.seen(mid(3))
        assert s.prune_delivered(older_than_ms=2_000) == 1
        assert s.mark_delivered(mid(1), 9_000)  # forgotten after pruning
        assert not s.mark_delivered(mid(2), 9_000)
        assert s.delivered.count() == 2


def test_delivered_rejects_bad_ids(store: Store) -> None:
    with pytest.raises(InvalidRecord):
        store.mark_delivered(b"x" * 15, 0)


def test_sessions_put_get_delete(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        assert s.sessions.get("devB") is None
        s.sessions.put("devB", b"ratchet-1")
        s.sessions.put("devB", b"ratchet-2")
        s.sessions.put("devC", b"")
        assert s.sessions.get("devB") == b"ratchet-2"
    with Store.open(db_path, key) as s:
        assert s.sessions.items() == [("devB", b"ratchet-2"), ("devC", b"")]
        assert s.sessions.delete("devB") and not s.sessions.delete("devB")
        assert s.sessions.get("devB") is None and s.sessions.count() == 1


def test_secrets(store: Store) -> None:
    store.put_secret("prekeys", b"\x00\x01")
    store.put_secret("delegated/2026-11", b"wrapped")
    assert store.get_secret("prekeys") == b"\x00\x01"
    assert store.get_secret("nope") is None
    assert [n for n, _ in store.secrets.items()] == ["delegated/2026-11", "prekeys"]
    assert store.delete_secret("prekeys") and store.get_secret("prekeys") is None
    with pytest.raises(InvalidRecord):
        store.put_secret("", b"x")
    with pytest.raises(InvalidRecord):
        store.put_secret("n", "str")  # type: ignore[arg-type]


def test_update_many_rewrites_only_names_that_exist(store: Store) -> None:
    """The inbox's PUBREC record: a purged entry must not come back."""
    store.inbox.put_many([("a", b"1"), ("b", b"2")])
    assert store.inbox.update_many([("a", b"1x"), ("gone", b"?"), ("b", b"2x")]) == 2
    assert store.inbox.items() == [("a", b"1x"), ("b", b"2x")]
    assert store.inbox.get("gone") is None and store.inbox.update_many([]) == 0
    with pytest.raises(InvalidRecord):
        store.inbox.update_many([("a", "str")])  # type: ignore[list-item]


def test_put_many_stores_the_rows_put_stores(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """`put_many` (keys through the memo in one pass, seals with one nonce draw) writes, row for row, the key and
    sealed value `put` writes from the same nonces; a bad value or name anywhere in the batch writes nothing."""
    import gateway.store.crypto as crypto

    items = [(f"dev-a/{i:032x}", os.urandom(i * 7)) for i in range(40)] + [("a", b"1"), ("a", b"2")]
    stream = os.urandom(12 * len(items))

    class Stream:
        def __init__(self) -> None:
            self.pos = 0

        def take(self, n: int) -> bytes:
            self.pos += n
            return stream[self.pos - n:self.pos]

    def rows() -> list[tuple[bytes, bytes]]:
        with store._db.read("test") as conn:
            return sorted((bytes(k), bytes(v)) for k, v in conn.execute("SELECT k, v FROM inbox"))

    monkeypatch.setattr(crypto, "_NONCES", Stream())
    for name, value in items:
        store.inbox.put(name, value)
    want = rows()
    for name, _ in items:
        store.inbox.delete(name)
    monkeypatch.setattr(crypto, "_NONCES", Stream())
    store.inbox.put_many(items)
    assert rows() == want
    assert store.inbox.items() == sorted(dict(items).items())
    monkeypatch.undo()
    for bad in ([("b", b"1"), ("c", "str")], [("b", b"1"), ("", b"2")], [("b", b"1"), (7, b"2")]):
        with pytest.raises(InvalidRecord):
            store.inbox.put_many(bad)  # type: ignore[arg-type]
        assert store.inbox.get("b") is None
    store.inbox.put_many(iter([("g", b"from a generator")]))  # type: ignore[arg-type]
    assert store.inbox.get("g") == b"from a generator"


def test_sessions_and_secrets_are_separate_tables(store: Store) -> None:
    store.sessions.put("same", b"session")
    store.put_secret("same", b"secret")
    assert store.sessions.get("same") == b"session" and store.get_secret("same") == b"secret"


def test_peers(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        s.peers.put("devB", b"cert-chain-B", 100)
        s.peers.put("devA", b"cert-chain-A", 50)
        assert s.peers.touch("devB", 200)
        assert s.peers.touch("devB", 150)  # never goes backwards
        assert not s.peers.touch("devZ", 1)
    with Store.open(db_path, key) as s:
        assert s.peers.entries() == [Peer("devA", b"cert-chain-A", 50), Peer("devB", b"cert-chain-B", 200)]
        assert s.peers.get("devB") == Peer("devB", b"cert-chain-B", 200)
        assert s.peers.delete("devA") and s.peers.get("devA") is None and s.peers.count() == 1


def test_items_leaves_the_skipped_names_sealed(store: Store) -> None:
    """The receiver's 1 s inbox re-read skips the entries being published without unsealing them: a skipped row
    is not opened (here it could not be: its value is garbage), the others are, in name order."""
    store.inbox.put("dev/b", b"two")
    store.inbox.put("dev/a", b"one")
    store.inbox.put("dev/c", b"three")
    k = store.inbox._k("dev/c")
    with store._db.write("test: spoiling a row") as conn:
        conn.execute("UPDATE inbox SET v = ? WHERE k = ?", (b"\x01" + bytes(60), k))
    assert store.inbox.items(skip={"dev/c"}) == [("dev/a", b"one"), ("dev/b", b"two")]
    assert store.inbox.items(skip=["dev/a", "dev/c", "dev/unknown"]) == [("dev/b", b"two")]
    with pytest.raises(StoreCorrupt):
        store.inbox.items()


DATA = Path(__file__).parent / "data"


def test_a_version_3_store_keeps_its_delivered_ids_in_the_one_btree_of_version_4(tmp_path: Path) -> None:
    """tests/store/data/store-v3.db was written by the code of schema version 3 (tests/store/data/README.md):
    after the upgrade the delivered ids are one WITHOUT ROWID table keyed by the blind id, with every id (and its
    time) still there, so a message delivered before the upgrade is still a duplicate after it."""
    path = tmp_path / "agw.db"
    path.write_bytes((DATA / "store-v3.db").read_bytes())
    key = SoftStorageKey(kek=b"\x11" * 32)
    with Store.open(path, key) as s:
        assert s.delivered.count() == 305
        assert s.delivered.seen_many([mid(n) for n in (1, 5, 100, 399, 400)]) == {mid(1), mid(5), mid(100), mid(399)}
        assert not s.mark_delivered(mid(3), 9_000) and s.mark_delivered(mid(6), 9_000)
        assert s.inbox.get("dev-a/" + mid(9).hex()) == b"an inbox record"
        assert s.prune_delivered(older_than_ms=2_500) == 2  # mid(1) at 1,000, mid(2) at 2,000: the times came along
    conn = sqlite3.connect(path)
    try:
        sql = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'delivered'").fetchone()[0]
        indexes = conn.execute("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'delivered'")
        assert "WITHOUT ROWID" in sql and indexes.fetchall() == []
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    finally:
        conn.close()
    with Store.open(path, key) as s:  # and across a restart
        assert s.delivered.seen(mid(5)) and s.delivered.seen(mid(6)) and not s.delivered.seen(mid(1))


def test_the_caller_hears_of_a_schema_upgrade_before_it_runs(tmp_path: Path) -> None:
    """The daemon asks systemd for more time then (gateway/daemon.py `_store_upgrading`): called once, with the
    versions, before the upgrade's transaction; not for a store that is already current or new."""
    path = tmp_path / "agw.db"
    path.write_bytes((DATA / "store-v3.db").read_bytes())
    key = SoftStorageKey(kek=b"\x11" * 32)
    calls: list[tuple[int, int, int]] = []

    def upgrading(old: int, new: int) -> None:
        conn = sqlite3.connect(path)  # (a second reader: the upgrade has not begun)
        try:
            calls.append((old, new, conn.execute("PRAGMA user_version").fetchone()[0]))
        finally:
            conn.close()

    with Store.open(path, key, on_upgrade=upgrading):
        pass
    assert calls == [(3, SCHEMA_VERSION, 3)]
    with Store.open(path, key, on_upgrade=upgrading):
        pass
    with Store.open(tmp_path / "new.db", key, on_upgrade=upgrading):
        pass
    assert len(calls) == 1


def test_pruning_slice_by_slice_forgets_exactly_what_one_prune_would(db_path: Path, key: SoftStorageKey) -> None:
    """The daemon's hourly prune goes through the 256 key slices (the table has no time index): together they
    drop every id older than the cut, from every slice including the first and the last, and nothing newer."""
    ids = [os.urandom(16) for _ in range(3000)]
    with Store.open(db_path, key) as s:
        with s.transaction(durable=False):
            for n, m in enumerate(ids):
                s.delivered.mark(m, n)
        assert sum(s.delivered.prune_slice(1_500, i) for i in range(s.delivered.PRUNE_SLICES)) == 1_500
        assert s.delivered.seen_many(ids) == set(ids[1_500:])
        with pytest.raises(ValueError):
            s.delivered.prune_slice(0, 256)
