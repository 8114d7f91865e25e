"""The outbox: messages accepted from local agents and not yet acknowledged end to end by the peer gateway.

A message is written here (durably, in a group commit) before the broker is acknowledged, retried until the
peer's encrypted ack deletes it, and dropped at its expiry. Limits are explicit, as in Greengrass's spooler:
when a batch would exceed one, the whole batch is refused with `OutboxFull` and nothing of it is stored, so the
caller simply does not acknowledge the broker and the agent's MQTT client retries later.

Row layout: `k` = blind(msg id), `peer` = blind(peer device), plaintext `size`/`expires_at_ms`/`due_at_ms`
(needed by SQL for limits, expiry and scheduling), and the sealed tuple (msg id, peer device, record, expiry,
attempts). The sealed expiry is authoritative; a plaintext copy that disagrees is reported as corruption.

Usage (entries and record bytes, per peer and in total) is counted in memory: loaded with one aggregate query
when the store opens, changed by every write here (deletes report what they removed with RETURNING) and put back
if the transaction rolls back (`Database.on_rollback`). The store's file lock keeps other processes out, so
nothing else changes the rows meanwhile.
"""

from __future__ import annotations

import functools
import sqlite3
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .codec import expect, pack, unpack
from .crypto import Keyring
from .db import Database, in_lists, keys_present
from .errors import InvalidRecord, OutboxFull, StoreCorrupt

MSG_ID_BYTES = 16
TABLE = "outbox"
DUE_BY_INDEX = 2048  # `due`: up to this many rows due, read them through the due index (see there)
# Row keys of the messages this process stored, kept until their row is deleted (at most this many): the ACK's
# delete (and the attempt marks) then need no HMAC per id. The sender has ~HANDOVER_ENTRIES + a send window of
# messages between storing and the ACK, more than the keyring's memo of recent ids holds.
LIVE_KEYS = 8192


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


class OutboxEntry(NamedTuple):
    """One queued message as the link layer sees it. (A named tuple, not a frozen dataclass: one is built per
    message handed over or read back, and a tuple is built in a quarter of the time.)"""

    msg_id: bytes
    peer_device: str
    record: bytes
    expires_at_ms: int
    attempts: int
    due_at_ms: int


OutboxItem = tuple[bytes, str, bytes, int]


def _take(quota: dict[bytes, int], peer: bytes) -> bool:
    """Count one entry of `peer` against its quota, if it has one; False once that quota is used up."""
    left = quota.get(peer)
    if left is None:
        return True
    if left <= 0:
        return False
    quota[peer] = left - 1
    return True


# Parts of a sealed row's plaintext, `pack((msg_id, peer_device, record, expires, attempts))` (see `put_many`).
_MSG_ID_FIELD = pack((bytes(MSG_ID_BYTES),))[:-MSG_ID_BYTES]
_RECORD_HEAD = struct.Struct(">BI")
_TAIL = struct.Struct(">BqBq")
INSERT_ROWS = 128  # rows per INSERT statement at most (7 values each: within SQLite's oldest limit of 999)


def _statement_sizes(n: int) -> list[int]:
    """Split `n` rows into statements of INSERT_ROWS and then powers of two: few statements per batch, and few
    distinct ones (each is prepared once and kept in the connection's statement cache)."""
    out = [INSERT_ROWS] * (n // INSERT_ROWS)
    n %= INSERT_ROWS
    bit = INSERT_ROWS
    while n:
        bit >>= 1
        if n & bit:
            out.append(bit)
            n -= bit
    return out


@functools.cache
def _insert_sql(rows: int) -> str:
    return ("INSERT OR IGNORE INTO outbox (k, peer, size, expires_at_ms, due_at_ms, attempts, v) VALUES "  # noqa: S608
            + ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * rows))


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
        # Bumped when rows change other than by the sender's own bookkeeping (rescheduled, purged): a sender that
        # holds entries in memory checks it before trusting that their rows are as it stored them.
        self.epoch = 0
        self._usage: dict[bytes, list[int]] = {}  # blind(peer) -> [entries, record bytes]
        self._live_keys: dict[bytes, bytes] = {}  # msg id -> its row key, for rows stored here (see LIVE_KEYS)
        self._total = [0, 0]
        with db.read("measuring the outbox") as conn:
            for peer, n, size in conn.execute("SELECT peer, COUNT(*), SUM(size) FROM outbox GROUP BY peer"):
                self._usage[peer] = [int(n), int(size)]
                self._total[0] += int(n)
                self._total[1] += int(size)

    def _apply(self, deltas: dict[bytes, list[int]]) -> None:
        for peer, (dn, dsize) in deltas.items():
            u = self._usage.setdefault(peer, [0, 0])
            u[0] += dn
            u[1] += dsize
            self._total[0] += dn
            self._total[1] += dsize
            if u[0] <= 0:
                del self._usage[peer]

    def _count(self, deltas: dict[bytes, list[int]]) -> None:
        """Change the usage counts by per-peer [entries, bytes], and back if the transaction rolls back."""
        if deltas:
            self._apply(deltas)
            self._db.on_rollback(lambda: self._apply({p: [-dn, -ds] for p, (dn, ds) in deltas.items()}))

    def _delete_keys(self, conn: sqlite3.Connection, keys: Sequence[bytes]) -> int:
        """Delete rows by key, one statement per 512 keys; returns how many existed."""
        deltas: dict[bytes, list[int]] = {}
        n = 0
        for marks, chunk in in_lists(keys):
            sql = f"DELETE FROM outbox WHERE k IN ({marks}) RETURNING peer, size"  # noqa: S608
            for peer, size in conn.execute(sql, chunk).fetchall():
                d = deltas.setdefault(peer, [0, 0])
                d[0] -= 1
                d[1] -= int(size)
                n += 1
        self._count(deltas)
        return n

    def _k(self, msg_id: bytes) -> bytes:
        k = self._live_keys.get(msg_id) if type(msg_id) is bytes else None
        return k if k is not None else self._keys.blind("outbox.msg", check_msg_id(msg_id), memo=False)

    def _k_leaving(self, msg_id: bytes) -> bytes:
        """`_k` for a row being deleted: its key leaves the live keys. (If the deletion rolls back, the key is
        computed again when needed: the mapping is a pure function of the id.)"""
        k = self._live_keys.pop(msg_id, None) if type(msg_id) is bytes else None
        return k if k is not None else self._keys.blind("outbox.msg", check_msg_id(msg_id), memo=False)

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
    def put_many(self, items: Iterable[OutboxItem], due_at_ms: int = 0, attempts: int = 0) -> int:
        """Store a batch in one transaction (one fsync). Returns how many were new; known ids are left unchanged.

        `due_at_ms`: when `due` first returns the entries (0: at once). `attempts`: sends already counted. A
        sender that keeps the batch in memory and sends it from there at once stores it due later with its first
        attempt counted, so `due` does not read it back and the first send needs no `mark_attempts` (see
        `release_unsent`). Raises `OutboxFull` (nothing stored) if a limit would be exceeded, `StoreFull` if the
        disk is full.
        """
        peers: dict[bytes, str] = {}
        fields: dict[str, tuple[bytes, bytes]] = {}  # peer device -> (blind key, its packed field)
        max_record = self.limits.max_record_bytes
        live = self._live_keys
        due, tries = int(due_at_ms), int(attempts)
        rows = items if isinstance(items, list) else list(items)
        ids: list[bytes] = []
        sizes: dict[bytes, list[int]] = {}  # blind peer -> [rows, record bytes] of this batch
        for msg_id, peer_device, record, expires_at_ms in rows:  # every row checked before anything is written
            got = fields.get(peer_device)
            if got is None:
                if not isinstance(peer_device, str) or not peer_device:
                    raise InvalidRecord("peer_device must be a non-empty string")
                got = fields[peer_device] = (self._peer(peer_device), pack((peer_device,)))
                peers[got[0]] = peer_device
                sizes[got[0]] = [0, 0]
            if not isinstance(record, bytes):
                raise InvalidRecord("records are bytes")
            n = len(record)
            if n > max_record:
                raise OutboxFull(
                    f"record of {n} bytes exceeds max_record_bytes={max_record}; "
                    "it cannot be queued (send smaller messages)",
                    limit="max_record_bytes",
                    peer_device=peer_device,
                )
            if type(msg_id) is not bytes or len(msg_id) != MSG_ID_BYTES:
                check_msg_id(msg_id)  # (raises, unless a bytes subclass of the right length)
            int(expires_at_ms)  # (raises for a non-number)
            ids.append(msg_id)
            tally = sizes[got[0]]
            tally[0] += 1
            tally[1] += n
        if not ids:
            return 0
        join, head, tail = b"".join, _RECORD_HEAD.pack, _TAIL.pack
        keys: list[bytes] = []
        with self._db.write("storing outbound messages") as conn:
            added = 0
            i = 0
            # A few multi-row INSERTs, not one step per row; each statement's rows are sealed just before it, so
            # only one statement's plaintexts and sealed copies (128 rows at most) exist at a time, not the whole
            # batch's (issue 7: ~0.4 MB of short-lived copies per 512 messages of 256 B, at the sender's peak).
            # The row keys and seals: the same bytes as `blind(..., memo=False)` and `seal` per row (tests
            # compare), with one HMAC state lookup and one nonce draw per statement.
            for count in _statement_sizes(len(ids)):
                chunk = rows[i:i + count]
                chunk_keys = self._keys.blind_many("outbox.msg", ids[i:i + count])
                keys += chunk_keys
                # = pack((msg_id, peer_device, record, expires, 0)), built from parts (a test compares the two)
                blobs = self._keys.seal_many(TABLE, chunk_keys, [
                    join((_MSG_ID_FIELD, msg_id, fields[peer_device][1], head(2, len(record)), record,
                          tail(1, int(expires), 1, 0)))
                    for msg_id, peer_device, record, expires in chunk])
                values: list[object] = []  # the INSERT's parameters, row after row (7 per row)
                for k, (_, peer_device, record, expires), blob in zip(chunk_keys, chunk, blobs, strict=True):
                    values += (k, fields[peer_device][0], len(record), int(expires), due, tries, blob)
                del blobs
                added += conn.execute(_insert_sql(count), values).rowcount
                del values  # (before the next statement's copies are made)
                i += count
            deltas: dict[bytes, list[int]] = {}
            if added == len(ids):
                deltas = sizes
            elif added:  # some ids were known: count these peers' rows again (rare)
                sql = (f"SELECT peer, COUNT(*), SUM(size) FROM outbox WHERE peer IN ({','.join('?' * len(peers))}) "  # noqa: S608
                       "GROUP BY peer")
                for peer, n, size in conn.execute(sql, list(peers)):
                    old = self._usage.get(peer, [0, 0])
                    deltas[peer] = [int(n) - old[0], int(size) - old[1]]
            self._count(deltas)
            self._check_limits(peers)
            # Only keys of rows stored (not of a batch refused or rolled back: they would fill the cache for good).
            room = max(0, LIVE_KEYS - len(live))
            if room:
                kept = list(zip(ids[:room], keys[:room], strict=True))
                live.update(kept)
                self._db.on_rollback(lambda: [live.pop(m, None) for m, _ in kept])
        return added

    def put(self, msg_id: bytes, peer_device: str, record: bytes, expires_at_ms: int) -> bool:
        """Store one message; True if it was new."""
        return self.put_many([(msg_id, peer_device, record, expires_at_ms)]) == 1

    def _check_limits(self, peers: dict[bytes, str]) -> None:
        lim = self.limits
        n, size = self._total
        if n > lim.max_entries:
            raise OutboxFull(f"outbox holds {n} > max_entries={lim.max_entries}; retry after deliveries drain",
                             limit="max_entries")
        if size > lim.max_bytes:
            raise OutboxFull(f"outbox holds {size} bytes > max_bytes={lim.max_bytes}; retry after deliveries drain",
                             limit="max_bytes")
        for peer, name in peers.items():
            row = self._usage.get(peer)
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

    def mark_attempts(self, msg_ids: Iterable[bytes], next_due_ms: int, *, count: bool = True) -> int:
        """`mark_attempt` for a batch sent in one frame, one statement per 512 ids; returns how many entries
        existed. `count=False`: only reschedule (the attempt was counted when the entry was stored)."""
        keys = [self._k(m) for m in msg_ids]
        sets = "due_at_ms = ?, attempts = attempts + 1" if count else "due_at_ms = ?"
        n = 0
        with self._db.write("recording send attempts") as conn:
            for marks, chunk in in_lists(keys):
                sql = f"UPDATE outbox SET {sets} WHERE k IN ({marks})"  # noqa: S608
                n += conn.execute(sql, [int(next_due_ms), *chunk]).rowcount
        return n

    def release_unsent(self, now_ms: int) -> int:
        """Make due now every entry sent at most once and not yet due (at start-up: entries a previous run
        stored due later, their first attempt counted, because it meant to send them from memory; whether it
        did is not known, and a second copy is only a duplicate the receiver drops). Returns how many."""
        self.epoch += 1  # (a batch handed over before this ran must not trust its rows' due time)
        with self._db.write("releasing unsent messages") as conn:
            return conn.execute("UPDATE outbox SET due_at_ms = ? WHERE attempts <= 1 AND due_at_ms > ?",
                                (int(now_ms), int(now_ms))).rowcount

    def existing(self, msg_ids: Iterable[bytes]) -> set[bytes]:
        """The ids among `msg_ids` still in the outbox (one query per 512 ids)."""
        with self._db.read("reading outbound message ids") as conn:
            return keys_present(conn, "outbox", {self._k(m): m for m in msg_ids})

    def reschedule_peer(self, peer_device: str, due_at_ms: int) -> int:
        """Make every entry for a peer due at `due_at_ms` (e.g. now, when it comes back online)."""
        self.epoch += 1
        with self._db.write("rescheduling a peer's messages") as conn:
            sql = "UPDATE outbox SET due_at_ms = ? WHERE peer = ?"
            return conn.execute(sql, (int(due_at_ms), self._peer(peer_device))).rowcount

    def delete(self, msg_id: bytes) -> bool:
        """Remove an acknowledged entry; False if it was not there (a duplicate ack)."""
        return self.delete_many([msg_id]) == 1

    def delete_many(self, msg_ids: Iterable[bytes]) -> int:
        """Remove acknowledged entries in one transaction (one statement per 512); returns how many existed."""
        keys = [self._k_leaving(m) for m in msg_ids]
        if not keys:
            return 0
        with self._db.write("deleting acknowledged messages") as conn:
            return self._delete_keys(conn, keys)

    def expire(self, now_ms: int) -> list[OutboxEntry]:
        """Remove and return entries whose expiry is at or before `now_ms` (the caller may tell the sender)."""
        with self._db.write("expiring outbound messages") as conn:
            rows = conn.execute(
                "SELECT k, expires_at_ms, due_at_ms, v, attempts FROM outbox WHERE expires_at_ms <= ? ORDER BY seq",
                (now_ms,),
            ).fetchall()
            out = [self._entry(r[0], r[1], r[2], r[3], r[4]) for r in rows]
            self._delete_keys(conn, [r[0] for r in rows])
            for e in out:
                self._live_keys.pop(e.msg_id, None)
            return out

    def purge_peer(self, peer_device: str) -> int:
        """Remove every entry for a peer (data-subject erasure); returns the count."""
        self.epoch += 1
        peer = self._peer(peer_device)
        self._live_keys.clear()  # (its ids are not known without unsealing its rows: the keys come back as needed)
        with self._db.write("purging a peer's messages") as conn:
            n = conn.execute("DELETE FROM outbox WHERE peer = ?", (peer,)).rowcount
            u = self._usage.get(peer)
            if u is not None:
                self._count({peer: [-u[0], -u[1]]})
            return n

    # -- reading -------------------------------------------------------------------------------------------------
    def due(self, now_ms: int, limit: int = 64, peer_device: str | None = None,
            max_bytes: int | None = None, except_peers: Iterable[str] = (),
            peer_limits: Mapping[str, int] | None = None) -> list[OutboxEntry]:
        """Unexpired entries due by `now_ms`, oldest first, at most `limit` and (when given) about `max_bytes` of
        messages: rows are read until the budget is passed (always at least one), so a backlog of large
        messages is not all in memory at once. `except_peers`: leave out these peers' entries (not unsealed).
        `peer_limits`: at most this many entries of these peers (a sender's room in a peer's send window). The
        rest of such a peer's due rows are not unsealed, nor counted towards `limit`: a slow peer at the head of
        a long backlog does not keep the other peers' rows out of a pass. (Past 500 `except_peers`, those peers' rows
        are read, and count towards `limit`, for the caller to skip.)

        How: the rows due are counted on the due index first (stopping past DUE_BY_INDEX). None: no read. A few
        (the usual case while most rows wait for an answer or are held in memory by the sender): their seq and
        size are read through the due index, sorted here, and the rows fetched in that order until the budget is
        passed (SQLite would otherwise read every due row in full and sort them, blobs and all, before returning
        the first). Many: read in queue order, which stops after `limit` (SQLite's own choice, a scan by seq,
        reads every row not yet due before the first due one); a peer whose quota is used up is left out of the
        rest of the read (one more query per such peer)."""
        where = "due_at_ms <= ? AND expires_at_ms > ?"
        args: list[object] = [now_ms, now_ms]
        if peer_device is not None:
            where += " AND peer = ?"
            args.append(self._peer(peer_device))
        skip = [self._peer(p) for p in except_peers]
        if 0 < len(skip) <= 500:  # (more: read them all, the caller skips them)
            where += f" AND peer NOT IN ({','.join('?' * len(skip))})"
            args += skip
        quota = {self._peer(p): n for p, n in peer_limits.items()} if peer_limits else {}
        out: list[OutboxEntry] = []
        total = 0
        cols = "k, expires_at_ms, due_at_ms, v, attempts, size, peer"
        with self._db.read("reading due messages") as conn:
            n_due = conn.execute("SELECT COUNT(*) FROM (SELECT 1 FROM outbox WHERE due_at_ms <= ? LIMIT ?)",
                                 (now_ms, DUE_BY_INDEX + 1)).fetchone()[0]
            if not n_due:
                return []
            if n_due <= DUE_BY_INDEX:
                picked = sorted(conn.execute(
                    f"SELECT seq, size, peer FROM outbox INDEXED BY outbox_by_due WHERE {where}", args))  # noqa: S608
                seqs: list[int] = []
                for seq, size, peer in picked:
                    if len(seqs) >= limit:
                        break
                    if quota and not _take(quota, peer):
                        continue
                    seqs.append(seq)
                    total += int(size)
                    if max_bytes is not None and total >= max_bytes:
                        break
                rows = []
                for marks, chunk in in_lists(seqs):
                    rows += conn.execute(f"SELECT {cols} FROM outbox WHERE seq IN ({marks}) "  # noqa: S608
                                         "ORDER BY seq", chunk).fetchall()
                return [self._entry(r[0], r[1], r[2], r[3], r[4]) for r in rows]
            # In queue order. A peer whose quota runs out leaves the query (read again from the next row), so
            # its further rows neither count towards `limit` nor keep the other peers' rows out of this pass.
            after, full = -1, list[bytes]()
            while len(out) < limit:
                cut = f" AND peer NOT IN ({','.join('?' * len(full))})" if full else ""
                rows = conn.execute(f"SELECT {cols}, seq FROM outbox WHERE {where} AND seq > ?{cut} "  # noqa: S608
                                    "ORDER BY seq LIMIT ?", [*args, after, *full, int(limit - len(out))]).fetchall()
                for r in rows:
                    after = r[7]
                    if quota and not _take(quota, r[6]):
                        full.append(r[6])
                        break  # (read again without this peer)
                    out.append(self._entry(r[0], r[1], r[2], r[3], r[4]))
                    total += int(r[5])
                    if max_bytes is not None and total >= max_bytes:
                        return out
                else:
                    return out  # every due row read (or `limit` reached)
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
        with self._db.read("measuring the outbox"):  # (the lock: not halfway through another thread's write)
            row = self._total if peer_device is None else self._usage.get(self._peer(peer_device), [0, 0])
            return row[0], row[1]

    def depth(self, peer_device: str | None = None) -> int:
        """Number of queued entries, in total or for one peer."""
        return self.usage(peer_device)[0]
