"""Shared wire vocabulary: the RFC 9420 enumerations, the encode/decode base class and HPKECiphertext.

Every structure is a frozen dataclass with `encode(Writer)` and `decode(Reader)`. Decoding is strict (unknown
enumeration values, bad optional flags and non-minimal lengths are rejected) so that any successfully decoded
object re-encodes to exactly the bytes it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Self, TypeVar

from gateway.protocol.mls.codec import Reader, Writer, decode_all
from gateway.protocol.mls.errors import MlsDecodeError

E = TypeVar("E", bound=IntEnum)


class ProtocolVersion(IntEnum):
    MLS10 = 1


class WireFormat(IntEnum):
    PUBLIC_MESSAGE = 1
    PRIVATE_MESSAGE = 2
    WELCOME = 3
    GROUP_INFO = 4
    KEY_PACKAGE = 5


class ContentType(IntEnum):
    APPLICATION = 1
    PROPOSAL = 2
    COMMIT = 3


class SenderType(IntEnum):
    MEMBER = 1
    EXTERNAL = 2
    NEW_MEMBER_PROPOSAL = 3
    NEW_MEMBER_COMMIT = 4


class CredentialType(IntEnum):
    BASIC = 1
    X509 = 2


class ExtensionType(IntEnum):
    APPLICATION_ID = 1
    RATCHET_TREE = 2
    REQUIRED_CAPABILITIES = 3
    EXTERNAL_PUB = 4
    EXTERNAL_SENDERS = 5


class ProposalType(IntEnum):
    ADD = 1
    UPDATE = 2
    REMOVE = 3
    PSK = 4
    REINIT = 5
    EXTERNAL_INIT = 6
    GROUP_CONTEXT_EXTENSIONS = 7


class LeafNodeSource(IntEnum):
    KEY_PACKAGE = 1
    UPDATE = 2
    COMMIT = 3


class NodeType(IntEnum):
    LEAF = 1
    PARENT = 2


class PskType(IntEnum):
    EXTERNAL = 1
    RESUMPTION = 2


class ResumptionPskUsage(IntEnum):
    APPLICATION = 1
    REINIT = 2
    BRANCH = 3


class ProposalOrRefType(IntEnum):
    PROPOSAL = 1
    REFERENCE = 2


def read_enum(r: Reader, enum_cls: type[E], width: int) -> E:
    """Read a uint8/uint16 enumeration value, rejecting values the RFC does not define."""
    value = r.u8() if width == 1 else r.u16()
    member: E | None = enum_cls._value2member_map_.get(value)  # type: ignore[assignment]
    if member is not None:  # what enum_cls(value) looks up first, without the call's overhead
        return member
    try:
        return enum_cls(value)
    except ValueError:
        raise MlsDecodeError(f"unknown {enum_cls.__name__} value {value}") from None


class WireStruct:
    """Base of every encodable MLS structure."""

    __slots__ = ()

    def encode(self, w: Writer) -> None:
        raise NotImplementedError

    @classmethod
    def decode(cls, r: Reader) -> Self:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        w = Writer()
        self.encode(w)
        return w.bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Decode exactly one structure; trailing bytes are an error."""
        return decode_all(data, cls.decode)


def put(w: Writer, item: WireStruct) -> None:
    """Item encoder for `Writer.vector` / `Writer.optional`."""
    item.encode(w)


def put_u32(w: Writer, v: int) -> None:
    w.u32(v)


def put_u16(w: Writer, v: int) -> None:
    w.u16(v)


def put_opaque(w: Writer, v: bytes) -> None:
    w.opaque(v)


@dataclass(frozen=True, slots=True)
class HPKECiphertext(WireStruct):
    kem_output: bytes
    ciphertext: bytes

    def encode(self, w: Writer) -> None:
        w.opaque(self.kem_output).opaque(self.ciphertext)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.opaque(), r.opaque())
