"""Pairwise sessions with peer devices, kept in the encrypted store.

A thin stateful layer over `gateway.protocol.pairwise`: it finds the session a message belongs to (by session
id), accepts new sessions from prekey messages, opens sessions to peers from bundles fetched from the relay
directory, and persists every state change. Each peer may hold a few sessions at once (both sides may open one
at the same moment); we send on the one we most recently received on, and keep the others to decrypt stragglers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from gateway.protocol.pairwise import (
    MessageSigner,
    OneTimePrekey,
    PairwiseBatch,
    PairwiseMessage,
    PairwiseSession,
    PrekeyBundle,
    PrekeyStore,
)
from gateway.protocol.pairwise.crypto import wipe
from gateway.protocol.pairwise.errors import PairwiseError, UnexpectedMessageError
from gateway.store import Store

MAX_SESSIONS_PER_PEER = 3
_OPK = struct.Struct(">I32s64s")
PREKEYS_SECRET = "pairwise/prekeys"  # noqa: S105 - a record name, not a secret


def encode_one_time(opk: OneTimePrekey) -> bytes:
    """The relay directory holds one-time prekeys as separate opaque entries: id, public key, signature."""
    return _OPK.pack(opk.prekey_id, opk.public_key, opk.signature)


def decode_one_time(data: bytes) -> OneTimePrekey:
    if len(data) != _OPK.size:
        raise UnexpectedMessageError("one-time prekey entry has the wrong size")
    pid, pub, sig = _OPK.unpack(data)
    return OneTimePrekey(pid, pub, sig)


class SessionBook:
    """All pairwise state of this device: its prekeys and its sessions with each peer."""

    def __init__(self, store: Store, *, device_id: str, credential: bytes, signer: MessageSigner,
                 verify_credential: Callable[[str, bytes], bytes], now_ms: Callable[[], int]) -> None:
        self.store = store
        self.device_id = device_id
        self.credential = credential
        self.signer = signer
        self.verify_credential = verify_credential
        self.now_ms = now_ms
        raw = store.get_secret(PREKEYS_SECRET)
        if raw is None:
            self.prekeys = PrekeyStore.generate(now_ms=now_ms(), one_time_count=100)
            store.put_secret(PREKEYS_SECRET, self.prekeys.encode())
        else:
            self.prekeys = PrekeyStore.decode(raw)
        self._sessions: dict[str, list[PairwiseSession]] = {}
        self._dirty: set[str] = set()

    # -- prekeys -----------------------------------------------------------------------------------------------
    def publishable_prekeys(self) -> tuple[bytes, list[bytes]]:
        """The bundle (without one-time keys) and the one-time keys as separate directory entries."""
        if self.prekeys.one_time_count < 50:
            self.prekeys.add_one_time_prekeys(100 - self.prekeys.one_time_count)
            self.store.put_secret(PREKEYS_SECRET, self.prekeys.encode())
        full = self.prekeys.bundle(device_id=self.device_id, credential=self.credential, signer=self.signer)
        base = full.with_one_time_prekeys(())
        return base.encode(), [encode_one_time(o) for o in full.one_time_prekeys]

    # -- sessions ----------------------------------------------------------------------------------------------
    def sessions(self, peer: str) -> list[PairwiseSession]:
        if peer not in self._sessions:
            raw = self.store.sessions.get(peer)
            out: list[PairwiseSession] = []
            if raw:
                pos = 0
                while pos < len(raw):
                    (n,) = struct.unpack_from(">I", raw, pos)
                    out.append(PairwiseSession.decode(raw[pos + 4:pos + 4 + n], signer=self.signer))
                    pos += 4 + n
            self._sessions[peer] = out
        return self._sessions[peer]

    def _save(self, peer: str) -> None:
        states = [s.encode() for s in self._sessions[peer]]
        pieces = [struct.pack(">I", len(e)) + e for e in states]
        blob = b"".join(pieces)
        self.store.sessions.put(peer, blob, secret=True)
        for temporary in (*states, *pieces, blob):  # copies of message and chain keys: not left in freed memory
            wipe(temporary)
        self._dirty.discard(peer)

    def flush(self) -> None:
        """Persist every session changed since the last flush. Call it inside the transaction that also records
        what was sent or received, and before any ciphertext made since leaves the process."""
        for peer in list(self._dirty):
            self._save(peer)

    def peers(self) -> list[str]:
        """Peers with a session loaded since start-up (what `agw status` lists)."""
        return sorted(p for p, lst in self._sessions.items() if lst)

    def has_session(self, peer: str) -> bool:
        return any(s.can_encrypt for s in self.sessions(peer))

    def open_session(self, peer: str, bundle_bytes: bytes, one_time: bytes | None) -> PairwiseSession:
        bundle = PrekeyBundle.decode(bundle_bytes)
        if bundle.device_id != peer:
            raise UnexpectedMessageError(f"the directory returned a bundle for {bundle.device_id!r}, not {peer!r}")
        if one_time is not None:
            bundle = bundle.with_one_time_prekeys((decode_one_time(one_time),))
        session = PairwiseSession.initiate(local_device_id=self.device_id, credential=self.credential,
                                           signer=self.signer, bundle=bundle,
                                           verify_credential=self.verify_credential, now_ms=self.now_ms())
        self._remember(peer, session)
        return session

    def _remember(self, peer: str, session: PairwiseSession) -> None:
        lst = self.sessions(peer)
        lst.insert(0, session)
        del lst[MAX_SESSIONS_PER_PEER:]
        self._save(peer)

    def encrypt(self, peer: str, plaintext: bytes) -> tuple[bytes, bool]:
        """Encrypt on the current session; returns (wire message, whether it carries a session setup)."""
        for session in self.sessions(peer):
            if session.can_encrypt:
                wire = session.encrypt(plaintext)
                self._dirty.add(peer)
                return wire, not session.established
        raise LookupError(f"no session with {peer}")

    def encrypt_batch(self, peer: str, plaintexts: list[bytes]) -> bytes | None:
        """One signed v2 batch of `plaintexts` on the current session, or None if that session is not yet
        established (its messages must carry the setup: use `encrypt` for each)."""
        for session in self.sessions(peer):
            if session.can_encrypt:
                if not session.established:
                    return None
                wire = session.encrypt_batch(plaintexts)
                self._dirty.add(peer)
                return wire
        raise LookupError(f"no session with {peer}")

    def decrypt_batch(self, peer: str, wire: bytes) -> list[bytes | PairwiseError]:
        """Verify a v2 batch from `peer` once, then decrypt each message; see PairwiseSession.decrypt_batch."""
        batch = PairwiseBatch.parse(wire)
        lst = self.sessions(peer)
        for i, session in enumerate(lst):
            if session.session_id == batch.session_id:
                out = session.decrypt_batch(batch, sender_device_id=peer)
                if i and any(isinstance(r, bytes) for r in out):
                    lst.insert(0, lst.pop(i))
                self._dirty.add(peer)
                return out
        raise UnexpectedMessageError(f"batch from {peer} names a session we do not have")

    def decrypt(self, peer: str, wire: bytes) -> bytes:
        """Decrypt a message from `peer`, accepting a new session if it is a setup message."""
        msg = PairwiseMessage.parse(wire)
        lst = self.sessions(peer)
        for i, session in enumerate(lst):
            if session.session_id == msg.session_id:
                plaintext = session.decrypt(msg)
                if i:
                    lst.insert(0, lst.pop(i))
                self._dirty.add(peer)
                return plaintext
        if msg.setup is None:
            raise UnexpectedMessageError(f"message from {peer} names a session we do not have")
        if msg.setup.sender_device_id != peer:
            raise UnexpectedMessageError(f"setup message relayed from {peer} claims sender "
                                         f"{msg.setup.sender_device_id!r}")
        session, plaintext = PairwiseSession.accept(msg, local_device_id=self.device_id, signer=self.signer,
                                                    prekeys=self.prekeys, verify_credential=self.verify_credential)
        with self.store.transaction():
            self.store.put_secret(PREKEYS_SECRET, self.prekeys.encode())
            self._remember(peer, session)
        return plaintext

    def signed_prekey_age_ms(self, now_ms: int) -> int:
        spk = self.prekeys.bundle(device_id=self.device_id, credential=self.credential, signer=self.signer,
                                  include_one_time=False).signed_prekey
        return now_ms - spk.created_at_ms

    def rotate_signed_prekey(self, now_ms: int) -> None:
        """A new signed prekey; the previous one stays for setups in flight, for two weeks at most."""
        self.prekeys.rotate_signed_prekey(now_ms=now_ms)
        self.prekeys.prune_retired(now_ms=now_ms, max_retired_age_ms=14 * 86_400_000)
        self.store.put_secret(PREKEYS_SECRET, self.prekeys.encode())

    def forget_cache(self) -> None:
        """Drop decoded sessions (e.g. after a signer change); they are decoded again from the store."""
        self.flush()
        self._sessions.clear()

    def forget(self, peer: str) -> None:
        self._sessions.pop(peer, None)
        self.store.sessions.delete(peer)
