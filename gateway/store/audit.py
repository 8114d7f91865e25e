"""The tamper-evident audit log: consent changes, rejected messages, key events.

Entry i is the canonical JSON of {"i": i, "t": at_ms, "e": event}; its MAC is
HMAC-SHA256(audit_key, mac[i-1] || json_i), starting from 32 zero bytes. The JSON is stored sealed (AES-GCM bound
to the index, because events name peers); the MAC is stored beside it. Two MACed marks live in the meta table:
- the head (last index and MAC), updated with every append, so deleting entries from the end is detected;
- the anchor (index and MAC of the last pruned entry), so pruning old entries leaves a verifiable chain.
Editing, deleting, reordering or inserting an entry breaks the chain at that index (`check`). Limitation:
someone who can write the file could roll the whole store back to an older copy of itself; only an external
monotonic counter (e.g. TPM NV) would catch that.
"""

from __future__ import annotations

import hmac
import json
import sqlite3
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .codec import canonical_json
from .crypto import MAC_BYTES, Keyring
from .db import Database
from .errors import InvalidRecord, StoreCorrupt

TABLE = "audit"
_HEAD = "audit_head"
_ANCHOR = "audit_anchor"
_GENESIS = bytes(MAC_BYTES)
_IDX = struct.Struct(">Q")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class AuditEntry:
    index: int
    at_ms: int
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditCheck:
    """Result of verifying the chain; `first_bad_index` is the first entry that is missing, altered or foreign."""

    ok: bool
    first_bad_index: int | None
    reason: str
    entries: int


def _mark_blob(keys: Keyring, name: str, idx: int, mac: bytes) -> bytes:
    body = _IDX.pack(idx) + mac
    return body + keys.audit_mac(name.encode(), body)


def _write_mark(conn: sqlite3.Connection, keys: Keyring, name: str, idx: int, mac: bytes) -> None:
    conn.execute(
        "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, _mark_blob(keys, name, idx, mac)),
    )


def _read_mark(conn: sqlite3.Connection, keys: Keyring, name: str) -> tuple[int, bytes] | None:
    """The mark, or None if it is missing or its MAC is wrong."""
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    if row is None or not isinstance(row[0], bytes) or len(row[0]) != 8 + 2 * MAC_BYTES:
        return None
    blob: bytes = row[0]
    idx: int = _IDX.unpack_from(blob)[0]
    mac = blob[8 : 8 + MAC_BYTES]
    if not hmac.compare_digest(_mark_blob(keys, name, idx, mac), blob):
        return None
    return idx, mac


def initialise_audit(conn: sqlite3.Connection, keys: Keyring) -> None:
    """Write the empty chain's marks when a store is created (a missing mark later means tampering)."""
    _write_mark(conn, keys, _HEAD, 0, _GENESIS)
    _write_mark(conn, keys, _ANCHOR, 0, _GENESIS)


class AuditLog:
    """Append-only, MAC-chained, encrypted log."""

    def __init__(self, db: Database, keys: Keyring) -> None:
        self._db = db
        self._keys = keys

    # -- appending -----------------------------------------------------------------------------------------------
    def append(self, event: Mapping[str, Any], at_ms: int | None = None) -> int:
        """Append one event (plain JSON data) and return its index. Joins the caller's transaction if any."""
        if not isinstance(event, Mapping):
            raise InvalidRecord("an audit event is a mapping of plain JSON data")
        t = now_ms() if at_ms is None else int(at_ms)
        with self._db.write("appending to the audit log") as conn:
            head = _read_mark(conn, self._keys, _HEAD)
            if head is None:
                raise StoreCorrupt("the audit log head is missing or forged; run `agw audit verify` and investigate")
            idx = head[0] + 1
            body = canonical_json({"i": idx, "t": t, "e": dict(event)})
            mac = self._keys.audit_mac(head[1], body)
            conn.execute(
                "INSERT INTO audit (idx, at_ms, v, mac) VALUES (?, ?, ?, ?)",
                (idx, t, self._keys.seal(TABLE, _IDX.pack(idx), body), mac),
            )
            _write_mark(conn, self._keys, _HEAD, idx, mac)
            return idx

    # -- reading and verifying -----------------------------------------------------------------------------------
    def _decode(self, idx: int, at_ms: int, blob: bytes) -> tuple[bytes, AuditEntry]:
        body = self._keys.open(TABLE, _IDX.pack(idx), blob)
        try:
            obj = json.loads(body)
        except ValueError:
            raise StoreCorrupt(f"audit entry {idx} does not decode: restore a backup") from None
        if not isinstance(obj, dict) or (obj.get("i"), obj.get("t")) != (idx, at_ms) or type(obj.get("e")) is not dict:
            raise StoreCorrupt(f"audit entry {idx} disagrees with its row: the file was tampered with")
        return body, AuditEntry(idx, at_ms, obj["e"])

    def entries(self) -> list[AuditEntry]:
        """Every retained entry, decrypted, oldest first (raises `StoreCorrupt` on a record that fails to open)."""
        with self._db.read("reading the audit log") as conn:
            rows = conn.execute("SELECT idx, at_ms, v FROM audit ORDER BY idx").fetchall()
            return [self._decode(r[0], r[1], r[2])[1] for r in rows]

    def check(self) -> AuditCheck:
        """Verify the whole chain from the anchor to the head."""
        with self._db.read("verifying the audit log") as conn:
            anchor = _read_mark(conn, self._keys, _ANCHOR)
            head = _read_mark(conn, self._keys, _HEAD)
            if anchor is None:
                return AuditCheck(False, 1, "the anchor mark is missing or forged", 0)
            expected, prev = anchor[0] + 1, anchor[1]
            count = 0
            for idx, at_ms, blob, mac in conn.execute("SELECT idx, at_ms, v, mac FROM audit ORDER BY idx"):
                if idx != expected:
                    why = "missing (deleted)" if idx > expected else "before the anchor (inserted)"
                    return AuditCheck(False, min(idx, expected), f"entry {min(idx, expected)} is {why}", count)
                try:
                    body, _ = self._decode(idx, at_ms, blob)
                except StoreCorrupt:
                    return AuditCheck(False, idx, f"entry {idx} fails decryption or disagrees with its row", count)
                if not isinstance(mac, bytes) or not hmac.compare_digest(self._keys.audit_mac(prev, body), mac):
                    why = f"entry {idx} breaks the MAC chain (edited, moved or inserted)"
                    return AuditCheck(False, idx, why, count)
                prev = mac
                expected += 1
                count += 1
            if head is None:
                return AuditCheck(False, expected, "the head mark is missing or forged", count)
            if head != (expected - 1, prev):
                bad = min(head[0], expected - 1) + 1
                return AuditCheck(False, bad, f"the chain ends at {expected - 1} but the head says {head[0]}", count)
            return AuditCheck(True, None, "ok", count)

    def verify(self) -> tuple[bool, int | None]:
        """(ok, first bad index or None): what `agw audit verify` reports."""
        result = self.check()
        return result.ok, result.first_bad_index

    def prune(self, older_than_ms: int) -> int:
        """Drop the oldest entries stamped before `older_than_ms`, moving the anchor; returns how many went.

        Refuses (StoreCorrupt) if the chain does not verify: evidence of tampering is never pruned away. The prune
        itself is logged as an entry.
        """
        with self._db.write("pruning the audit log") as conn:
            result = self.check()
            if not result.ok:
                raise StoreCorrupt(f"audit log does not verify ({result.reason}); not pruning: investigate first")
            last: tuple[int, bytes] | None = None
            count = 0
            for idx, at_ms, mac in conn.execute("SELECT idx, at_ms, mac FROM audit ORDER BY idx"):
                if at_ms >= older_than_ms:
                    break
                last = (idx, mac)
                count += 1
            if last is None:
                return 0
            _write_mark(conn, self._keys, _ANCHOR, last[0], last[1])
            conn.execute("DELETE FROM audit WHERE idx <= ?", (last[0],))
            self.append({"type": "audit.pruned", "through": last[0], "count": count})
            return count
