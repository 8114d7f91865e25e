"""`Store`: the gateway's encrypted local store, one object over one SQLite file.

Open it with the hardware storage key; it unwraps the data key once and never calls the hardware again on the
per-message path. Parts are attributes (`outbox`, `delivered`, `sessions`, `secrets`, `peers`, `consent`,
`audit`); the methods named in the design (mark_delivered, put_secret, verify_audit, export, purge_peer, stats,
rewrap, ...) are also on `Store` itself. Thread-safe: one connection behind one re-entrant lock. Use
`with store.transaction():` to make several calls one atomic, durable commit.

Every write returns only after fsync (WAL, synchronous=FULL): from asyncio, call the store through
`asyncio.to_thread` (or one executor thread) so the event loop is not blocked by the disk.
"""

from __future__ import annotations

import base64
import contextlib
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hsm.api import StorageKey
from hsm.errors import UnwrapFailed

from .audit import AuditLog, initialise_audit, now_ms
from .consent import Consent, split_peer
from .crypto import Keyring, new_dek
from .db import Database
from .errors import InvalidRecord, StoreCorrupt, StoreKeyMismatch
from .outbox import Outbox, OutboxLimits
from .records import DeliveredIds, KeyedBlobs, Peers

EXPORT_FORMAT = "agw-store-export/1"


def _redact(uri: str) -> str:
    return re.sub(r"[?&;]pin-value=[^&;]*", "", uri)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What `agw status` shows about the store."""

    outbox_depth: int
    outbox_bytes: int
    pending_consent: int
    peers: int
    sessions: int
    delivered_ids: int
    audit_entries: int
    db_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Store:
    """The encrypted store. Make one with `Store.open`; close it with `close()` (or use it as a context manager)."""

    def __init__(self, db: Database, keys: Keyring, storage_key: StorageKey, limits: OutboxLimits) -> None:
        self._db = db
        self._keys = keys
        self._storage_key = storage_key
        self.path = db.path
        self.audit = AuditLog(db, keys)
        self.outbox = Outbox(db, keys, limits)
        self.delivered = DeliveredIds(db, keys)
        self.sessions = KeyedBlobs(db, keys, "sessions")
        self.secrets = KeyedBlobs(db, keys, "secrets")
        self.inbox = KeyedBlobs(db, keys, "inbox")  # received, acknowledged, not yet handed to the broker
        self.peers = Peers(db, keys)
        self.consent = Consent(db, keys, self.audit)

    # -- life cycle ----------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str, storage_key: StorageKey, *, limits: OutboxLimits | None = None,
             max_db_bytes: int | None = None, create: bool = True,
             on_upgrade: Callable[[int, int], None] | None = None) -> Store:
        """Open the store at `path`, creating it (with a fresh random data key) if the file does not exist.

        A provisioned device should pass `create=False`: then a deleted store file is an error, not a fresh start.
        `on_upgrade(from, to)` is called (in this thread) before an older store's schema is upgraded.

        Raises `StoreCorrupt` for a damaged, truncated or foreign file, `StoreKeyMismatch` if `storage_key` cannot
        unwrap the data key, `StoreLocked` if another process has it open. Hardware errors from the storage key
        (token absent, TPM unreachable) propagate unchanged so the caller can retry.
        """

        def initialise(conn: sqlite3.Connection) -> None:
            dek = new_dek()
            keys = Keyring(dek)
            meta = {
                "dek_wrapped": storage_key.wrap(dek),
                "dek_check": keys.check_value,
                "key_uri": _redact(storage_key.uri).encode(),
                "created_ms": str(now_ms()).encode(),
            }
            conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", list(meta.items()))
            initialise_audit(conn, keys)

        db, _created = Database.open(Path(path), initialise, create=create, on_upgrade=on_upgrade)
        try:
            with db.read("reading the store's key") as conn:
                meta = dict(conn.execute("SELECT name, value FROM meta WHERE name IN ('dek_wrapped', 'dek_check')"))
            if not isinstance(meta.get("dek_wrapped"), bytes) or not isinstance(meta.get("dek_check"), bytes):
                raise StoreCorrupt(f"store {path} has no wrapped data key; restore a backup")
            try:
                dek = storage_key.unwrap(meta["dek_wrapped"])
            except UnwrapFailed as exc:
                raise StoreKeyMismatch(
                    f"storage key {_redact(storage_key.uri)} cannot unwrap the data key of store {path} "
                    f"(it was wrapped by {cls._uri_on_disk(db)}): configure the right key, or restore the token"
                ) from exc
            keys = Keyring(dek)
            if not keys.matches(meta["dek_check"]):
                raise StoreKeyMismatch(
                    f"storage key {_redact(storage_key.uri)} unwrapped a data key that is not the one of store {path}: "
                    "configure the right key"
                )
            store = cls(db, keys, storage_key, limits or OutboxLimits())
            if max_db_bytes is not None:
                db.set_max_bytes(max_db_bytes)
            return store
        except BaseException:
            db.close()
            raise

    @staticmethod
    def _uri_on_disk(db: Database) -> str:
        with db.read("reading the store's key uri") as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = 'key_uri'").fetchone()
        return "an unknown key" if row is None else bytes(row[0]).decode(errors="replace")

    @property
    def key_uri_on_disk(self) -> str:
        """The (redacted) URI of the storage key that wraps the data key, as recorded in the store."""
        return self._uri_on_disk(self._db)

    def rewrap(self, new_storage_key: StorageKey) -> None:
        """Wrap the same data key under a new storage key (rotation). Nothing is re-encrypted, nothing is lost.

        The new wrap is unwrapped again and compared before it replaces the old one, in one transaction.
        """
        dek = self._keys.dek
        wrapped = new_storage_key.wrap(dek)
        if new_storage_key.unwrap(wrapped) != dek:
            raise StoreKeyMismatch(f"storage key {_redact(new_storage_key.uri)} does not give back what it wrapped")
        old_uri = self.key_uri_on_disk
        new_uri = _redact(new_storage_key.uri)
        with self._db.write("re-wrapping the data key") as conn:
            conn.execute("UPDATE meta SET value = ? WHERE name = 'dek_wrapped'", (wrapped,))
            conn.execute("UPDATE meta SET value = ? WHERE name = 'key_uri'", (new_uri.encode(),))
            self.audit.append({"type": "store.rewrapped", "from": old_uri, "to": new_uri})
        self._storage_key = new_storage_key

    def close(self) -> None:
        """Close the file and release the lock. Safe to call twice."""
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Store]:
        """Group calls into one atomic commit (e.g. mark delivered + audit); nests (the outermost decides).

        `durable=False` skips the fsync: the commit survives a crash of the process but not a power loss. Use it
        only for state whose loss costs a retry, never for what gates an acknowledgement.
        """
        with self._db.write("running a transaction", durable=durable):
            yield self

    def on_rollback(self, fn: Callable[[], None]) -> None:
        """Inside `transaction`: call `fn` if it rolls back, so state kept in memory beside the store follows it."""
        self._db.on_rollback(fn)

    def set_max_bytes(self, max_bytes: int | None) -> int:
        """Cap the database size (None: no cap); writes past it raise `StoreFull`. Returns the cap in bytes."""
        return self._db.set_max_bytes(max_bytes)

    def checkpoint(self) -> None:
        """Fold the WAL into the main file and truncate it (after purges, so old records leave the WAL)."""
        self._db.checkpoint()

    # -- the design's named operations ---------------------------------------------------------------------------
    def mark_delivered(self, msg_id: bytes, now_ms: int) -> bool:
        """False if `msg_id` was already delivered (drop the duplicate)."""
        return self.delivered.mark(msg_id, now_ms)

    def prune_delivered(self, older_than_ms: int) -> int:
        return self.delivered.prune(older_than_ms)

    def put_secret(self, name: str, value: bytes) -> None:
        self.secrets.put(name, value)

    def get_secret(self, name: str) -> bytes | None:
        return self.secrets.get(name)

    def delete_secret(self, name: str) -> bool:
        return self.secrets.delete(name)

    def verify_audit(self) -> tuple[bool, int | None]:
        return self.audit.verify()

    def prune_audit(self, older_than_ms: int) -> int:
        return self.audit.prune(older_than_ms)

    def stats(self) -> StoreStats:
        with self._db.read("collecting store statistics") as conn:
            depth, size = self.outbox.usage()
            audit_n = int(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0])
            return StoreStats(
                outbox_depth=depth, outbox_bytes=size, pending_consent=self.consent.pending_count(),
                peers=self.peers.count(), sessions=self.sessions.count(), delivered_ids=self.delivered.count(),
                audit_entries=audit_n, db_bytes=self._db.size_bytes(),
            )

    def export(self, peer: str | None = None) -> dict[str, Any]:
        """A decrypted, JSON-ready view of what the store holds (about one peer device, or everything).

        For data-subject requests. Key material is never exported: sessions appear by size, secrets not at all.
        Delivered ids are stored blinded and can only be counted.
        """
        with self._db.read("exporting the store"):
            out: dict[str, Any] = {"format": EXPORT_FORMAT, "peer": peer}
            out["outbox"] = [
                {"msg_id": e.msg_id.hex(), "peer_device": e.peer_device, "record_b64": _b64(e.record),
                 "expires_at_ms": e.expires_at_ms, "attempts": e.attempts}
                for e in self.outbox.entries(peer)
            ]
            peers = self.peers.entries() if peer is None else [p for p in [self.peers.get(peer)] if p is not None]
            out["peers"] = [{"device": p.device, "credential_b64": _b64(p.credential), "last_seen_ms": p.last_seen_ms}
                            for p in peers]
            sessions = self.sessions.items()
            out["sessions"] = [{"peer_device": n, "state_bytes": len(v)} for n, v in sessions
                               if peer is None or n == peer]
            out["consent"] = [
                {"local_agent": c.local_agent, "peer": c.peer, "state": c.state.value, "updated_ms": c.updated_ms,
                 "held_message_b64": _b64(c.held_message)}
                for c in self.consent.entries(peer_device=peer)
            ]
            out["audit"] = [{"index": a.index, "at_ms": a.at_ms, "event": a.event} for a in self.audit.entries()
                            if peer is None or _mentions(a.event, peer)]
            if peer is None:
                out["delivered_ids"] = self.delivered.count()
            return out

    def purge_peer(self, peer_device: str) -> dict[str, int]:
        """Erase everything held about a peer device (outbox, session, peer record, consent) in one transaction.

        Audit entries stay (the chain must verify) until pruned by age; the purge itself is audited. Call
        `checkpoint()` afterwards to push the old pages out of the WAL.
        """
        with self._db.write("purging a peer"):
            counts = {
                "outbox": self.outbox.purge_peer(peer_device),
                "sessions": int(self.sessions.delete(peer_device)),
                "peers": int(self.peers.delete(peer_device)),
                "consent": self.consent.purge_peer(peer_device),
                "inbox": sum(self.inbox.delete(name) for name, _ in self.inbox.items()
                             if name.startswith(peer_device + "/")),
            }
            self.audit.append({"type": "store.purged", "peer": peer_device, "removed": counts})
            return counts


def _mentions(obj: Any, device: str) -> bool:
    """Whether an audit event names `device`, as a device id, a `device/agent` id or a SPIFFE id."""
    if isinstance(obj, str):
        if obj == device:
            return True
        with contextlib.suppress(InvalidRecord):
            if split_peer(obj)[0] == device:
                return True
        return f"/device/{device}/" in obj + "/"
    if isinstance(obj, dict):
        return any(_mentions(v, device) for v in obj.values())
    if isinstance(obj, list):
        return any(_mentions(v, device) for v in obj)
    return False
