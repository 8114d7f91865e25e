"""Consent: which peer agents each local agent accepts messages from.

Per (local agent, peer "device/agent") the state is allowed, denied or pending. First contact from an unknown
peer becomes a pending request that holds the first message, so approval can deliver it. Every change is
appended to the audit log in the same transaction as the change itself: there is no consent change without its
audit entry, and no audit entry for a change that did not happen.

Crash safety of the held message: `allow` returns it but keeps it; the caller delivers it and then calls
`release`. After a crash in between, `held()` lists allowed entries whose message was never released (and the
delivered-id set stops a second delivery if the caller records ids).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .audit import AuditLog
from .codec import expect, pack, unpack
from .crypto import Keyring
from .db import Database
from .errors import InvalidRecord, StoreCorrupt

TABLE = "consent"


class ConsentState(enum.StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class ConsentEntry:
    local_agent: str
    peer: str
    state: ConsentState
    updated_ms: int
    held_message: bytes | None


def split_peer(peer: str) -> tuple[str, str]:
    """`device/agent` -> (device, agent); both parts must be non-empty."""
    device, sep, agent = peer.partition("/") if isinstance(peer, str) else ("", "", "")
    if not sep or not device or not agent:
        raise InvalidRecord(f"peer ids are written 'device/agent', got {peer!r}")
    return device, agent


class Consent:
    """The consent table, auditing every change."""

    def __init__(self, db: Database, keys: Keyring, audit: AuditLog) -> None:
        self._db = db
        self._keys = keys
        self._audit = audit

    def _k(self, local_agent: str, peer: str) -> bytes:
        if not isinstance(local_agent, str) or not local_agent:
            raise InvalidRecord("local agent names are non-empty strings")
        split_peer(peer)
        return self._keys.blind(TABLE, pack((local_agent, peer)))

    def _peer_k(self, device: str) -> bytes:
        return self._keys.blind("consent.peer", device)

    def _decode(self, k: bytes, blob: bytes) -> ConsentEntry:
        agent, peer, state, updated, held = expect(
            unpack(self._keys.open(TABLE, k, blob)), (str, str, str, int, (bytes, type(None)))
        )
        try:
            st = ConsentState(state)
        except ValueError:
            raise StoreCorrupt("a consent record holds an unknown state: restore a backup") from None
        return ConsentEntry(agent, peer, st, updated, held)

    def _write(self, entry: ConsentEntry) -> None:
        k = self._k(entry.local_agent, entry.peer)
        fields = (entry.local_agent, entry.peer, entry.state.value, entry.updated_ms, entry.held_message)
        blob = self._keys.seal(TABLE, k, pack(fields))
        with self._db.write("writing consent") as conn:
            conn.execute(
                "INSERT INTO consent (k, peer, v) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                (k, self._peer_k(split_peer(entry.peer)[0]), blob),
            )

    # -- reading -------------------------------------------------------------------------------------------------
    def get(self, local_agent: str, peer: str) -> ConsentEntry | None:
        k = self._k(local_agent, peer)
        with self._db.read("reading consent") as conn:
            row = conn.execute("SELECT v FROM consent WHERE k = ?", (k,)).fetchone()
            return None if row is None else self._decode(k, row[0])

    def state(self, local_agent: str, peer: str) -> ConsentState | None:
        entry = self.get(local_agent, peer)
        return None if entry is None else entry.state

    def is_allowed(self, local_agent: str, peer: str) -> bool:
        return self.state(local_agent, peer) is ConsentState.ALLOWED

    def entries(self, local_agent: str | None = None, state: ConsentState | None = None,
                peer_device: str | None = None) -> list[ConsentEntry]:
        """Entries (what `agw consent list` shows), optionally filtered, sorted by (local agent, peer)."""
        sql, args = "SELECT k, v FROM consent", tuple[bytes, ...]()
        if peer_device is not None:
            sql, args = sql + " WHERE peer = ?", (self._peer_k(peer_device),)
        with self._db.read("listing consent") as conn:
            rows = conn.execute(sql, args).fetchall()
            entries = [self._decode(r[0], r[1]) for r in rows]
        return sorted(
            (e for e in entries
             if (local_agent is None or e.local_agent == local_agent) and (state is None or e.state is state)),
            key=lambda e: (e.local_agent, e.peer),
        )

    def held(self) -> list[ConsentEntry]:
        """Allowed entries whose held first message was never released (deliver these after a restart)."""
        return [e for e in self.entries(state=ConsentState.ALLOWED) if e.held_message is not None]

    def pending_count(self) -> int:
        return len(self.entries(state=ConsentState.PENDING))

    # -- changing ------------------------------------------------------------------------------------------------
    def request(self, local_agent: str, peer: str, first_message: bytes, now_ms: int) -> ConsentState:
        """First contact: create a pending request holding `first_message`; returns the state now in force.

        An already pending request keeps its original message; allowed and denied entries are left as they are.
        """
        if not isinstance(first_message, bytes):
            raise InvalidRecord("the held message is bytes")
        with self._db.write("recording a consent request"):
            current = self.get(local_agent, peer)
            if current is not None:
                return current.state
            self._write(ConsentEntry(local_agent, peer, ConsentState.PENDING, now_ms, first_message))
            self._audit.append({"type": "consent.requested", "agent": local_agent, "peer": peer,
                                "held_bytes": len(first_message)}, now_ms)
            return ConsentState.PENDING

    def set(
        self, local_agent: str, peer: str, state: ConsentState, now_ms: int, *, by: str = "operator"
    ) -> ConsentEntry:
        """Set the state (audited); returns the new entry. Denying drops a held message; allowing keeps it."""
        try:
            state = ConsentState(state)
        except ValueError:
            raise InvalidRecord(f"consent states are {', '.join(s.value for s in ConsentState)}") from None
        with self._db.write("changing consent"):
            current = self.get(local_agent, peer)
            held = current.held_message if current is not None and state is not ConsentState.DENIED else None
            entry = ConsentEntry(local_agent, peer, state, now_ms, held)
            self._write(entry)
            self._audit.append({"type": "consent.changed", "agent": local_agent, "peer": peer, "by": by,
                                "from": None if current is None else current.state.value, "to": state.value}, now_ms)
            return entry

    def allow(self, local_agent: str, peer: str, now_ms: int, *, by: str = "operator") -> bytes | None:
        """Allow; returns the held first message (if any) to deliver, then call `release`."""
        return self.set(local_agent, peer, ConsentState.ALLOWED, now_ms, by=by).held_message

    def deny(self, local_agent: str, peer: str, now_ms: int, *, by: str = "operator") -> None:
        self.set(local_agent, peer, ConsentState.DENIED, now_ms, by=by)

    def revoke(self, local_agent: str, peer: str, now_ms: int, *, by: str = "operator") -> ConsentState | None:
        """Withdraw consent at once (state becomes denied); returns the previous state."""
        with self._db.write("revoking consent"):
            before = self.state(local_agent, peer)
            self.set(local_agent, peer, ConsentState.DENIED, now_ms, by=by)
            return before

    def release(self, local_agent: str, peer: str) -> bool:
        """Drop the held message once it has been delivered; False if there was none."""
        with self._db.write("releasing a held message"):
            current = self.get(local_agent, peer)
            if current is None or current.held_message is None:
                return False
            self._write(ConsentEntry(current.local_agent, current.peer, current.state, current.updated_ms, None))
            return True

    def forget(self, local_agent: str, peer: str, now_ms: int, *, by: str = "operator") -> bool:
        """Delete the entry entirely (the next contact is a new request); audited."""
        with self._db.write("forgetting consent") as conn:
            gone = conn.execute("DELETE FROM consent WHERE k = ?", (self._k(local_agent, peer),)).rowcount == 1
            if gone:
                self._audit.append({"type": "consent.forgotten", "agent": local_agent, "peer": peer, "by": by}, now_ms)
            return gone

    def purge_peer(self, peer_device: str) -> int:
        """Delete every entry naming this device (data-subject erasure); the caller audits the purge."""
        with self._db.write("purging a peer's consent") as conn:
            return conn.execute("DELETE FROM consent WHERE peer = ?", (self._peer_k(peer_device),)).rowcount
