"""Delivered ids, sessions, secrets and peers: round trips, dedupe and persistence across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.store import InvalidRecord, Peer, Store, StoreCorrupt

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
