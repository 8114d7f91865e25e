"""The outbox: messages accepted from local agents and not yet acknowledged end to end by the peer gateway.

A message is written here (durably, in a group commit) before the broker is acknowledged, retried until the
peer's encrypted ack deletes it, and dropped at its expiry. Limits are explicit, as in Greengrass's spooler:
when a batch would exceed one, the whole batch is refused with `OutboxFull` and nothing of it is stored, so the
caller simply does not acknowledge the broker and the agent's MQTT client retries later.

Row layout: `k` = blind(msg id), `peer` = blind(peer device), plaintext `size`/`expires_at_ms`/`due_at_ms`
(needed by SQL for limits, expiry and scheduling), and the sealed tuple (msg id, peer device, record, expiry,
attempts). The sealed expiry is authoritative; a plaintext copy that disagrees is reported as corruption.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .codec import expect, pack, unpack
from .crypto import Keyring
from .db import Database, keys_present
from .errors import InvalidRecord, OutboxFull, StoreCorrupt

MSG_ID_BYTES = 16
TABLE = "outbox"


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Size limits; hitting any of them refuses the batch with `OutboxFull`. Defaults suit a Pi with an SD card."""

    max_entries: int = 50_000
    max_bytes: int = 64 * 1024 * 1024
    max_entries_per_peer: int = 10_000
    max_bytes_per_peer: int = 16 * 1024 * 1024
    max_record_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_bytes", "max_entries_per_peer", "max_bytes_per_peer", "max_record_bytes"):
            if getattr(self, name) <= 0:
                raise InvalidRecord(f"outbox limit {name} must be positive")


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One queued message as the link layer sees it."""

    msg_id: bytes
    peer_device: str
    record: bytes
    expires_at_ms: int
    attempts: int
    due_at_ms: int


OutboxItem = tuple[bytes, str, bytes, int]


def check_msg_id(msg_id: bytes) -> bytes:
    if not isinstance(msg_id, bytes) or len(msg_id) != MSG_ID_BYTES:
        raise InvalidRecord(f"message ids are {MSG_ID_BYTES} bytes")
    return msg_id


class Outbox:
    """Durable, encrypted, size-limited queue of outbound records."""

    def __init__(self, db: Database, keys: Keyring, limits: OutboxLimits) -> None:
        self._db = db
        self._keys = keys
        self.limits = limits

    def _k(self, msg_id: bytes) -> bytes:
        return self._keys.blind("outbox.msg", check_msg_id(msg_id))

    def _peer(self, peer_device: str) -> bytes:
        return self._keys.blind("outbox.peer", peer_device)

    def _seal(self, k: bytes, msg_id: bytes, peer: str, record: bytes, expires: int, attempts: int) -> bytes:
        return self._keys.seal(TABLE, k, pack((msg_id, peer, record, expires, attempts)))

    def _entry(self, k: bytes, expires_col: int, due: int, blob: bytes, attempts_col: int = 0) -> OutboxEntry:
        msg_id, peer, record, expires, attempts = expect(
            unpack(self._keys.open(TABLE, k, blob)), (bytes, str, bytes, int, int)
        )
        if expires != expires_col:
            raise StoreCorrupt("an outbox row's expiry column disagrees with its sealed record: restore a backup")
        return OutboxEntry(msg_id, peer, record, expires, attempts + attempts_col, due)

    # -- writing -------------------------------------------------------------------------------------------------
    def put_many(self, items: Iterable[OutboxItem], due_at_ms: int = 0) -> int:
        """Store a batch in one transaction (one fsync). Returns how many were new; known ids are left unchanged.

        `due_at_ms`: when `due` first returns the entries (0: at once). A sender that keeps the batch in memory
        and sends it from there stores it due later, so `due` does not read it back (see `release_unsent`).
        Raises `OutboxFull` (nothing stored) if a limit would be exceeded, `StoreFull` if the disk is full.
        """
        rows: list[tuple[bytes, bytes, int, int, int, bytes]] = []
        peers: dict[bytes, str] = {}
        for msg_id, peer_device, record, expires_at_ms in items:
            if not isinstance(peer_device, str) or not peer_device:
                raise InvalidRecord("peer_device must be a non-empty string")
            if not isinstance(record, bytes):
                raise InvalidRecord("records are bytes")
            if len(record) > self.limits.max_record_bytes:
                raise OutboxFull(
                    f"record of {len(record)} bytes exceeds max_record_bytes={self.limits.max_record_bytes}; "
                    "it cannot be queued (send smaller messages)",
                    limit="max_record_bytes",
                    peer_device=peer_device,
                )
            k = self._k(msg_id)
            peer = self._peer(peer_device)
            peers[peer] = peer_device
            blob = self._seal(k, msg_id, peer_device, record, int(expires_at_ms), 0)
            rows.append((k, peer, len(record), int(expires_at_ms), int(due_at_ms), blob))
        if not rows:
            return 0
        with self._db.write("storing outbound messages") as conn:
            # rowcount sums the rows each statement changed itself (not the usage triggers' rows).
            added = conn.executemany(
                "INSERT OR IGNORE INTO outbox (k, peer, size, expires_at_ms, due_at_ms, v) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            ).rowcount
            self._check_limits(conn, peers)
        return added

    def put(self, msg_id: bytes, peer_device: str, record: bytes, expires_at_ms: int) -> bool:
        """Store one message; True if it was new."""
        return self.put_many([(msg_id, peer_device, record, expires_at_ms)]) == 1

    def _check_limits(self, conn: sqlite3.Connection, peers: dict[bytes, str]) -> None:
        lim = self.limits
        n, size = conn.execute("SELECT COALESCE(SUM(n), 0), COALESCE(SUM(bytes), 0) FROM outbox_usage").fetchone()
        if n > lim.max_entries:
            raise OutboxFull(f"outbox holds {n} > max_entries={lim.max_entries}; retry after deliveries drain",
                             limit="max_entries")
        if size > lim.max_bytes:
            raise OutboxFull(f"outbox holds {size} bytes > max_bytes={lim.max_bytes}; retry after deliveries drain",
                             limit="max_bytes")
        for peer, name in peers.items():
            row = conn.execute("SELECT n, bytes FROM outbox_usage WHERE peer = ?", (peer,)).fetchone()
            if row is None:
                continue
            if row[0] > lim.max_entries_per_peer:
                raise OutboxFull(
                    f"outbox holds {row[0]} > max_entries_per_peer={lim.max_entries_per_peer} for {name} "
                    "(offline?); retry after it drains",
                    limit="max_entries_per_peer", peer_device=name)
            if row[1] > lim.max_bytes_per_peer:
                raise OutboxFull(
                    f"outbox holds {row[1]} bytes > max_bytes_per_peer={lim.max_bytes_per_peer} for {name} "
                    "(offline?); retry after it drains",
                    limit="max_bytes_per_peer", peer_device=name)

    def mark_attempt(self, msg_id: bytes, next_due_ms: int) -> int | None:
        """Count one send attempt and schedule the next; returns the attempt count, or None if the entry is gone.

        The count and the due time are plain columns (scheduling metadata), so this does not re-seal the record.
        """
        with self._db.write("recording a send attempt") as conn:
            k = self._k(msg_id)
            row = conn.execute("UPDATE outbox SET due_at_ms = ?, attempts = attempts + 1 WHERE k = ? "
                               "RETURNING attempts", (int(next_due_ms), k)).fetchone()
            return None if row is None else int(row[0])

    def mark_attempts(self, msg_ids: Iterable[bytes], next_due_ms: int) -> int:
        """`mark_attempt` for a batch sent in one frame, in one statement; returns how many entries existed."""
        keys = [(int(next_due_ms), self._k(m)) for m in msg_ids]
        with self._db.write("recording send attempts") as conn:
            return conn.executemany("UPDATE outbox SET due_at_ms = ?, attempts = attempts + 1 WHERE k = ?",
                                    keys).rowcount

    def release_unsent(self, now_ms: int) -> int:
        """Make every entry never sent due now (at start-up: entries a previous run stored due later because it
        meant to send them from memory). Returns how many."""
        with self._db.write("releasing unsent messages") as conn:
            return conn.execute("UPDATE outbox SET due_at_ms = ? WHERE attempts = 0 AND due_at_ms > ?",
                                (int(now_ms), int(now_ms))).rowcount

    def existing(self, msg_ids: Iterable[bytes]) -> set[bytes]:
        """The ids among `msg_ids` still in the outbox (one query per 500 ids)."""
        with self._db.read("reading outbound message ids") as conn:
            return keys_present(conn, "outbox", {self._k(m): m for m in msg_ids})

    def reschedule_peer(self, peer_device: str, due_at_ms: int) -> int:
        """Make every entry for a peer due at `due_at_ms` (e.g. now, when it comes back online)."""
        with self._db.write("rescheduling a peer's messages") as conn:
            sql = "UPDATE outbox SET due_at_ms = ? WHERE peer = ?"
            return conn.execute(sql, (int(due_at_ms), self._peer(peer_device))).rowcount

    def delete(self, msg_id: bytes) -> bool:
        """Remove an acknowledged entry; False if it was not there (a duplicate ack)."""
        return self.delete_many([msg_id]) == 1

    def delete_many(self, msg_ids: Iterable[bytes]) -> int:
        """Remove acknowledged entries in one transaction; returns how many existed."""
        keys = [(self._k(m),) for m in msg_ids]
        if not keys:
            return 0
        with self._db.write("deleting acknowledged messages") as conn:
            return conn.executemany("DELETE FROM outbox WHERE k = ?", keys).rowcount

    def expire(self, now_ms: int) -> list[OutboxEntry]:
        """Remove and return entries whose expiry is at or before `now_ms` (the caller may tell the sender)."""
        with self._db.write("expiring outbound messages") as conn:
            rows = conn.execute(
                "SELECT k, expires_at_ms, due_at_ms, v, attempts FROM outbox WHERE expires_at_ms <= ? ORDER BY seq",
                (now_ms,),
            ).fetchall()
            out = [self._entry(r[0], r[1], r[2], r[3], r[4]) for r in rows]
            conn.executemany("DELETE FROM outbox WHERE k = ?", [(r[0],) for r in rows])
            return out

    def purge_peer(self, peer_device: str) -> int:
        """Remove every entry for a peer (data-subject erasure); returns the count."""
        with self._db.write("purging a peer's messages") as conn:
            return conn.execute("DELETE FROM outbox WHERE peer = ?", (self._peer(peer_device),)).rowcount

    # -- reading -------------------------------------------------------------------------------------------------
    def due(self, now_ms: int, limit: int = 64, peer_device: str | None = None,
            max_bytes: int | None = None, except_peers: Iterable[str] = ()) -> list[OutboxEntry]:
        """Unexpired entries due by `now_ms`, oldest first, at most `limit` and (when given) about `max_bytes` of
        messages: rows are read until the budget is passed (always at least one), so a backlog of large
        messages is not all in memory at once. `except_peers`: leave out these peers' entries (not unsealed)."""
        sql = ("SELECT k, expires_at_ms, due_at_ms, v, attempts, size FROM outbox "
               "WHERE due_at_ms <= ? AND expires_at_ms > ?")
        args: list[object] = [now_ms, now_ms]
        if peer_device is not None:
            sql += " AND peer = ?"
            args.append(self._peer(peer_device))
        skip = [self._peer(p) for p in except_peers]
        if 0 < len(skip) <= 500:  # (more: read them all, the caller skips them)
            sql += f" AND peer NOT IN ({','.join('?' * len(skip))})"
            args += skip
        sql += " ORDER BY seq LIMIT ?"
        args.append(int(limit))
        out: list[OutboxEntry] = []
        total = 0
        with self._db.read("reading due messages") as conn:
            for r in conn.execute(sql, args):
                out.append(self._entry(r[0], r[1], r[2], r[3], r[4]))
                total += int(r[5])
                if max_bytes is not None and total >= max_bytes:
                    break
        return out

    def get(self, msg_id: bytes) -> OutboxEntry | None:
        k = self._k(msg_id)
        with self._db.read("reading an outbound message") as conn:
            row = conn.execute("SELECT expires_at_ms, due_at_ms, v, attempts FROM outbox WHERE k = ?",
                               (k,)).fetchone()
            return None if row is None else self._entry(k, row[0], row[1], row[2], row[3])

    def entries(self, peer_device: str | None = None) -> list[OutboxEntry]:
        """Every entry (or a peer's), oldest first: for export."""
        sql = "SELECT k, expires_at_ms, due_at_ms, v, attempts FROM outbox"
        args: Sequence[object] = ()
        if peer_device is not None:
            sql += " WHERE peer = ?"
            args = (self._peer(peer_device),)
        with self._db.read("reading the outbox") as conn:
            return [self._entry(r[0], r[1], r[2], r[3], r[4]) for r in conn.execute(sql + " ORDER BY seq", args)]

    def usage(self, peer_device: str | None = None) -> tuple[int, int]:
        """(entries, record bytes) in total or for one peer."""
        with self._db.read("measuring the outbox") as conn:
            if peer_device is None:
                row = conn.execute("SELECT COALESCE(SUM(n), 0), COALESCE(SUM(bytes), 0) FROM outbox_usage").fetchone()
            else:
                row = conn.execute(
                    "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(bytes), 0) FROM outbox_usage WHERE peer = ?",
                    (self._peer(peer_device),),
                ).fetchone()
            return int(row[0]), int(row[1])

    def depth(self, peer_device: str | None = None) -> int:
        """Number of queued entries, in total or for one peer."""
        return self.usage(peer_device)[0]
