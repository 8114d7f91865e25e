"""The store as a whole: opening, keys, persistence, confidentiality on disk, corruption, full disk, threads."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.store import (
    ConsentState,
    Store,
    StoreClosed,
    StoreCorrupt,
    StoreFull,
    StoreKeyMismatch,
    StoreLocked,
    StoreVersionError,
)
from hsm.errors import HardwareError, UnwrapFailed

from .conftest import SoftStorageKey, mid

FAR = 10**13
MARKER = "PLAINTEXT-MARKER-7f3a"


def _store_files(db_path: Path) -> list[Path]:
    return [p for p in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")) if p.exists()]


def _fill_everything(s: Store) -> None:
    m = MARKER.encode()
    s.outbox.put_many([(b"MSGID-%010d" % i, f"{MARKER}-dev", m + b"-record-%d" % i, FAR) for i in range(20)])
    s.mark_delivered(b"MSGID-IN-%07d" % 1, 1)
    s.sessions.put(f"{MARKER}-dev", m + b"-ratchet")
    s.put_secret(f"{MARKER}-secret", m + b"-prekey")
    s.peers.put(f"{MARKER}-dev", m + b"-cert", 5)
    s.consent.request(f"{MARKER}-agent", f"{MARKER}-dev/bot", m + b"-held", 6)
    s.audit.append({"type": "note", "text": MARKER})


def test_new_store_files_are_private(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        s.outbox.put(mid(1), "d", b"x", FAR)
        for p in _store_files(db_path):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert not db_path.with_name(db_path.name + ".init").exists()


def test_no_plaintext_or_data_key_on_disk(db_path: Path, key: SoftStorageKey) -> None:
    s = Store.open(db_path, key)
    _fill_everything(s)
    dek = key.wrapped[0]
    needles = [MARKER.encode(), MARKER.encode("utf-16-le"), dek, b"MSGID-"]
    files = _store_files(db_path)
    assert Path(f"{db_path}-wal") in files  # looked at while open, with the WAL in use
    for p in files:
        data = p.read_bytes()
        for needle in needles:
            assert needle not in data, (p.name, needle)
    s.close()
    for p in _store_files(db_path):
        data = p.read_bytes()
        assert all(needle not in data for needle in needles), p.name
    # Sanity check of the grep itself: the marker is really what was stored.
    with Store.open(db_path, key) as s:
        assert s.sessions.get(f"{MARKER}-dev") == MARKER.encode() + b"-ratchet"


def test_key_uri_recorded_without_pin(store: Store, key: SoftStorageKey) -> None:
    assert store.key_uri_on_disk == "pkcs11:token=test;object=k1"
    assert "1234" not in store.key_uri_on_disk


def test_wrong_storage_key_is_refused(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        s.outbox.put(mid(1), "d", b"x", FAR)
    with pytest.raises(StoreKeyMismatch) as err:
        Store.open(db_path, SoftStorageKey("other"))
    assert isinstance(err.value.__cause__, UnwrapFailed)
    assert "object=k1" in str(err.value)
    with Store.open(db_path, key) as s:  # the failed open released the lock and changed nothing
        assert s.outbox.depth() == 1


class _GarbageKey(SoftStorageKey):
    """A storage key whose unwrap does not authenticate: returns 32 random bytes."""

    def unwrap(self, blob: bytes) -> bytes:
        return os.urandom(32)


def test_unauthenticated_wrong_unwrap_caught_by_check_value(db_path: Path, key: SoftStorageKey) -> None:
    Store.open(db_path, key).close()
    with pytest.raises(StoreKeyMismatch):
        Store.open(db_path, _GarbageKey())


def test_rewrap_keeps_data(db_path: Path, key: SoftStorageKey) -> None:
    new_key = SoftStorageKey("k2")
    with Store.open(db_path, key) as s:
        _fill_everything(s)
        s.rewrap(new_key)
        assert s.key_uri_on_disk == "pkcs11:token=test;object=k2"
        assert s.outbox.depth() == 20  # still usable without reopening
    with pytest.raises(StoreKeyMismatch):
        Store.open(db_path, key)
    with Store.open(db_path, new_key) as s:
        assert s.outbox.depth() == 20 and s.get_secret(f"{MARKER}-secret") == MARKER.encode() + b"-prekey"
        assert s.audit.entries()[-1].event["type"] == "store.rewrapped"
        assert s.verify_audit() == (True, None)


def test_rewrap_refuses_a_key_that_does_not_round_trip(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        with pytest.raises(StoreKeyMismatch):
            s.rewrap(_GarbageKey("bad"))
        assert s.key_uri_on_disk.endswith("object=k1")
    Store.open(db_path, key).close()


def _raw(db_path: Path, sql: str, args: tuple[object, ...] = ()) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute(sql, args)
    finally:
        conn.close()


def test_record_swapped_between_rows_fails(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        s.outbox.put_many([(mid(1), "d", b"pay 1 EUR", FAR), (mid(2), "d", b"pay 1000 EUR", FAR)])
    _raw(db_path, "UPDATE outbox SET v = (SELECT v FROM outbox WHERE seq = 2) WHERE seq = 1")
    with Store.open(db_path, key) as s:
        with pytest.raises(StoreCorrupt):
            s.outbox.due(1, 10)
        with pytest.raises(StoreCorrupt):
            s.outbox.get(mid(1))
        assert s.outbox.get(mid(2)) is not None


def test_record_moved_between_tables_fails(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        s.sessions.put("devB", b"ratchet")
        s.put_secret("devB", b"secret")
    _raw(db_path, "UPDATE secrets SET v = (SELECT v FROM sessions)")
    with Store.open(db_path, key) as s:
        assert s.sessions.get("devB") == b"ratchet"
        with pytest.raises(StoreCorrupt):
            s.get_secret("devB")


def test_plaintext_index_column_tamper_detected(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        s.outbox.put(mid(1), "d", b"x", 5_000)
    _raw(db_path, "UPDATE outbox SET expires_at_ms = ?", (FAR,))
    with Store.open(db_path, key) as s, pytest.raises(StoreCorrupt):
        s.outbox.due(10_000, 10)


def _closed_store_with_data(db_path: Path, key: SoftStorageKey) -> int:
    with Store.open(db_path, key) as s:
        s.outbox.put_many([(mid(i), "d", os.urandom(300), FAR) for i in range(300)])
    assert not Path(f"{db_path}-wal").exists()  # closed cleanly: everything is in the main file
    return db_path.stat().st_size


@pytest.mark.parametrize("keep", [0, 50, 4096, "half", "minus-one-page"])
def test_truncated_file_is_detected(db_path: Path, key: SoftStorageKey, keep: int | str) -> None:
    size = _closed_store_with_data(db_path, key)
    new_size = {"half": size // 2, "minus-one-page": size - 4096}.get(str(keep), keep)
    assert isinstance(new_size, int)
    os.truncate(db_path, new_size)
    with pytest.raises(StoreCorrupt):
        Store.open(db_path, key)
    assert db_path.stat().st_size == new_size  # never re-created or repaired behind the operator's back


def test_damaged_page_is_detected(db_path: Path, key: SoftStorageKey) -> None:
    size = _closed_store_with_data(db_path, key)
    with open(db_path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(4096))
    with pytest.raises(StoreCorrupt):
        s = Store.open(db_path, key)
        try:  # if quick_check happened to miss it, reading must not return damaged data silently
            s.outbox.due(1, 1000)
        finally:
            s.close()


def test_foreign_files_are_refused(db_path: Path, key: SoftStorageKey, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    with pytest.raises(StoreCorrupt):
        Store.open(garbage, key)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreCorrupt):
        Store.open(other, key)


def test_missing_wrapped_key_is_corrupt(db_path: Path, key: SoftStorageKey) -> None:
    Store.open(db_path, key).close()
    _raw(db_path, "DELETE FROM meta WHERE name = 'dek_wrapped'")
    with pytest.raises(StoreCorrupt):
        Store.open(db_path, key)


def test_newer_schema_is_refused(db_path: Path, key: SoftStorageKey) -> None:
    Store.open(db_path, key).close()
    _raw(db_path, "PRAGMA user_version = 99")
    with pytest.raises(StoreVersionError, match="upgrade agw"):
        Store.open(db_path, key)


def test_second_open_is_locked_out(db_path: Path, key: SoftStorageKey) -> None:
    s = Store.open(db_path, key)
    with pytest.raises(StoreLocked):
        Store.open(db_path, key)
    s.close()
    s.close()  # idempotent
    Store.open(db_path, key).close()


def test_use_after_close(db_path: Path, key: SoftStorageKey) -> None:
    s = Store.open(db_path, key)
    s.close()
    with pytest.raises(StoreClosed):
        s.outbox.depth()


def test_transaction_is_atomic(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.outbox.put(mid(1), "d", b"x", FAR)
        store.mark_delivered(mid(2), 1)
        raise RuntimeError("crash between the two writes")
    assert store.outbox.depth() == 0 and store.mark_delivered(mid(2), 1)
    with store.transaction():
        store.outbox.delete(mid(1))
        store.audit.append({"type": "ack"})
    assert store.verify_audit() == (True, None)


def test_full_disk_raises_store_full_and_loses_nothing(db_path: Path, key: SoftStorageKey) -> None:
    s = Store.open(db_path, key)
    try:
        cap = s.set_max_bytes(s.stats().db_bytes + 48 * 1024)
        assert cap > 0
        stored = 0
        with pytest.raises(StoreFull):
            for i in range(10_000):
                s.outbox.put_many([(mid(i * 8 + j), "d", os.urandom(256), FAR) for j in range(8)])
                stored += 8
        assert stored > 0
        assert s.outbox.depth() == stored  # the failed batch left nothing behind
        s.set_max_bytes(None)
        s.outbox.put_many([(mid(10**9 + j), "d", b"after", FAR) for j in range(8)])
        s.audit.append({"type": "after-full"})
        assert s.outbox.depth() == stored + 8 and s.verify_audit() == (True, None)
    finally:
        s.close()
    with Store.open(db_path, key) as s:
        assert s.outbox.depth() == stored + 8 and len(s.outbox.due(1, 10**6)) == stored + 8


def test_max_db_bytes_option(db_path: Path, key: SoftStorageKey) -> None:
    Store.open(db_path, key).close()
    with Store.open(db_path, key, max_db_bytes=db_path.stat().st_size) as s, pytest.raises(StoreFull):
        s.outbox.put_many([(mid(i), "d", os.urandom(1024), FAR) for i in range(64)])


def test_concurrent_use_from_four_threads(store: Store) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for n in range(25):
                base = t * 1000 + n * 4
                store.outbox.put_many([(mid(base + j), f"dev{t}", b"r", FAR) for j in range(4)])
                assert store.mark_delivered(mid(base), n)
                store.audit.append({"thread": t, "n": n})
                due = store.outbox.due(1, 8, peer_device=f"dev{t}")
                store.outbox.delete_many([e.msg_id for e in due[:2]])
                store.sessions.put(f"dev{t}", b"%d" % n)
                store.consent.allow(f"a{t}", f"dev{t}/x", n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert store.outbox.depth() == 4 * 25 * 2
    assert store.delivered.count() == 100
    assert [store.sessions.get(f"dev{t}") for t in range(4)] == [b"24"] * 4
    check = store.audit.check()
    assert check.ok and check.entries == 100 + 4 * 25
    assert all(store.consent.is_allowed(f"a{t}", f"dev{t}/x") for t in range(4))


def test_export_and_purge_peer(store: Store) -> None:
    store.outbox.put_many([(mid(1), "devB", b"to-b", FAR), (mid(2), "devC", b"to-c", FAR)])
    store.sessions.put("devB", b"ratchet-secret")
    store.inbox.put("devB/" + mid(9).hex(), b"received from devB, not yet published")
    store.inbox.put("devC/" + mid(8).hex(), b"received from devC")
    store.peers.put("devB", b"cert", 7)
    store.consent.request("a1", "devB/bot", b"hi", 3)
    store.consent.allow("a2", "devC/bot", 4)
    store.audit.append({"type": "rejected", "from": "spiffe://fleet/device/devB/agent/x"}, at_ms=5)
    store.audit.append({"type": "rejected", "from": "devBB/x", "note": "devB-like but another device"}, at_ms=6)
    export = store.export(peer="devB")
    assert [e["msg_id"] for e in export["outbox"]] == [mid(1).hex()]
    assert export["outbox"][0]["record_b64"] == "dG8tYg=="
    assert export["peers"] == [{"device": "devB", "credential_b64": "Y2VydA==", "last_seen_ms": 7}]
    assert export["sessions"] == [{"peer_device": "devB", "state_bytes": 14}]  # key material is not exported
    assert [c["peer"] for c in export["consent"]] == ["devB/bot"]
    assert [a["event"]["type"] for a in export["audit"]] == ["consent.requested", "rejected"]
    assert export["audit"][1]["event"]["from"].startswith("spiffe://")
    assert "delivered_ids" not in export
    everything = store.export()
    assert len(everything["outbox"]) == 2 and len(everything["consent"]) == 2 and everything["delivered_ids"] == 0

    assert store.purge_peer("devB") == {"outbox": 1, "sessions": 1, "peers": 1, "consent": 1, "inbox": 1}
    assert [name for name, _ in store.inbox.items()] == ["devC/" + mid(8).hex()]
    after = store.export(peer="devB")
    assert after["outbox"] == after["peers"] == after["sessions"] == after["consent"] == []
    assert store.outbox.depth() == 1 and store.consent.is_allowed("a2", "devC/bot")
    assert store.audit.entries()[-1].event["type"] == "store.purged"
    assert store.verify_audit() == (True, None)


def test_stats(store: Store) -> None:
    store.outbox.put_many([(mid(1), "devB", b"12345", FAR), (mid(2), "devB", b"678", FAR)])
    store.consent.request("a1", "devB/bot", b"hi", 3)
    store.peers.put("devB", b"c", 1)
    store.mark_delivered(mid(9), 1)
    stats = store.stats().as_dict()
    assert {k: v for k, v in stats.items() if k != "db_bytes"} == {
        "outbox_depth": 2, "outbox_bytes": 8, "pending_consent": 1, "peers": 1, "sessions": 0,
        "delivered_ids": 1, "audit_entries": 1,
    }
    assert stats["db_bytes"] > 0
    assert store.consent.state("a1", "devB/bot") is ConsentState.PENDING


_CHILD = """
import os, sys
sys.path.insert(0, {tests!r})
from store.conftest import SoftStorageKey, mid
from gateway.store import Store
s = Store.open({db!r}, SoftStorageKey(kek=bytes.fromhex({kek!r})))
s.outbox.put_many([(mid(i), "d", b"durable", 10**13) for i in range(50)])
s.mark_delivered(mid(1), 1)
print("acked", flush=True)
os.kill(os.getpid(), 9)
"""


def test_committed_writes_survive_kill_9(db_path: Path, key: SoftStorageKey) -> None:
    Store.open(db_path, key).close()
    code = _CHILD.format(tests=str(Path(__file__).parents[1]), db=str(db_path), kek=key.kek.hex())
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[2])
    assert proc.stdout.strip() == "acked", proc.stderr
    assert proc.returncode == -9
    with Store.open(db_path, key) as s:  # the lock died with the process; the WAL is recovered
        assert s.outbox.depth() == 50 and not s.mark_delivered(mid(1), 2)


def test_stale_wal_without_database_is_refused(db_path: Path, key: SoftStorageKey) -> None:
    s = Store.open(db_path, key)
    s.outbox.put(mid(1), "d", b"x", FAR)
    wal = Path(f"{db_path}-wal").read_bytes()
    s.close()
    db_path.unlink()
    Path(f"{db_path}-wal").write_bytes(wal)
    with pytest.raises(StoreCorrupt):
        Store.open(db_path, key)
    assert not db_path.exists()


def test_create_false_refuses_a_missing_store(db_path: Path, key: SoftStorageKey) -> None:
    with pytest.raises(StoreCorrupt):
        Store.open(db_path, key, create=False)
    assert not db_path.exists()
    Store.open(db_path, key).close()
    Store.open(db_path, key, create=False).close()


def test_overwritten_session_leaves_no_old_ciphertext_after_checkpoint(db_path: Path, key: SoftStorageKey) -> None:
    """Forward secrecy on disk: replaced ratchet state is gone from the main file and the WAL (secure_delete)."""
    with Store.open(db_path, key) as s:
        s.sessions.put("devB", os.urandom(600))
        s.checkpoint()
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        old = conn.execute("SELECT v FROM sessions").fetchone()[0]
        conn.close()
        assert any(old in p.read_bytes() for p in _store_files(db_path))
        s.sessions.put("devB", os.urandom(600))
        s.sessions.put("devC", os.urandom(600))
        s.purge_peer("devC")
        s.checkpoint()
        assert all(old not in p.read_bytes() for p in _store_files(db_path))
        assert s.sessions.get("devB") is not None and s.sessions.get("devC") is None


class _AbsentToken(SoftStorageKey):
    """A storage key whose hardware has gone away."""

    def wrap(self, key: bytes) -> bytes:
        raise HardwareError("token removed", uri=self.uri, rc="CKR_DEVICE_REMOVED")

    def unwrap(self, blob: bytes) -> bytes:
        raise HardwareError("token removed", uri=self.uri, rc="CKR_DEVICE_REMOVED")


def test_hardware_errors_propagate_and_leave_nothing_behind(db_path: Path, key: SoftStorageKey) -> None:
    with pytest.raises(HardwareError):
        Store.open(db_path, _AbsentToken())
    assert not db_path.exists() and not db_path.with_name(db_path.name + ".init").exists()
    Store.open(db_path, key).close()
    with pytest.raises(HardwareError):  # retryable: not mistaken for a wrong key or a corrupt store
        Store.open(db_path, _AbsentToken())
    with Store.open(db_path, key) as s:  # the lock was released
        assert s.outbox.depth() == 0
