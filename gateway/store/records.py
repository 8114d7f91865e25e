"""Small keyed tables: delivered message ids, pairwise sessions, named secrets and known peers.

Each row key is a blind index of the identifier (see `crypto`), each value is sealed to its (table, key), and
the identifier itself is inside the sealed value where it must be listed or exported.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Collection
from dataclasses import dataclass

from .codec import expect, pack, pack_name_value, unpack, wipe_bytes
from .crypto import Keyring
from .db import Database, in_lists
from .errors import InvalidRecord
from .outbox import check_msg_id

# Blob parameters are bound as `bytearray`: Python's sqlite3 passes int, float, str and bytearray parameters
# straight through but looks every `bytes` one up in its adapter registry first (a tuple key, a dict lookup, two
# attribute lookups): ~0.3 us per parameter against ~0.1 us for the copy, on the receiver's per-message rows
# (bench/receiver_store_micro.py). SQLite stores and compares them as the same BLOB.
_blob = bytearray
# `KeyedBlobs.put_many` seals this many rows at a time: only their plaintexts and sealed copies exist besides the
# rows (a frame of 512 inbox rows of 256 B messages: ~0.4 MB of short-lived copies at once otherwise).
SEAL_CHUNK = 32


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRecord(f"{what} must be a non-empty string")
    return value


class DeliveredIds:
    """Message ids already handed to a local agent, so a redelivered message is dropped, across restarts.

    Stores only a blind index and the time (for pruning). Prune only ids older than the longest time a peer may
    retry (the outbox expiry): anything older would be rejected by the protocol layer anyway.

    Three tables (schema version 6), an id always in exactly one of them, whatever the moment of a crash:
    - `delivered_recent`: new ids, in rowid order: a frame's ids fill one or two pages, where inserting them into
      a table keyed by the blind id (i.e. in random order) dirtied a page per id, each written to the WAL by the
      frame's fsync'd commit. It has no index: its keys are also held here in a set (read back at open), which
      the lookups consult first and which follows every write, rollback included: at most `RECENT_MAX` keys (or
      one larger batch), ~56 bytes each and a 128 KiB hash table, so ~0.38 MB at most (tracemalloc; past ~4,900
      keys Python's set table would grow to 512 KiB).
    - `delivered_mid`, keyed by the blind id: every `FOLD_AT` ids `fold` moves the recent ids into it in key
      order, in one transaction (insert, then delete). It holds a few ten thousand ids at most, so a fold touches
      at most a few hundred pages.
    - `delivered`, keyed by the blind id: every id, once `delivered_mid` holds `MID_MAX`, is moved there by a
      round of merge steps, each one transaction that moves the next `MERGE_SLICE` ids (or more: `_merge_step`)
      in key order (insert, then delete of that key range): each page of `delivered` is written about once per
      round instead of once per id (version 4) or per fold of 4,096 ids (version 5), and no step holds the store
      for long (docs/performance.md, 2026-12-07, branch `fold7`). The round's position is kept in memory only:
      after a restart a round starts again from the lowest key, and the ranges already moved are empty.
    """

    FOLD_AT = 4096  # ids in `delivered_recent` from which `fold_due` (the receiver folds between frames, or the
    # daemon's maintenance tick when the receiver makes no steps: gateway/receiving.py `_fold_idle`)
    RECENT_MAX = 4608  # a write that would leave more in `delivered_recent` folds first (the set's bound)
    MID_MAX = 32768  # ids in `delivered_mid` from which a round of merge steps into `delivered` starts
    MERGE_SLICE = 512  # ids of `delivered_mid` moved into `delivered` per merge step (at least: see `_merge_step`)

    def __init__(self, db: Database, keys: Keyring) -> None:
        self._db = db
        self._keys = keys
        with db.read("reading recent delivered message ids") as conn:
            self._recent: set[bytes] = {bytes(r[0]) for r in conn.execute("SELECT k FROM delivered_recent")}
            mid = int(conn.execute("SELECT COUNT(*) FROM delivered_mid").fetchone()[0])
        # The next key of `delivered_mid` a merge step moves into `delivered`; None: no round under way.
        self._merge_from: bytes | None = b"" if mid >= self.MID_MAX else None
        self._marked = 0  # ids marked since the last merge step (sizes the next one)
        # Counts what can add rows to `delivered_mid` or `delivered`: folds, merge steps, and rollbacks (of a fold,
        # or of a prune seen by a lookup inside its transaction). `_absent` holds only while this is unchanged.
        self._epoch = 0
        # The keys `seen_many` last looked up in `delivered_mid` and `delivered` and did not find, and the epoch of
        # that look: a `mark_many` of them right after needs no second look (only folds and merges add rows there).
        self._absent: tuple[int, set[bytes]] = (-1, set())

    def _k(self, msg_id: bytes) -> bytes:
        return self._keys.blind("delivered", check_msg_id(msg_id))

    @property
    def fold_due(self) -> bool:
        """Whether `fold` has work: `delivered_recent` holds `FOLD_AT` ids or more, or a round of merge steps is
        under way. Call it outside a transaction, between frames, so its page writes are not in a frame's fsync'd
        commit."""
        return len(self._recent) >= self.FOLD_AT or self._merge_from is not None

    def mark(self, msg_id: bytes, now_ms: int) -> bool:
        """Record a delivery; False if this id was already recorded (a duplicate: do not deliver it again)."""
        return self.mark_many([msg_id], now_ms, [self._k(msg_id)]) == 1

    def keys(self, msg_ids: list[bytes]) -> list[bytes]:
        """The row keys of `msg_ids` (the ids checked, the domain's HMAC state looked up once), for a caller that
        looks ids up and then marks them (`seen_many`, `mark_many` with `keys=`): each key computed once."""
        for m in msg_ids:
            check_msg_id(m)
        return self._keys.blind_many("delivered", msg_ids)

    def mark_many(self, msg_ids: list[bytes], now_ms: int, keys: list[bytes] | None = None) -> int:
        """`mark` for a batch in one statement; returns how many ids were new (an id already recorded, in any
        table, or twice in the batch, is recorded once). `keys`: `keys(msg_ids)`, if the caller has them."""
        if keys is None:
            keys = [self._k(m) for m in msg_ids]
        elif len(keys) != len(msg_ids):
            raise ValueError("one key per message id")
        if not keys:
            return 0
        with self._db.write("recording delivered message ids") as conn:
            recent = self._recent
            epoch, absent = self._absent
            self._absent = (-1, set())
            fresh = [k for k in dict.fromkeys(keys) if k not in recent]
            unknown = fresh if epoch != self._epoch else [k for k in fresh if k not in absent]
            if unknown:
                old = _present_stored(conn, unknown)
                if old:
                    fresh = [k for k in fresh if k not in old]
            if not fresh:
                return 0
            if len(recent) + len(fresh) > self.RECENT_MAX:  # (nobody folded: the set's bound, in this write)
                self._fold(conn)
                recent = self._recent
            # Into the set before the rows (a failed insert leaves the set a superset until the rollback, never
            # a subset: a lookup may not miss a stored id), out of it again if the transaction rolls back.
            recent.update(fresh)
            self._db.on_rollback(functools.partial(self._forget_recent, recent, fresh))
            conn.executemany("INSERT INTO delivered_recent (k, at_ms) VALUES (?, ?)",
                             [(_blob(k), now_ms) for k in fresh])
            self._marked += len(fresh)  # (not taken back on a rollback: it only sizes the next merge step)
            return len(fresh)

    def _forget_recent(self, recent: set[bytes], keys: list[bytes]) -> None:
        recent.difference_update(keys)

    def fold(self) -> int:
        """One step, in a transaction of its own; returns how many ids it moved. If `delivered_recent` holds
        `FOLD_AT` ids or more, or no round of merge steps is under way: move them all into `delivered_mid`, in key
        order. Otherwise: the round's next merge step (`MERGE_SLICE` ids or more of `delivered_mid` into `delivered`).
        Not fsynced: a power cut before the next durable commit undoes the whole step (the tables as before it),
        never a part of it."""
        with self._db.write("folding recent delivered message ids", durable=False) as conn:
            if len(self._recent) >= self.FOLD_AT or self._merge_from is None:
                return self._fold(conn)
            return self._merge_step(conn, self._merge_from)

    def _fold(self, conn: sqlite3.Connection) -> int:
        n = conn.execute("INSERT OR IGNORE INTO delivered_mid (k, at_ms) "
                         "SELECT k, at_ms FROM delivered_recent ORDER BY k").rowcount
        conn.execute("DELETE FROM delivered_recent")
        old, self._recent = self._recent, set()
        self._epoch += 1
        self._db.on_rollback(functools.partial(self._restore_recent, old))
        if self._merge_from is None and n > 0 and \
                conn.execute("SELECT COUNT(*) FROM delivered_mid").fetchone()[0] >= self.MID_MAX:
            self._merge_from, self._marked = b"", 0  # a round starts (taken back if this transaction rolls back)
            self._db.on_rollback(functools.partial(self._merge_at, None))
        return int(n)

    def _merge_step(self, conn: sqlite3.Connection, lo: bytes) -> int:
        """Move the next ids of `delivered_mid` from key `lo` on into `delivered` (the rest, if fewer: the round
        ends), in key order, then delete that key range: contiguous in both tables. As many as `MERGE_SLICE`, or
        twice the ids marked since the last step if more (at most 8 times as many): the receiver makes one step
        per frame, so a round keeps ahead of the ids coming in whatever the frames' size, and `delivered_mid`
        stays near `MID_MAX`."""
        size = min(max(self.MERGE_SLICE, 2 * self._marked), 8 * self.MERGE_SLICE)
        self._marked = 0
        row = conn.execute("SELECT k FROM delivered_mid WHERE k >= ? ORDER BY k LIMIT 1 OFFSET ?",
                           (lo, size)).fetchone()
        if row is None:  # the last step of the round: every id from `lo` on
            n = conn.execute("INSERT OR IGNORE INTO delivered (k, at_ms) "
                             "SELECT k, at_ms FROM delivered_mid WHERE k >= ? ORDER BY k", (lo,)).rowcount
            conn.execute("DELETE FROM delivered_mid WHERE k >= ?", (lo,))
            nxt = None
        else:
            nxt = bytes(row[0])
            n = conn.execute("INSERT OR IGNORE INTO delivered (k, at_ms) "
                             "SELECT k, at_ms FROM delivered_mid WHERE k >= ? AND k < ? ORDER BY k",
                             (lo, nxt)).rowcount
            conn.execute("DELETE FROM delivered_mid WHERE k >= ? AND k < ?", (lo, nxt))
        self._merge_from = nxt
        self._epoch += 1
        self._db.on_rollback(functools.partial(self._merge_at, lo))
        return int(n)

    def _merge_at(self, lo: bytes | None) -> None:
        self._merge_from = lo
        self._new_epoch()

    def _restore_recent(self, old: set[bytes]) -> None:
        self._recent = old
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._epoch += 1

    def seen(self, msg_id: bytes) -> bool:
        k = self._k(msg_id)
        with self._db.read("reading delivered message ids") as conn:
            if k in self._recent:
                return True
            return bool(_present_stored(conn, [k]))

    def seen_many(self, msg_ids: list[bytes], keys: list[bytes] | None = None) -> set[bytes]:
        """The ids among `msg_ids` already recorded: the recent ids from the set, the others one query per 512
        ids (a relay frame's worth at once). `keys`: `keys(msg_ids)`, if the caller has them."""
        if keys is None:
            keyed = {self._k(m): m for m in msg_ids}
        elif len(keys) != len(msg_ids):
            raise ValueError("one key per message id")
        else:
            keyed = dict(zip(keys, msg_ids, strict=True))
        with self._db.read("reading delivered message ids") as conn:
            recent = self._recent
            found = {m for k, m in keyed.items() if k in recent}
            rest = [k for k in keyed if k not in recent] if found else list(keyed)
            old = _present_stored(conn, rest)
            found.update(keyed[k] for k in old)
            self._absent = (self._epoch, {k for k in rest if k not in old})
        return found

    PRUNE_SLICES = 256

    def prune(self, older_than_ms: int) -> int:
        """Forget ids recorded before `older_than_ms`; returns how many. One statement over each whole table (no
        index on the time since schema version 4): the daemon prunes `prune_slice` by slice instead."""
        with self._db.write("pruning delivered message ids") as conn:
            n = sum(conn.execute(f"DELETE FROM {t} WHERE at_ms < ?", (older_than_ms,)).rowcount  # noqa: S608
                    for t in _STORED)
            self._db.on_rollback(self._new_epoch)  # (a rollback puts the rows back: `_absent` no longer holds)
            return int(n) + self._prune_recent(conn, older_than_ms)

    def _prune_recent(self, conn: sqlite3.Connection, older_than_ms: int) -> int:
        gone = [bytes(r[0]) for r in conn.execute("DELETE FROM delivered_recent WHERE at_ms < ? RETURNING k",
                                                  (older_than_ms,)).fetchall()]
        if gone:
            recent = self._recent
            recent.difference_update(gone)
            self._db.on_rollback(functools.partial(recent.update, gone))
        return len(gone)

    def prune_slice(self, older_than_ms: int, i: int) -> int:
        """`prune` for the ids whose blind key starts with byte `i` (0..255): a 256th of `delivered` and of
        `delivered_mid`, found by key, so the hourly prune of ~30 days of ids never holds the store (and the event
        loop) for a whole scan; slice 0 also prunes `delivered_recent` (a few thousand rows at most, scanned). Not
        fsynced: a prune lost to a power cut is done again an hour later."""
        if not 0 <= i < self.PRUNE_SLICES:
            raise ValueError(f"prune slices are 0..{self.PRUNE_SLICES - 1}, not {i}")
        with self._db.write("pruning delivered message ids", durable=False) as conn:
            n = 0
            for t in _STORED:
                if i == self.PRUNE_SLICES - 1:
                    sql, args = f"DELETE FROM {t} WHERE k >= ? AND at_ms < ?", (bytes([i]), older_than_ms)  # noqa: S608
                else:
                    sql = f"DELETE FROM {t} WHERE k >= ? AND k < ? AND at_ms < ?"  # noqa: S608
                    args = (bytes([i]), bytes([i + 1]), older_than_ms)
                n += int(conn.execute(sql, args).rowcount)
            self._db.on_rollback(self._new_epoch)
            return n + (self._prune_recent(conn, older_than_ms) if i == 0 else 0)

    def count(self) -> int:
        with self._db.read("counting delivered message ids") as conn:
            return int(conn.execute("SELECT (SELECT COUNT(*) FROM delivered) + (SELECT COUNT(*) FROM delivered_mid) "
                                    "+ (SELECT COUNT(*) FROM delivered_recent)").fetchone()[0])


_STORED = ("delivered_mid", "delivered")  # the delivered ids' tables keyed by the blind id (`delivered_recent` is not)


class KeyedBlobs:
    """Opaque sealed bytes under a string name: one table per use (pairwise sessions, secrets)."""

    def __init__(self, db: Database, keys: Keyring, table: str) -> None:
        self._db = db
        self._keys = keys
        self._table = table

    def _k(self, name: str) -> bytes:
        return self._keys.blind(self._table, _check_name(name, "a name"))

    def on_rollback(self, fn: Callable[[], None]) -> None:
        """Inside a write transaction: call `fn` if it rolls back (for a cache kept beside these records)."""
        self._db.on_rollback(fn)

    def put(self, name: str, value: bytes, *, secret: bool = False) -> None:
        """Insert or replace (a fresh nonce every time). `secret`: the packed plaintext is overwritten once
        sealed, so the value (e.g. session state with message keys) is not left in freed memory."""
        if not isinstance(value, bytes):
            raise InvalidRecord("values are bytes")
        k = self._k(name)
        plaintext = pack((name, value))
        blob = self._keys.seal(self._table, k, plaintext)
        if secret:
            wipe_bytes(plaintext)
        with self._db.write(f"writing {self._table}") as conn:
            conn.execute(
                f"INSERT INTO {self._table} (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",  # noqa: S608
                (k, blob),
            )

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """`put` for several names in one statement: the same rows (keys, sealed values), every item checked before
        anything is computed, the names' keys through the memo in one pass (`Keyring.blind_names`), the seals with
        one nonce draw (`Keyring.seal_many`). (The receiver's inbox rows: ~8% of its CPU, one per message.)"""
        items = items if isinstance(items, list) else list(items)
        names = []
        for name, value in items:
            if not isinstance(value, bytes):
                raise InvalidRecord("values are bytes")
            names.append(_check_name(name, "a name"))
        if not names:
            return
        keys = self._keys.blind_names(self._table, names)
        rows = []
        for i in range(0, len(items), SEAL_CHUNK):  # (a chunk's plaintexts and seals at a time, not the batch's)
            chunk = keys[i:i + SEAL_CHUNK]
            plain = [pack_name_value(n, v) for n, v in items[i:i + SEAL_CHUNK]]
            blobs = self._keys.seal_many(self._table, chunk, plain)
            del plain
            rows += [(_blob(k), _blob(b)) for k, b in zip(chunk, blobs, strict=True)]
            del blobs
        with self._db.write(f"writing {self._table}") as conn:
            conn.executemany(
                f"INSERT INTO {self._table} (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",  # noqa: S608
                rows,
            )

    def update_many(self, items: list[tuple[str, bytes]]) -> int:
        """Replace the values of names that exist, in one statement (names that are gone stay gone: no get
        first); returns how many existed."""
        rows = []
        for name, value in items:
            if not isinstance(value, bytes):
                raise InvalidRecord("values are bytes")
            k = self._k(name)
            rows.append((self._keys.seal(self._table, k, pack((name, value))), k))
        if not rows:
            return 0
        with self._db.write(f"writing {self._table}") as conn:
            return conn.executemany(f"UPDATE {self._table} SET v = ? WHERE k = ?", rows).rowcount  # noqa: S608

    def get(self, name: str) -> bytes | None:
        k = self._k(name)
        with self._db.read(f"reading {self._table}") as conn:
            row = conn.execute(f"SELECT v FROM {self._table} WHERE k = ?", (k,)).fetchone()  # noqa: S608
            if row is None:
                return None
            _, value = expect(unpack(self._keys.open(self._table, k, row[0])), (str, bytes))
            return bytes(value)

    def delete(self, name: str) -> bool:
        with self._db.write(f"deleting from {self._table}") as conn:
            return conn.execute(f"DELETE FROM {self._table} WHERE k = ?", (self._k(name),)).rowcount == 1  # noqa: S608

    def delete_many(self, names: list[str]) -> int:
        """`delete` for several names, one statement per 512 names; returns how many existed."""
        keys = [_blob(self._k(n)) for n in names]
        n = 0
        with self._db.write(f"deleting from {self._table}") as conn:
            for marks, chunk in in_lists(keys):
                sql = f"DELETE FROM {self._table} WHERE k IN ({marks})"  # noqa: S608
                n += conn.execute(sql, chunk).rowcount
        return n

    def items(self, skip: Collection[str] = ()) -> list[tuple[str, bytes]]:
        """Every (name, value), decrypted, sorted by name; but the names in `skip`, left sealed (a row's key is
        compared, not its value opened: the receiver's 1 s inbox re-read skips the entries being published)."""
        skipped = {self._k(n) for n in skip}
        with self._db.read(f"reading {self._table}") as conn:
            rows = conn.execute(f"SELECT k, v FROM {self._table}").fetchall()  # noqa: S608
            out = [expect(unpack(self._keys.open(self._table, r[0], r[1])), (str, bytes)) for r in rows
                   if r[0] not in skipped]
            return sorted((str(n), bytes(v)) for n, v in out)

    def count(self) -> int:
        with self._db.read(f"counting {self._table}") as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM {self._table}").fetchone()[0])  # noqa: S608


@dataclass(frozen=True, slots=True)
class Peer:
    """A known peer device: its credential (certificate chain bytes) and when it was last heard from."""

    device: str
    credential: bytes
    last_seen_ms: int


class Peers:
    """Known peer devices. Everything, including last-seen times, is sealed."""

    TABLE = "peers"

    def __init__(self, db: Database, keys: Keyring) -> None:
        self._db = db
        self._keys = keys

    def _k(self, device: str) -> bytes:
        return self._keys.blind(self.TABLE, _check_name(device, "a peer device id"))

    def _decode(self, k: bytes, blob: bytes) -> Peer:
        device, credential, last_seen = expect(unpack(self._keys.open(self.TABLE, k, blob)), (str, bytes, int))
        return Peer(device, credential, last_seen)

    def put(self, device: str, credential: bytes, last_seen_ms: int) -> None:
        if not isinstance(credential, bytes):
            raise InvalidRecord("peer credentials are bytes")
        k = self._k(device)
        blob = self._keys.seal(self.TABLE, k, pack((device, credential, int(last_seen_ms))))
        with self._db.write("writing a peer") as conn:
            conn.execute(
                "INSERT INTO peers (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v", (k, blob)
            )

    def get(self, device: str) -> Peer | None:
        k = self._k(device)
        with self._db.read("reading a peer") as conn:
            row = conn.execute("SELECT v FROM peers WHERE k = ?", (k,)).fetchone()
            return None if row is None else self._decode(k, row[0])

    def touch(self, device: str, now_ms: int) -> bool:
        """Update last-seen (never backwards); False if the peer is unknown."""
        with self._db.write("updating a peer's last-seen time"):
            peer = self.get(device)
            if peer is None:
                return False
            if now_ms > peer.last_seen_ms:
                self.put(device, peer.credential, now_ms)
            return True

    def delete(self, device: str) -> bool:
        with self._db.write("deleting a peer") as conn:
            return conn.execute("DELETE FROM peers WHERE k = ?", (self._k(device),)).rowcount == 1

    def entries(self) -> list[Peer]:
        with self._db.read("listing peers") as conn:
            rows = conn.execute("SELECT k, v FROM peers").fetchall()
            return sorted((self._decode(r[0], r[1]) for r in rows), key=lambda p: p.device)

    def count(self) -> int:
        with self._db.read("counting peers") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM peers").fetchone()[0])


@functools.cache
def _present_sql(n: int) -> str:
    marks = ",".join(f"?{i}" for i in range(1, n + 1))  # (numbered: each key bound once, used in both tables)
    return (f"SELECT k FROM delivered_mid WHERE k IN ({marks}) "  # noqa: S608
            f"UNION ALL SELECT k FROM delivered WHERE k IN ({marks})")


def _present_stored(conn: sqlite3.Connection, keys: list[bytes]) -> set[bytes]:
    """The keys among `keys` that are rows of `delivered_mid` or `delivered`: one query per 512."""
    found: set[bytes] = set()
    for _, chunk in in_lists([_blob(k) for k in keys]):
        found.update(bytes(row[0]) for row in conn.execute(_present_sql(len(chunk)), chunk))
    return found

