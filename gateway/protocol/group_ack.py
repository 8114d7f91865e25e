"""End-to-end acknowledgement of group messages (docs/protocol.md, "Group acknowledgement").

A member device tells a sending device which of its group messages are durably held (in the group inbox, the
epoch buffer, or known duplicates) so the sender stops resending them to that device. It travels through the
relay as the ciphertext of a GROUP envelope (an MLSMessage starts with the version 0x0001, a GroupAck with the
magic "GA", so the two never collide). Layout, integers big-endian:

    magic "GA" [2] | version u8 (=1) | group_len u8 | group_id | acker_len u8 | acker | target_len u8 | target
    | count u16 | count x message_id [16] | sig_len u16 | signature

`acker` is the member agent `<device>/<agent>` whose MLS leaf key signs; `target` the device whose messages are
acknowledged; message id = the first 16 bytes of SHA-256 of the MLSMessage bytes. The signature is MLS
SignWithLabel("agw group ack", everything before sig_len) with the acker's leaf signature key, so neither the
relay nor a device without that leaf's key can forge it; the sender verifies it against the leaf in its own
copy of the group tree.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from gateway.protocol.envelope import check_device_id
from gateway.protocol.errors import DecodeError, ProtocolError, VerificationError
from gateway.protocol.mls.crypto import CipherSuite, Signer, sign_with_label, verify_with_label

MAGIC = b"GA"
VERSION = 1
MESSAGE_ID_SIZE = 16
MAX_IDS = 1024
MAX_SIGNATURE = 512
LABEL = b"agw group ack"


class GroupAckError(DecodeError):
    """A group acknowledgement is malformed."""


class GroupAckForged(VerificationError):
    """A group acknowledgement's signature does not verify with the acker's leaf key."""


def message_id(mls_message: bytes) -> bytes:
    """The stable id of a group message: sender and receivers compute it from the same bytes."""
    return hashlib.sha256(mls_message).digest()[:MESSAGE_ID_SIZE]


def is_group_ack(data: bytes) -> bool:
    return data[:2] == MAGIC


def _short(name: str, what: str, data: bytes) -> bytes:
    if not 1 <= len(data) <= 255:
        raise GroupAckError(f"{what} {name!r} must be 1-255 bytes")
    return bytes((len(data),)) + data


@dataclass(frozen=True, slots=True)
class GroupAck:
    group_id: bytes
    acker: str  # "<device>/<agent>"
    target: str  # the device whose messages are acknowledged
    message_ids: tuple[bytes, ...]
    signature: bytes = b""

    @property
    def acker_device(self) -> str:
        return self.acker.split("/", 1)[0]

    def to_be_signed(self) -> bytes:
        if not 1 <= len(self.message_ids) <= MAX_IDS:
            raise GroupAckError(f"a group ack carries 1..{MAX_IDS} message ids")
        if any(len(i) != MESSAGE_ID_SIZE for i in self.message_ids):
            raise GroupAckError(f"message ids are {MESSAGE_ID_SIZE} bytes")
        return b"".join((MAGIC, bytes((VERSION,)), _short("group", "group id", self.group_id),
                         _short(self.acker, "acker", self.acker.encode()),
                         _short(self.target, "target", self.target.encode()),
                         struct.pack("!H", len(self.message_ids)), *self.message_ids))

    def signed(self, signer: Signer) -> GroupAck:
        return GroupAck(self.group_id, self.acker, self.target, self.message_ids,
                        sign_with_label(signer, LABEL, self.to_be_signed()))

    def to_bytes(self) -> bytes:
        if not 1 <= len(self.signature) <= MAX_SIGNATURE:
            raise GroupAckError("a group ack must be signed")
        return self.to_be_signed() + struct.pack("!H", len(self.signature)) + self.signature

    def verify(self, cs: CipherSuite, public_key: bytes) -> None:
        try:
            ok = verify_with_label(cs, public_key, LABEL, self.to_be_signed(), self.signature)
        except ProtocolError:
            raise
        except Exception:  # a malformed key or signature length: the library's own error types vary
            ok = False
        if not ok:
            raise GroupAckForged(f"group ack from {self.acker} does not verify with its leaf key")

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupAck:
        """Decode exactly one GroupAck; raise GroupAckError on anything else."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise GroupAckError("a group ack is bytes")
        data = bytes(data)
        pos = 0

        def take(n: int, what: str) -> bytes:
            nonlocal pos
            if pos + n > len(data):
                raise GroupAckError(f"group ack truncated in {what}")
            out = data[pos:pos + n]
            pos += n
            return out

        if take(2, "magic") != MAGIC:
            raise GroupAckError("not a group ack (magic)")
        if take(1, "version")[0] != VERSION:
            raise GroupAckError(f"unsupported group ack version (expected {VERSION})")
        group_id = take(take(1, "group length")[0], "group id")
        if not group_id:
            raise GroupAckError("empty group id")
        try:
            acker = take(take(1, "acker length")[0], "acker").decode("ascii")
            target = take(take(1, "target length")[0], "target").decode("ascii")
        except UnicodeDecodeError:
            raise GroupAckError("acker and target are ASCII") from None
        device, sep, agent = acker.partition("/")
        if not sep or not agent:
            raise GroupAckError("acker must be <device>/<agent>")
        check_device_id(device)
        check_device_id(target)
        (count,) = struct.unpack("!H", take(2, "count"))
        if not 1 <= count <= MAX_IDS:
            raise GroupAckError(f"a group ack carries 1..{MAX_IDS} message ids, not {count}")
        raw = take(count * MESSAGE_ID_SIZE, "message ids")
        ids = tuple(raw[i:i + MESSAGE_ID_SIZE] for i in range(0, len(raw), MESSAGE_ID_SIZE))
        (sig_len,) = struct.unpack("!H", take(2, "signature length"))
        if not 1 <= sig_len <= MAX_SIGNATURE:
            raise GroupAckError(f"signature length {sig_len} outside 1..{MAX_SIGNATURE}")
        signature = take(sig_len, "signature")
        if pos != len(data):
            raise GroupAckError(f"{len(data) - pos} trailing bytes after the group ack")
        return cls(group_id, acker, target, ids, signature)
