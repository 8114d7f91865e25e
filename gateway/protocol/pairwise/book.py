"""All pairwise sessions of one device, and the rules for choosing between them.

A device can hold several sessions with one peer: both sides may open one at the same moment, and every
delegated-key rotation opens new ones. The rules (docs/protocol.md ("Pairwise"), section 7): receive on any held
session by its id; a setup (PREKEY) message for an unknown id makes a new session; send on the newest session
with the peer that can still encrypt; keep at most `max_sessions_per_peer`, dropping the oldest.

Sans-I/O like the rest: the book says which sessions changed (and whether the prekey store did) and the caller
persists them.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from gateway.protocol.pairwise.crypto import MessageSigner, RandomSource, VerifyCredential
from gateway.protocol.pairwise.errors import PairwiseUsageError, UnknownSessionError
from gateway.protocol.pairwise.prekeys import PrekeyBundle, PrekeyStore
from gateway.protocol.pairwise.session import DEFAULT_LIMITS, PairwiseSession, RatchetLimits
from gateway.protocol.pairwise.wire import DEFAULT_MAX_MESSAGE_SIZE, PairwiseMessage


class NoSessionError(PairwiseUsageError):
    """No session with this peer can send: fetch the peer's prekey bundle and call `SessionBook.open`."""


@dataclass(frozen=True, slots=True)
class Received:
    plaintext: bytes
    session: PairwiseSession  # changed: persist it
    new_session: bool  # True: the prekey store changed too; persist both in one transaction
    dropped: tuple[bytes, ...] = ()  # ids of sessions removed to stay within the per-peer bound


@dataclass(frozen=True, slots=True)
class Sent:
    wire: bytes
    session: PairwiseSession  # changed: persist it before handing `wire` to the link


class SessionBook:
    """Sessions by id and by peer, with this device's keys and prekeys."""

    def __init__(
        self,
        *,
        local_device_id: str,
        credential: bytes,
        signer: MessageSigner,
        prekeys: PrekeyStore,
        verify_credential: VerifyCredential,
        max_sessions_per_peer: int = 4,
        limits: RatchetLimits = DEFAULT_LIMITS,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        random: RandomSource = os.urandom,
    ) -> None:
        if max_sessions_per_peer < 1:
            raise ValueError("max_sessions_per_peer must be at least 1")
        self.local_device_id = local_device_id
        self.credential = credential
        self.signer = signer
        self.prekeys = prekeys
        self._verify_credential = verify_credential
        self._max_per_peer = max_sessions_per_peer
        self._limits = limits
        self._max_message_size = max_message_size
        self._random = random
        self._by_id: dict[bytes, PairwiseSession] = {}
        self._order: dict[bytes, tuple[int, int]] = {}  # session id -> (opened_at_ms, insertion number)
        self._counter = itertools.count()

    # -- membership -------------------------------------------------------------------------------------------

    def add(self, session: PairwiseSession) -> tuple[bytes, ...]:
        """Adds a session (e.g. restored from the store); returns the ids dropped to respect the bound."""
        session.use_signer(self.signer)
        self._by_id[session.session_id] = session
        self._order[session.session_id] = (session.opened_at_ms, next(self._counter))
        peers = self.sessions_with(session.peer_device_id)
        dropped = tuple(s.session_id for s in peers[: max(0, len(peers) - self._max_per_peer)])
        for sid in dropped:
            self.remove(sid)
        return dropped

    def remove(self, session_id: bytes) -> None:
        self._by_id.pop(session_id, None)
        self._order.pop(session_id, None)

    def get(self, session_id: bytes) -> PairwiseSession | None:
        return self._by_id.get(session_id)

    def sessions_with(self, peer_device_id: str) -> list[PairwiseSession]:
        """Oldest first."""
        found = [s for s in self._by_id.values() if s.peer_device_id == peer_device_id]
        return sorted(found, key=lambda s: self._order[s.session_id])

    def __len__(self) -> int:
        return len(self._by_id)

    def sending_session(self, peer_device_id: str) -> PairwiseSession | None:
        for s in reversed(self.sessions_with(peer_device_id)):
            if s.can_encrypt and s.ratchet.can_send:
                return s
        return None

    def rotate_signer(self, signer: MessageSigner, credential: bytes) -> None:
        """After a delegated-key rotation: old sessions keep decrypting; sending needs new sessions (`open`).

        Re-export and publish the prekey bundle too: it must be signed by the new key.
        """
        self.signer, self.credential = signer, credential
        for s in self._by_id.values():
            s.use_signer(signer)

    # -- traffic ----------------------------------------------------------------------------------------------

    def open(
        self, bundle: PrekeyBundle, *, now_ms: int, max_signed_prekey_age_ms: int | None = None
    ) -> tuple[PairwiseSession, tuple[bytes, ...]]:
        """Starts a session from a fetched bundle; it becomes the one `encrypt` uses for that peer."""
        session = PairwiseSession.initiate(
            local_device_id=self.local_device_id, credential=self.credential, signer=self.signer, bundle=bundle,
            verify_credential=self._verify_credential, now_ms=now_ms,
            max_signed_prekey_age_ms=max_signed_prekey_age_ms, limits=self._limits, random=self._random,
            max_message_size=self._max_message_size,
        )
        return session, self.add(session)

    def encrypt(self, peer_device_id: str, plaintext: bytes) -> Sent:
        session = self.sending_session(peer_device_id)
        if session is None:
            raise NoSessionError(f"no session with {peer_device_id!r} can send; fetch its bundle and open one")
        return Sent(session.encrypt(plaintext), session)

    def decrypt(self, wire: bytes, *, sender_device_id: str, now_ms: int) -> Received:
        """Routes by session id; a setup message for an unknown id creates (and adds) a session."""
        msg = PairwiseMessage.parse(wire, max_size=self._max_message_size)
        session = self._by_id.get(msg.session_id)
        if session is not None:
            return Received(session.decrypt(msg, sender_device_id=sender_device_id), session, False)
        if msg.setup is None:
            raise UnknownSessionError(
                f"message from {sender_device_id!r} names session {msg.session_id.hex()} that we do not hold; "
                "open a fresh session to that peer so it switches over"
            )
        session, plaintext = PairwiseSession.accept(
            msg, local_device_id=self.local_device_id, signer=self.signer, prekeys=self.prekeys,
            verify_credential=self._verify_credential, limits=self._limits, random=self._random,
            max_message_size=self._max_message_size, sender_device_id=sender_device_id, now_ms=now_ms,
        )
        return Received(plaintext, session, True, self.add(session))
