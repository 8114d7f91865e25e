"""The pairwise message on the wire: optional session-setup fields, the ratchet header, the AEAD ciphertext
and the sender's Ed25519 signature over all of it.

`PairwiseMessage.parse` checks only the shape and sizes; the result is unverified. The session verifies the
signature (over `SIGNATURE_CONTEXT || signed_part`) before it derives or uses any key, and passes `aad` (every
byte before the ciphertext) to the AEAD, so header and setup fields are authenticated twice.
Layout, byte by byte: docs/protocol.md ("Pairwise").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from gateway.protocol.pairwise import codec
from gateway.protocol.pairwise.codec import Reader
from gateway.protocol.pairwise.crypto import KEY_LEN, NONCE_LEN, SIGNATURE_LEN, TAG_LEN, check_sizes, check_u32
from gateway.protocol.pairwise.errors import PairwiseDecodeError
from gateway.protocol.pairwise.prekeys import MAX_CREDENTIAL_LEN

WIRE_VERSION = 1
SESSION_ID_LEN = 16
SIGNATURE_CONTEXT = b"agw pairwise v1 message\x00"
DEFAULT_MAX_MESSAGE_SIZE = (1 << 20) + (128 << 10)
"""1 MiB of inner message (the default payload limit of gateway.protocol.message) plus room for headers."""


class MessageType(IntEnum):
    PREKEY = 1  # carries session setup; sent by the initiator until it has heard back
    RATCHET = 2


@dataclass(frozen=True, slots=True)
class PrekeySetup:
    """What the responder needs to derive the session key from its prekeys (the X3DH-style initial message)."""

    sender_device_id: str
    recipient_device_id: str
    sender_credential: bytes
    recipient_verify_key: bytes  # the key the initiator took from the bundle; catches stale bundles early
    signed_prekey_id: int
    one_time_prekey_id: int | None
    ephemeral_key: bytes

    def __post_init__(self) -> None:
        check_sizes("prekey setup", recipient_verify_key=(self.recipient_verify_key, KEY_LEN),
                    ephemeral_key=(self.ephemeral_key, KEY_LEN))
        check_u32("prekey setup", signed_prekey_id=self.signed_prekey_id,
                  one_time_prekey_id=self.one_time_prekey_id or 0)
        if not 1 <= len(self.sender_credential) <= MAX_CREDENTIAL_LEN:
            raise ValueError(f"prekey setup: credential must be 1..{MAX_CREDENTIAL_LEN} bytes")

    def encode(self) -> bytes:
        parts = [
            codec.text8(self.sender_device_id),
            codec.text8(self.recipient_device_id),
            codec.opaque16(self.sender_credential),
            self.recipient_verify_key,
            codec.u32(self.signed_prekey_id),
        ]
        if self.one_time_prekey_id is None:
            parts.append(codec.u8(0))
        else:
            parts += [codec.u8(1), codec.u32(self.one_time_prekey_id)]
        parts.append(self.ephemeral_key)
        return b"".join(parts)

    @classmethod
    def read(cls, r: Reader) -> PrekeySetup:
        sender = r.text8("sender device id")
        recipient = r.text8("recipient device id")
        credential = r.opaque16("sender credential", min_len=1, max_len=MAX_CREDENTIAL_LEN)
        recipient_vk = r.fixed(KEY_LEN, "recipient verify key")
        spk_id = r.u32("signed prekey id")
        opk_id = r.u32("one-time prekey id") if r.flag("one-time prekey present") else None
        return cls(sender, recipient, credential, recipient_vk, spk_id, opk_id, r.fixed(KEY_LEN, "ephemeral key"))


@dataclass(frozen=True, slots=True)
class RatchetHeader:
    dh_public: bytes
    previous_chain_length: int
    message_number: int
    nonce: bytes

    def __post_init__(self) -> None:  # inline checks: this runs once per message
        if len(self.dh_public) != KEY_LEN or len(self.nonce) != NONCE_LEN:
            raise ValueError(f"ratchet header: key must be {KEY_LEN} bytes and nonce {NONCE_LEN} bytes")
        if not (0 <= self.previous_chain_length <= 0xFFFFFFFF and 0 <= self.message_number <= 0xFFFFFFFF):
            raise ValueError("ratchet header: counters must fit in 32 bits")

    def encode(self) -> bytes:
        return self.dh_public + _COUNTERS.pack(self.previous_chain_length, self.message_number) + self.nonce

    @classmethod
    def read(cls, r: Reader) -> RatchetHeader:
        return cls(
            r.fixed(KEY_LEN, "ratchet public key"), r.u32("previous chain length"), r.u32("message number"),
            r.fixed(NONCE_LEN, "nonce"),
        )


_COUNTERS = struct.Struct(">II")
HEADER_LEN = KEY_LEN + _COUNTERS.size + NONCE_LEN
_RATCHET_PREFIX_LEN = 2 + SESSION_ID_LEN + HEADER_LEN


def prefix_head(session_id: bytes, setup: PrekeySetup | None) -> bytes:
    """The part of the prefix that is the same for every message of a session (until the setup is dropped)."""
    kind = MessageType.RATCHET if setup is None else MessageType.PREKEY
    head = bytes([WIRE_VERSION, kind]) + session_id
    return head if setup is None else head + setup.encode()


def encode_header(dh_public: bytes, pn: int, n: int, nonce: bytes) -> bytes:
    return dh_public + _COUNTERS.pack(pn, n) + nonce


def encode_prefix(session_id: bytes, setup: PrekeySetup | None, header: RatchetHeader) -> bytes:
    """Everything before the ciphertext: this is the AEAD associated data."""
    return prefix_head(session_id, setup) + header.encode()


@dataclass(frozen=True, slots=True)
class PairwiseMessage:
    """A parsed, not yet verified pairwise message."""

    session_id: bytes
    setup: PrekeySetup | None
    header: RatchetHeader
    ciphertext: bytes
    signature: bytes
    aad: bytes  # the encoded prefix, exactly as received
    signed_part: bytes  # everything but the signature, exactly as received

    @classmethod
    def parse(cls, data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> PairwiseMessage:
        data = codec.wire_bytes(data, max_size, "pairwise message")
        if len(data) >= 2 and data[0] == WIRE_VERSION and data[1] == MessageType.RATCHET:
            return cls._parse_ratchet(data)
        return cls._parse_general(data)

    @classmethod
    def _parse_general(cls, data: bytes) -> PairwiseMessage:
        """Any message type, field by field."""
        r = Reader(data, "pairwise message")
        version = r.u8("version")
        if version != WIRE_VERSION:
            raise PairwiseDecodeError(f"pairwise message: unsupported version {version} (expected {WIRE_VERSION})")
        kind = r.u8("type")
        if kind not in (MessageType.PREKEY, MessageType.RATCHET):
            raise PairwiseDecodeError(f"pairwise message: unknown type {kind}")
        session_id = r.fixed(SESSION_ID_LEN, "session id")
        setup = PrekeySetup.read(r) if kind == MessageType.PREKEY else None
        header = RatchetHeader.read(r)
        aad_len = r.position
        if r.remaining < TAG_LEN + SIGNATURE_LEN:
            raise PairwiseDecodeError("pairwise message: too short for an AEAD tag and a signature")
        body = r.rest()
        return cls(
            session_id, setup, header, body[:-SIGNATURE_LEN], body[-SIGNATURE_LEN:], data[:aad_len],
            data[:-SIGNATURE_LEN],
        )

    @classmethod
    def _parse_ratchet(cls, data: bytes) -> PairwiseMessage:
        """The common case at fixed offsets, without the general reader (same checks, same result)."""
        if len(data) < _RATCHET_PREFIX_LEN + TAG_LEN + SIGNATURE_LEN:
            raise PairwiseDecodeError("pairwise message: too short for a ratchet message")
        pos = 2 + SESSION_ID_LEN
        pn, n = _COUNTERS.unpack_from(data, pos + KEY_LEN)
        header = RatchetHeader(data[pos : pos + KEY_LEN], pn, n, data[_RATCHET_PREFIX_LEN - NONCE_LEN :
                                                                      _RATCHET_PREFIX_LEN])
        return cls(
            data[2:pos], None, header, data[_RATCHET_PREFIX_LEN:-SIGNATURE_LEN], data[-SIGNATURE_LEN:],
            data[:_RATCHET_PREFIX_LEN], data[:-SIGNATURE_LEN],
        )

    @property
    def type(self) -> MessageType:
        return MessageType.RATCHET if self.setup is None else MessageType.PREKEY
