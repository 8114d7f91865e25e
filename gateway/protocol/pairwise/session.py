"""A pairwise session between two devices: asynchronous setup from a prekey bundle, then the Double Ratchet.

Setup (X3DH without X25519 identity keys; rationale in docs/protocol.md ("Pairwise")):
    SK = HKDF(salt=0, ikm = 0xFF*32 || DH(EK_a, SPK_b) [|| DH(EK_a, OPK_b)], info = transcript)
where the transcript names both device ids and both delegated verify keys. Each side is authenticated by its
Ed25519 signature on every message, made with the delegated key its credential certifies, and checked before
any key is derived or used. The session id is a hash of the transcript, so it names exactly one setup.

Use:
    initiator: session = PairwiseSession.initiate(...); wire = session.encrypt(plaintext)
    responder: session, plaintext = PairwiseSession.accept(wire, ...); later session.decrypt / encrypt
A session mutates on every `encrypt` and successful `decrypt`: persist `encode()` before sending the
ciphertext, and with the delivered message after a decrypt. A failing `decrypt` leaves the session unchanged.
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum

from gateway.protocol.pairwise import batch as v2
from gateway.protocol.pairwise import codec
from gateway.protocol.pairwise.codec import Reader
from gateway.protocol.pairwise.crypto import (
    KEY_LEN,
    NONCE_LEN,
    MessageSigner,
    RandomSource,
    Verifier,
    VerifyCredential,
    aead_decrypt,
    aead_encrypt,
    check_credential,
    dh,
    hkdf,
    sha256,
    wipe,
    x25519_keypair,
)
from gateway.protocol.pairwise.errors import (
    PairwiseDecodeError,
    PairwiseError,
    PairwiseUsageError,
    UnexpectedMessageError,
)
from gateway.protocol.pairwise.prekeys import MAX_CREDENTIAL_LEN, PrekeyBundle, PrekeyStore
from gateway.protocol.pairwise.ratchet import DEFAULT_MAX_SKIP, DEFAULT_MAX_SKIPPED_TOTAL, RatchetState
from gateway.protocol.pairwise.wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    SESSION_ID_LEN,
    SIGNATURE_CONTEXT,
    PairwiseMessage,
    PrekeySetup,
    encode_header,
    prefix_head,
)

_COUNTERS = struct.Struct(">II").pack  # a ratchet header's pn and n (as `encode_header`)
_LEN32 = struct.Struct(">I").pack  # a batch item's ciphertext length (as `batch.encode_item`)

STATE_VERSION = 1
_SK_CONTEXT = b"agw pairwise v1 x3dh\x00"
_SESSION_ID_CONTEXT = b"agw pairwise v1 session id\x00"
_DH_PREFIX = b"\xff" * 32


class Role(IntEnum):
    INITIATOR = 1
    RESPONDER = 2


class SessionState(Enum):
    """Where a session is in its life (for status output and routing):

    PENDING      initiator, nothing heard back yet: every message repeats the setup fields
    ESTABLISHED  a message from the peer has decrypted in this session
    RECEIVE_ONLY our delegated key was rotated since setup: decrypts, refuses to encrypt (open a new session)
    A responder starts ESTABLISHED. RECEIVE_ONLY wins over the other two; nothing leads back from it.
    """

    PENDING = "pending"
    ESTABLISHED = "established"
    RECEIVE_ONLY = "receive-only"


@dataclass(frozen=True, slots=True)
class RatchetLimits:
    """Out-of-order window: keys one message may skip in a chain, and skipped keys held in total."""

    max_skip: int = DEFAULT_MAX_SKIP
    max_skipped_total: int = DEFAULT_MAX_SKIPPED_TOTAL


DEFAULT_LIMITS = RatchetLimits()


def setup_transcript(
    *,
    initiator_device_id: str,
    responder_device_id: str,
    initiator_verify_key: bytes,
    responder_verify_key: bytes,
    ephemeral_key: bytes,
    signed_prekey: bytes,
    one_time_prekey: bytes | None,
) -> bytes:
    """The HKDF info of the setup: binds the shared key to both identities and every public key used."""
    return b"".join([
        _SK_CONTEXT,
        codec.text8(initiator_device_id),
        codec.text8(responder_device_id),
        initiator_verify_key,
        responder_verify_key,
        ephemeral_key,
        signed_prekey,
        b"\x00" if one_time_prekey is None else b"\x01" + one_time_prekey,
    ])


def _derive(dh_outputs: list[bytes], transcript: bytes) -> tuple[bytes, bytes]:
    """(shared key SK, session id)."""
    shared = hkdf(_DH_PREFIX + b"".join(dh_outputs), bytes(32), transcript, KEY_LEN)
    return shared, sha256(_SESSION_ID_CONTEXT + transcript)[:SESSION_ID_LEN]


class PairwiseSession:
    """One end of an end-to-end encrypted, signed channel with one peer device."""

    __slots__ = (
        "_head", "_local_verify_key", "_pending_setup", "_random", "_ratchet", "_signer", "local_device_id",
        "max_message_size", "opened_at_ms", "peer_credential", "peer_device_id", "peer_verifier", "role",
        "session_id",
    )

    def __init__(
        self,
        *,
        session_id: bytes,
        role: Role,
        local_device_id: str,
        peer_device_id: str,
        peer_credential: bytes,
        peer_verifier: Verifier,
        signer: MessageSigner,
        ratchet: RatchetState,
        pending_setup: PrekeySetup | None,
        random: RandomSource = os.urandom,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        local_verify_key: bytes | None = None,
        opened_at_ms: int = 0,
    ) -> None:
        if not 0 < max_message_size <= 0xFFFFFFFF or not 0 <= opened_at_ms < 1 << 64:
            raise ValueError("max_message_size must be 1..2**32-1 and opened_at_ms must fit in 64 bits")
        self.session_id = session_id
        self.opened_at_ms = opened_at_ms  # caller's clock at setup; orders sessions with one peer
        self.role = role
        self.local_device_id = local_device_id
        self.peer_device_id = peer_device_id
        self.peer_credential = peer_credential
        self.peer_verifier = peer_verifier
        self._signer = signer
        self._local_verify_key = bytes(signer.verify_key) if local_verify_key is None else local_verify_key
        self._ratchet = ratchet
        self._pending_setup = pending_setup
        self._head: bytes | None = None  # cached prefix_head(session_id, pending_setup)
        self._random = random
        self.max_message_size = max_message_size

    # -- setup ------------------------------------------------------------------------------------------------

    @classmethod
    def initiate(
        cls,
        *,
        local_device_id: str,
        credential: bytes,
        signer: MessageSigner,
        bundle: PrekeyBundle,
        verify_credential: VerifyCredential,
        now_ms: int | None = None,
        max_signed_prekey_age_ms: int | None = None,
        limits: RatchetLimits = DEFAULT_LIMITS,
        random: RandomSource = os.urandom,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> PairwiseSession:
        """Opens a session to `bundle.device_id` from its published prekeys; uses its first one-time prekey."""
        if not 1 <= len(credential) <= MAX_CREDENTIAL_LEN:
            raise PairwiseUsageError(f"own credential must be 1..{MAX_CREDENTIAL_LEN} bytes")
        if bundle.device_id == local_device_id:
            raise PairwiseUsageError("cannot open a pairwise session with our own device id")
        peer = bundle.verify(verify_credential, now_ms=now_ms, max_signed_prekey_age_ms=max_signed_prekey_age_ms)
        spk = bundle.signed_prekey
        opk = bundle.one_time_prekeys[0] if bundle.one_time_prekeys else None
        ek_private, ek_public = x25519_keypair(random)
        dhs = [dh(ek_private, spk.public_key)]
        if opk is not None:
            dhs.append(dh(ek_private, opk.public_key))
        transcript = setup_transcript(
            initiator_device_id=local_device_id, responder_device_id=bundle.device_id,
            initiator_verify_key=bytes(signer.verify_key), responder_verify_key=peer.raw,
            ephemeral_key=ek_public, signed_prekey=spk.public_key,
            one_time_prekey=None if opk is None else opk.public_key,
        )
        shared, session_id = _derive(dhs, transcript)
        setup = PrekeySetup(
            sender_device_id=local_device_id, recipient_device_id=bundle.device_id, sender_credential=credential,
            recipient_verify_key=peer.raw, signed_prekey_id=spk.prekey_id,
            one_time_prekey_id=None if opk is None else opk.prekey_id, ephemeral_key=ek_public,
        )
        ratchet = RatchetState.for_initiator(
            shared, spk.public_key, random=random, max_skip=limits.max_skip,
            max_skipped_total=limits.max_skipped_total,
        )
        return cls(
            session_id=session_id, role=Role.INITIATOR, local_device_id=local_device_id,
            peer_device_id=bundle.device_id, peer_credential=bundle.credential, peer_verifier=peer, signer=signer,
            ratchet=ratchet, pending_setup=setup, random=random, max_message_size=max_message_size,
            opened_at_ms=now_ms or 0,
        )

    @classmethod
    def accept(
        cls,
        message: bytes | PairwiseMessage,
        *,
        local_device_id: str,
        signer: MessageSigner,
        prekeys: PrekeyStore,
        verify_credential: VerifyCredential,
        limits: RatchetLimits = DEFAULT_LIMITS,
        random: RandomSource = os.urandom,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        sender_device_id: str | None = None,
        now_ms: int = 0,
    ) -> tuple[PairwiseSession, bytes]:
        """Builds the responder's session from a PREKEY message and decrypts it.

        Verifies the credential and the signature first. The one-time prekey is consumed from `prekeys` only
        if the message decrypts; persist the session and the prekey store together. `sender_device_id` is the
        sender the relay authenticated (from the envelope): a setup naming anyone else is refused before the
        credential check is paid for. `now_ms` is recorded as the session's `opened_at_ms`.
        """
        msg = message if isinstance(message, PairwiseMessage) else PairwiseMessage.parse(
            message, max_size=max_message_size
        )
        setup = msg.setup
        if setup is None:
            raise UnexpectedMessageError("not a session-setup (PREKEY) message and no session has this id")
        if setup.recipient_device_id != local_device_id:
            raise UnexpectedMessageError(
                f"setup message is for device {setup.recipient_device_id!r}, not {local_device_id!r}"
            )
        if setup.sender_device_id == local_device_id:
            raise UnexpectedMessageError("setup message claims to come from our own device id")
        if sender_device_id is not None and setup.sender_device_id != sender_device_id:
            raise UnexpectedMessageError(
                f"setup message names sender {setup.sender_device_id!r} but came from {sender_device_id!r}"
            )
        own_vk = bytes(signer.verify_key)
        if not hmac.compare_digest(setup.recipient_verify_key, own_vk):
            raise UnexpectedMessageError(
                "setup message was made from a prekey bundle with another delegated key (stale bundle); "
                "republish the bundle"
            )
        peer = check_credential(verify_credential, setup.sender_device_id, setup.sender_credential)
        peer.verify(SIGNATURE_CONTEXT + msg.signed_part, msg.signature, f"message from {setup.sender_device_id!r}")
        spk_private, spk_public = prekeys.signed_prekey(setup.signed_prekey_id)
        dhs = [dh(spk_private, setup.ephemeral_key)]
        opk_public: bytes | None = None
        if setup.one_time_prekey_id is not None:
            opk_private, opk_public = prekeys.one_time_prekey(setup.one_time_prekey_id)
            dhs.append(dh(opk_private, setup.ephemeral_key))
        transcript = setup_transcript(
            initiator_device_id=setup.sender_device_id, responder_device_id=local_device_id,
            initiator_verify_key=peer.raw, responder_verify_key=own_vk, ephemeral_key=setup.ephemeral_key,
            signed_prekey=spk_public, one_time_prekey=opk_public,
        )
        shared, session_id = _derive(dhs, transcript)
        if not hmac.compare_digest(session_id, msg.session_id):
            raise UnexpectedMessageError("setup message's session id does not match its setup fields")
        ratchet = RatchetState.for_responder(
            shared, spk_private, max_skip=limits.max_skip, max_skipped_total=limits.max_skipped_total
        )
        session = cls(
            session_id=session_id, role=Role.RESPONDER, local_device_id=local_device_id,
            peer_device_id=setup.sender_device_id, peer_credential=setup.sender_credential, peer_verifier=peer,
            signer=signer, ratchet=ratchet, pending_setup=None, random=random, max_message_size=max_message_size,
            opened_at_ms=now_ms,
        )
        plaintext = session._open(msg)
        if setup.one_time_prekey_id is not None:
            prekeys.consume_one_time_prekey(setup.one_time_prekey_id)
        return session, plaintext

    # -- messages ---------------------------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes) -> bytes:
        """Encrypts and signs one message. Until the peer has answered, it also carries the session setup."""
        if not self.can_encrypt:
            raise PairwiseUsageError(
                "this session is bound to another delegated key (rotated?); open a new session to send. "
                "It can still decrypt what the peer sends on it."
            )
        dh_public, pn, n, mk = self._ratchet.next_send()
        nonce = self._random(NONCE_LEN)
        if self._head is None:
            self._head = prefix_head(self.session_id, self._pending_setup)
        aad = self._head + encode_header(dh_public, pn, n, nonce)
        body = aad + aead_encrypt(mk, nonce, plaintext, aad)
        wipe(mk)
        return body + self._signer.sign(SIGNATURE_CONTEXT + body)

    def decrypt(self, message: bytes | PairwiseMessage, *, sender_device_id: str | None = None) -> bytes:
        """Verifies the signature, then decrypts. On any error the session is unchanged.

        `sender_device_id`, if given, is the sender the relay authenticated; it must be this session's peer.
        """
        if sender_device_id is not None and sender_device_id != self.peer_device_id:
            raise UnexpectedMessageError(
                f"message for the session with {self.peer_device_id!r} came from {sender_device_id!r}"
            )
        msg = message if isinstance(message, PairwiseMessage) else PairwiseMessage.parse(
            message, max_size=self.max_message_size
        )
        if not hmac.compare_digest(msg.session_id, self.session_id):
            raise UnexpectedMessageError("message belongs to another session")
        self.peer_verifier.verify(
            SIGNATURE_CONTEXT + msg.signed_part, msg.signature, f"message from {self.peer_device_id!r}"
        )
        if msg.setup is not None:
            self._check_repeated_setup(msg.setup)
        return self._open(msg)

    def encrypt_batch(self, plaintexts: list[bytes]) -> bytes:
        """Encrypts 1..1024 messages and signs them once (pairwise v2 batch, docs/protocol.md section 7.2).

        Only on an established session: until the peer has answered, messages must carry the setup, one by one
        (`encrypt`). Each message gets its own ratchet key and nonce, as with `encrypt`."""
        if not self.can_encrypt:
            raise PairwiseUsageError(
                "this session is bound to another delegated key (rotated?); open a new session to send. "
                "It can still decrypt what the peer sends on it."
            )
        if self._pending_setup is not None:
            raise PairwiseUsageError("batches need an established session: send the setup messages with encrypt()")
        if not 1 <= len(plaintexts) <= v2.MAX_BATCH_COUNT:
            raise PairwiseUsageError(f"a batch holds 1..{v2.MAX_BATCH_COUNT} messages, not {len(plaintexts)}")
        nonces = self._random(NONCE_LEN * len(plaintexts))
        parts = [v2.encode_head(self.session_id, len(plaintexts))]
        dh_public, pn, first, keys = self._ratchet.next_send_many(len(plaintexts))
        # Per message, as `encode_header`, `item_aad` and `encode_item` build them (a test compares), the ratchet
        # header's constant part and the AD's prefix once per batch, the ciphertext not copied into an item.
        aad_head = v2.item_aad(self.session_id, b"")
        i = 0
        try:
            for i, plaintext in enumerate(plaintexts):
                nonce = nonces[i * NONCE_LEN:(i + 1) * NONCE_LEN]
                header = dh_public + _COUNTERS(pn, first + i) + nonce
                mk = keys[i]
                ciphertext = aead_encrypt(mk, nonce, plaintext, aad_head + header)
                wipe(mk)
                parts += (header, _LEN32(len(ciphertext)), ciphertext)
        except BaseException:
            for mk in keys[i:]:  # the keys not used (and the one that failed)
                wipe(mk)
            raise
        body = b"".join(parts)
        return body + self._signer.sign(v2.signed_data(self.local_device_id, self.peer_device_id, body))

    def decrypt_batch(
        self, batch: bytes | v2.PairwiseBatch, *, sender_device_id: str | None = None
    ) -> list[bytes | PairwiseError]:
        """Verifies the batch signature once, then decrypts each message in order.

        A bad signature (or a batch for another session or sender) raises and changes nothing. After that, each
        entry of the result is the plaintext, or the error of that message alone (replayed, outside the window,
        bad tag), for which the session is unchanged.
        """
        if sender_device_id is not None and sender_device_id != self.peer_device_id:
            raise UnexpectedMessageError(
                f"batch for the session with {self.peer_device_id!r} came from {sender_device_id!r}"
            )
        b = batch if isinstance(batch, v2.PairwiseBatch) else v2.PairwiseBatch.parse(
            batch, max_size=self.max_message_size
        )
        if not hmac.compare_digest(b.session_id, self.session_id):
            raise UnexpectedMessageError("batch belongs to another session")
        self.peer_verifier.verify(
            v2.signed_data(self.peer_device_id, self.local_device_id, b.signed_part), b.signature,
            f"batch from {self.peer_device_id!r}",
        )
        out: list[bytes | PairwiseError] = []
        ratchet = self._ratchet
        aad_head = v2.item_aad(self.session_id, b"")  # (the AD's constant part, once per batch)
        for item in b.items:
            h = item.header
            # The next message of the current chain (nearly all of them): its key without a plan object; the
            # same key, checks and state change as `_open_item`'s (a test compares).
            step = ratchet.next_in_chain(h.dh_public, h.message_number) if self._pending_setup is None else None
            try:
                if step is None:
                    out.append(self._open_item(item))
                    continue
                ckr, mk = step
                out.append(aead_decrypt(mk, h.nonce, item.ciphertext, aad_head + item.header_bytes))
                ratchet.commit_next(ckr, mk)
            except PairwiseError as exc:
                # Without its traceback: the frames it references would keep message keys alive (and a
                # reference cycle through `out` would leave them to the cyclic collector).
                out.append(exc.with_traceback(None))
        return out

    def _open_item(self, item: v2.BatchItem) -> bytes:
        h = item.header
        plan = self._ratchet.prepare_receive(h.dh_public, h.previous_chain_length, h.message_number,
                                             random=self._random)
        plaintext = aead_decrypt(plan.message_key, h.nonce, item.ciphertext,
                                 v2.item_aad(self.session_id, item.header_bytes))
        self._ratchet.commit(plan)
        if self._pending_setup is not None:
            self._pending_setup = None  # the peer has answered: it holds the session
            self._head = None
        return plaintext

    def _check_repeated_setup(self, setup: PrekeySetup) -> None:
        """The initiator repeats its setup until answered; it must be the one this session was built from."""
        if (
            self.role != Role.RESPONDER
            or setup.sender_device_id != self.peer_device_id
            or setup.recipient_device_id != self.local_device_id
            or setup.sender_credential != self.peer_credential
            or setup.recipient_verify_key != self._local_verify_key
        ):
            raise UnexpectedMessageError("setup fields differ from the ones this session was built from")

    def _open(self, msg: PairwiseMessage) -> bytes:
        h = msg.header
        plan = self._ratchet.prepare_receive(h.dh_public, h.previous_chain_length, h.message_number,
                                             random=self._random)
        plaintext = aead_decrypt(plan.message_key, h.nonce, msg.ciphertext, msg.aad)
        self._ratchet.commit(plan)
        if self._pending_setup is not None:
            self._pending_setup = None  # the peer has answered: it holds the session
            self._head = None
        return plaintext

    # -- inspection -------------------------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        if not self.can_encrypt:
            return SessionState.RECEIVE_ONLY
        return SessionState.ESTABLISHED if self.established else SessionState.PENDING

    @property
    def established(self) -> bool:
        """True once a message from the peer has been decrypted in this session."""
        return self._pending_setup is None

    def use_signer(self, signer: MessageSigner) -> None:
        """Installs today's delegated key after a rotation; a session bound to the old key then stops sending."""
        self._signer = signer

    @property
    def can_encrypt(self) -> bool:
        """False once the signer's key is no longer the one the peer knows for this session (key rotation)."""
        return bytes(self._signer.verify_key) == self._local_verify_key

    @property
    def local_verify_key(self) -> bytes:
        return self._local_verify_key

    @property
    def ratchet(self) -> RatchetState:
        return self._ratchet

    # -- persistence ------------------------------------------------------------------------------------------

    def encode(self) -> bytes:
        """Versioned state for the encrypted store. Contains secrets: never write it anywhere unencrypted, and
        `crypto.wipe` it once sealed."""
        parts = [
            codec.u8(STATE_VERSION), self.session_id, codec.u8(self.role), codec.text8(self.local_device_id),
            codec.text8(self.peer_device_id), codec.opaque16(self.peer_credential), self.peer_verifier.raw,
            self._local_verify_key, codec.u32(self.max_message_size), codec.u64(self.opened_at_ms),
        ]
        if self._pending_setup is None:
            parts.append(b"\x00")
        else:
            parts += [b"\x01", self._pending_setup.encode()]
        ratchet = self._ratchet.encode()
        parts.append(ratchet)
        out = b"".join(parts)
        wipe(ratchet)  # a copy of every key: do not leave it in freed memory
        return out

    @classmethod
    def decode(cls, data: bytes, *, signer: MessageSigner, random: RandomSource = os.urandom) -> PairwiseSession:
        """Restores a session; it continues exactly where `encode()` left it.

        `signer` is today's delegated key. If it differs from the session's (the key was rotated), the restored
        session still decrypts but refuses to encrypt: see `can_encrypt`.
        """
        r = Reader(data, "session state")
        version = r.u8("version")
        if version != STATE_VERSION:
            raise PairwiseDecodeError(f"session state: unsupported version {version} (expected {STATE_VERSION})")
        session_id = r.fixed(SESSION_ID_LEN, "session id")
        role_value = r.u8("role")
        if role_value not in (Role.INITIATOR, Role.RESPONDER):
            raise PairwiseDecodeError(f"session state: unknown role {role_value}")
        local_id, peer_id = r.text8("local device id"), r.text8("peer device id")
        peer_credential = r.opaque16("peer credential", min_len=1, max_len=MAX_CREDENTIAL_LEN)
        peer_verifier = Verifier(r.fixed(KEY_LEN, "peer verify key"))
        local_vk = r.fixed(KEY_LEN, "local verify key")
        max_message_size = r.u32("max message size")
        if max_message_size == 0:
            raise PairwiseDecodeError("session state: max message size is 0")
        opened_at_ms = r.u64("opened at")
        pending = PrekeySetup.read(r) if r.flag("pending setup present") else None
        ratchet = RatchetState.read(r)
        r.done()
        if pending is not None and role_value != Role.INITIATOR:
            raise PairwiseDecodeError("session state: only an initiator can have a pending setup")
        return cls(
            session_id=session_id, role=Role(role_value), local_device_id=local_id, peer_device_id=peer_id,
            peer_credential=peer_credential, peer_verifier=peer_verifier, signer=signer, ratchet=ratchet,
            pending_setup=pending, random=random, max_message_size=max_message_size, local_verify_key=local_vk,
            opened_at_ms=opened_at_ms,
        )

    def __repr__(self) -> str:
        return (
            f"PairwiseSession(id={self.session_id.hex()}, role={self.role.name}, local={self.local_device_id!r}, "
            f"peer={self.peer_device_id!r}, established={self.established}, {self._ratchet!r})"
        )
