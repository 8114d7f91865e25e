"""The audit log's MAC chain: tampering with the file (raw SQLite, store closed) is detected at the right index."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.store import InvalidRecord, Store, StoreCorrupt

from .conftest import SoftStorageKey

N = 6


def _fill(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        for i in range(1, N + 1):
            assert s.audit.append({"type": "test", "n": i, "peer": f"dev{i}/a"}, at_ms=i * 1000) == i
        assert s.verify_audit() == (True, None)


def _raw(db_path: Path, *sql: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        for stmt, args in sql:
            conn.execute(stmt, args)
    finally:
        conn.close()


def _verify(db_path: Path, key: SoftStorageKey) -> tuple[bool, int | None]:
    with Store.open(db_path, key) as s:
        return s.verify_audit()


def test_append_and_read_back(store: Store) -> None:
    assert store.audit.append({"type": "a", "nested": {"x": [1, 2]}}, at_ms=5) == 1
    assert store.audit.append({"type": "b"}) == 2
    entries = store.audit.entries()
    assert [(e.index, e.event) for e in entries] == [(1, {"type": "a", "nested": {"x": [1, 2]}}), (2, {"type": "b"})]
    assert entries[0].at_ms == 5 and entries[1].at_ms > 1_600_000_000_000
    check = store.audit.check()
    assert check.ok and check.entries == 2


def test_rejects_non_json_events(store: Store) -> None:
    with pytest.raises(InvalidRecord):
        store.audit.append({"blob": b"\x00"})
    with pytest.raises(InvalidRecord):
        store.audit.append(["not", "a", "mapping"])  # type: ignore[arg-type]
    assert store.audit.entries() == []


def _flip_ciphertext(p: Path) -> None:
    conn = sqlite3.connect(p, isolation_level=None)
    try:
        blob = bytearray(conn.execute("SELECT v FROM audit WHERE idx = 3").fetchone()[0])
        blob[20] ^= 0x01
        conn.execute("UPDATE audit SET v = ? WHERE idx = 3", (bytes(blob),))
    finally:
        conn.close()


def _flip_mac(p: Path) -> None:
    _raw(p, ("UPDATE audit SET mac = zeroblob(32) WHERE idx = 3", ()))


def _delete_middle(p: Path) -> None:
    _raw(p, ("DELETE FROM audit WHERE idx = 3", ()))


def _swap_rows(p: Path) -> None:
    _raw(p, ("UPDATE audit SET idx = 100 WHERE idx = 3", ()), ("UPDATE audit SET idx = 3 WHERE idx = 4", ()),
         ("UPDATE audit SET idx = 4 WHERE idx = 100", ()))


def _insert_copy(p: Path) -> None:
    _raw(p, ("UPDATE audit SET idx = idx + 100 WHERE idx >= 3", ()),
         ("UPDATE audit SET idx = idx - 99 WHERE idx >= 100", ()),
         ("INSERT INTO audit (idx, at_ms, v, mac) SELECT 3, at_ms, v, mac FROM audit WHERE idx = 2", ()))


def _edit_time(p: Path) -> None:
    _raw(p, ("UPDATE audit SET at_ms = 1 WHERE idx = 3", ()))


def _delete_tail(p: Path) -> None:
    _raw(p, ("DELETE FROM audit WHERE idx = ?", (N,)))


def _drop_head(p: Path) -> None:
    _raw(p, ("DELETE FROM meta WHERE name = 'audit_head'", ()))


@pytest.mark.parametrize(
    ("tamper", "first_bad"),
    [(_flip_ciphertext, 3), (_flip_mac, 3), (_delete_middle, 3), (_swap_rows, 3), (_insert_copy, 3),
     (_edit_time, 3), (_delete_tail, N), (_drop_head, N + 1)],
    ids=["edit-ciphertext", "edit-mac", "delete", "reorder", "insert", "edit-time", "truncate-tail", "drop-head"],
)
def test_tamper_is_detected(db_path: Path, key: SoftStorageKey, tamper: Callable[[Path], None], first_bad: int) -> None:
    _fill(db_path, key)
    tamper(db_path)
    assert _verify(db_path, key) == (False, first_bad)


def test_prune_keeps_chain_verifiable(db_path: Path, key: SoftStorageKey) -> None:
    _fill(db_path, key)
    with Store.open(db_path, key) as s:
        assert s.prune_audit(older_than_ms=3500) == 3
        entries = s.audit.entries()
        assert [e.index for e in entries] == [4, 5, 6, 7]
        assert entries[-1].event == {"type": "audit.pruned", "through": 3, "count": 3}
        assert s.verify_audit() == (True, None)
        assert s.prune_audit(older_than_ms=0) == 0
        assert s.audit.append({"type": "after"}) == 8
    assert _verify(db_path, key) == (True, None)
    _raw(db_path, ("DELETE FROM audit WHERE idx = 4", ()))  # pruning by hand, without moving the anchor
    assert _verify(db_path, key) == (False, 4)


def test_forged_anchor_is_detected(db_path: Path, key: SoftStorageKey) -> None:
    _fill(db_path, key)
    with Store.open(db_path, key) as s:
        s.prune_audit(older_than_ms=2500)
    forge = "UPDATE meta SET value = CAST(substr(value, 1, 8) || zeroblob(64) AS BLOB) WHERE name = 'audit_anchor'"
    _raw(db_path, (forge, ()))
    assert _verify(db_path, key)[0] is False


def test_prune_refuses_a_broken_chain(db_path: Path, key: SoftStorageKey) -> None:
    _fill(db_path, key)
    _flip_mac(db_path)
    with Store.open(db_path, key) as s, pytest.raises(StoreCorrupt):
        s.prune_audit(older_than_ms=10**12)
    assert _verify(db_path, key) == (False, 3)


def test_append_refuses_a_forged_head(db_path: Path, key: SoftStorageKey) -> None:
    _fill(db_path, key)
    _drop_head(db_path)
    with Store.open(db_path, key) as s, pytest.raises(StoreCorrupt):
        s.audit.append({"type": "x"})
