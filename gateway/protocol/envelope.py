"""The routing envelope: the only structure the relay parses.

Everything a relay needs to route a message, and nothing more: a kind, a random envelope id (so the sender can
match an UNDELIVERABLE answer to its outbox entry), the sender and recipient device ids, and the opaque
ciphertext. Layout (all integers big-endian), documented byte by byte in docs/protocol.md ("Relay link"):

    version u8 (=1) | kind u8 | envelope_id [16] | sender_len u8 | sender | recipient_len u8 | recipient
    | ciphertext_len u32 | ciphertext

Device ids use the fleet alphabet (1-64 chars of a-z 0-9 . _ -, alphanumeric at both ends), so they are safe in
logs and metrics labels.
"""

from __future__ import annotations

import enum
import functools
import re
import struct
from dataclasses import dataclass

from gateway.protocol.errors import DecodeError

ENVELOPE_VERSION = 1
ENVELOPE_ID_SIZE = 16
#: Fixed bytes around the variable parts: version, kind, id, two length bytes, ciphertext length.
ENVELOPE_OVERHEAD = 1 + 1 + ENVELOPE_ID_SIZE + 1 + 1 + 4
DEFAULT_MAX_ENVELOPE_SIZE = 256 * 1024

_DEVICE_ID = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")


class EnvelopeError(DecodeError):
    """An envelope is malformed, too large, or names an invalid device."""


class EnvelopeKind(enum.IntEnum):
    """What the ciphertext is; the relay routes every kind the same way."""

    PAIRWISE = 1  # a pairwise ratchet message
    E2E_ACK = 2  # an end-to-end delivery acknowledgement (encrypted)
    PREKEY = 3  # a pairwise session-setup message built from a prekey bundle
    GROUP = 4  # an MLS message (the relay as MLS Delivery Service)
    PAIRWISE_BATCH = 5  # a pairwise v2 batch: several ratchet messages to one peer under one signature


@functools.lru_cache(maxsize=4096)
def _is_device_id(value: str) -> bool:
    return _DEVICE_ID.fullmatch(value) is not None


def check_device_id(value: str) -> str:
    """Return `value` if it is a valid device id, else raise EnvelopeError saying what is allowed."""
    if not isinstance(value, str) or not _is_device_id(value):
        raise EnvelopeError(
            f"device id {value!r} must be 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting and ending with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class Envelope:
    """One routed message. Validated when made, so an Envelope in hand is always serialisable."""

    kind: EnvelopeKind
    envelope_id: bytes
    sender: str
    recipient: str
    ciphertext: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.kind, EnvelopeKind):
            raise EnvelopeError(f"unknown envelope kind {self.kind!r}")
        if not isinstance(self.envelope_id, bytes) or len(self.envelope_id) != ENVELOPE_ID_SIZE:
            raise EnvelopeError(f"envelope id must be {ENVELOPE_ID_SIZE} bytes")
        check_device_id(self.sender)
        check_device_id(self.recipient)
        if not isinstance(self.ciphertext, bytes):
            raise EnvelopeError("ciphertext must be bytes")
        if len(self.ciphertext) > 0xFFFFFFFF:
            raise EnvelopeError("ciphertext longer than 2**32-1 bytes")

    @property
    def size(self) -> int:
        """The serialised size in bytes."""
        return ENVELOPE_OVERHEAD + len(self.sender) + len(self.recipient) + len(self.ciphertext)

    def header(self) -> bytes:
        """The serialised envelope up to its ciphertext: `serialize()` is `header() + ciphertext`, so a frame
        can join the ciphertext into its own buffer without copying it first into the envelope's."""
        s = self.sender.encode("ascii")
        r = self.recipient.encode("ascii")
        return b"".join(
            (
                struct.pack("!BB", ENVELOPE_VERSION, self.kind),
                self.envelope_id,
                bytes((len(s),)),
                s,
                bytes((len(r),)),
                r,
                struct.pack("!I", len(self.ciphertext)),
            )
        )

    def serialize(self) -> bytes:
        return self.header() + self.ciphertext

    @classmethod
    def parse(cls, data: bytes | memoryview, *, max_size: int = DEFAULT_MAX_ENVELOPE_SIZE) -> Envelope:
        """Decode exactly one envelope from `data`; raise EnvelopeError on anything else."""
        if len(data) > max_size:
            raise EnvelopeError(f"envelope of {len(data)} bytes exceeds the limit of {max_size}")
        if len(data) < ENVELOPE_OVERHEAD + 2:
            raise EnvelopeError(f"envelope of {len(data)} bytes is shorter than the minimum")
        version, kind = data[0], data[1]
        if version != ENVELOPE_VERSION:
            raise EnvelopeError(f"unsupported envelope version {version} (expected {ENVELOPE_VERSION})")
        try:
            kind_value = EnvelopeKind(kind)
        except ValueError:
            raise EnvelopeError(f"unknown envelope kind {kind}") from None
        pos = 2
        envelope_id = bytes(data[pos : pos + ENVELOPE_ID_SIZE])
        pos += ENVELOPE_ID_SIZE
        sender, pos = _read_id(data, pos, "sender")
        recipient, pos = _read_id(data, pos, "recipient")
        if pos + 4 > len(data):
            raise EnvelopeError("envelope truncated before the ciphertext length")
        (length,) = struct.unpack_from("!I", data, pos)
        pos += 4
        if pos + length != len(data):
            raise EnvelopeError(f"ciphertext length {length} does not match the {len(data) - pos} bytes present")
        return cls(kind_value, envelope_id, sender, recipient, bytes(data[pos:]))

    @staticmethod
    def peek_id(data: bytes) -> bytes | None:
        """The envelope id of possibly malformed bytes, if it can be located (used to answer UNDELIVERABLE)."""
        if len(data) >= 2 + ENVELOPE_ID_SIZE and data[0] == ENVELOPE_VERSION:
            return bytes(data[2 : 2 + ENVELOPE_ID_SIZE])
        return None


def _read_id(data: bytes | memoryview, pos: int, what: str) -> tuple[str, int]:
    if pos >= len(data):
        raise EnvelopeError(f"envelope truncated before the {what} id")
    length = data[pos]
    pos += 1
    raw = bytes(data[pos : pos + length])
    if len(raw) != length:
        raise EnvelopeError(f"envelope truncated inside the {what} id")
    return _decode_id(raw, what), pos + length


@functools.lru_cache(maxsize=4096)
def _decode_id(raw: bytes, what: str) -> str:
    """Ids repeat on a link, so their checks are cached (failures raise, and are not cached)."""
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        raise EnvelopeError(f"{what} id is not ASCII") from None
    return check_device_id(value)
