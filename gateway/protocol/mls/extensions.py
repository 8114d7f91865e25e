"""Extensions (RFC 9420 section 13): the generic type/data pair, and the typed payloads we understand.

The ratchet_tree payload lives with the tree nodes (`nodes.py`) to keep imports one-way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from gateway.protocol.mls.codec import Reader, Writer, decode_all
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.errors import MlsDecodeError
from gateway.protocol.mls.wire import ExtensionType, WireStruct, put, put_u16


@dataclass(frozen=True, slots=True)
class Extension(WireStruct):
    extension_type: int
    extension_data: bytes

    def encode(self, w: Writer) -> None:
        w.u16(self.extension_type).opaque(self.extension_data)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.u16(), r.opaque())


def encode_extensions(w: Writer, extensions: tuple[Extension, ...]) -> None:
    w.vector(extensions, put)


def decode_extensions(r: Reader) -> tuple[Extension, ...]:
    """Extension list; a type appearing twice is rejected (RFC 9420 section 13.4)."""
    exts = tuple(r.vector(Extension.decode))
    types = [e.extension_type for e in exts]
    if len(set(types)) != len(types):
        raise MlsDecodeError(f"duplicate extension types in {types}")
    return exts


def find_extension(extensions: tuple[Extension, ...], extension_type: int) -> Extension | None:
    for e in extensions:
        if e.extension_type == extension_type:
            return e
    return None


@dataclass(frozen=True, slots=True)
class ApplicationId(WireStruct):
    application_id: bytes

    def encode(self, w: Writer) -> None:
        w.opaque(self.application_id)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.opaque())

    def to_extension(self) -> Extension:
        return Extension(ExtensionType.APPLICATION_ID, self.to_bytes())


@dataclass(frozen=True, slots=True)
class RequiredCapabilities(WireStruct):
    extension_types: tuple[int, ...] = ()
    proposal_types: tuple[int, ...] = ()
    credential_types: tuple[int, ...] = ()

    def encode(self, w: Writer) -> None:
        w.vector(self.extension_types, put_u16)
        w.vector(self.proposal_types, put_u16)
        w.vector(self.credential_types, put_u16)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(tuple(r.vector(Reader.u16)), tuple(r.vector(Reader.u16)), tuple(r.vector(Reader.u16)))

    def to_extension(self) -> Extension:
        return Extension(ExtensionType.REQUIRED_CAPABILITIES, self.to_bytes())


@dataclass(frozen=True, slots=True)
class ExternalPub(WireStruct):
    external_pub: bytes

    def encode(self, w: Writer) -> None:
        w.opaque(self.external_pub)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.opaque())

    def to_extension(self) -> Extension:
        return Extension(ExtensionType.EXTERNAL_PUB, self.to_bytes())


@dataclass(frozen=True, slots=True)
class ExternalSender(WireStruct):
    signature_key: bytes
    credential: Credential

    def encode(self, w: Writer) -> None:
        w.opaque(self.signature_key)
        self.credential.encode(w)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.opaque(), Credential.decode(r))


@dataclass(frozen=True, slots=True)
class ExternalSenders(WireStruct):
    senders: tuple[ExternalSender, ...]

    def encode(self, w: Writer) -> None:
        w.vector(self.senders, put)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(tuple(r.vector(ExternalSender.decode)))

    def to_extension(self) -> Extension:
        return Extension(ExtensionType.EXTERNAL_SENDERS, self.to_bytes())


_PAYLOADS: dict[int, type[WireStruct]] = {
    ExtensionType.APPLICATION_ID: ApplicationId,
    ExtensionType.REQUIRED_CAPABILITIES: RequiredCapabilities,
    ExtensionType.EXTERNAL_PUB: ExternalPub,
    ExtensionType.EXTERNAL_SENDERS: ExternalSenders,
}


def parse_payload(ext: Extension) -> WireStruct:
    """Decode the data of a known non-tree extension into its typed payload."""
    cls = _PAYLOADS.get(ext.extension_type)
    if cls is None:
        raise MlsDecodeError(f"no typed payload for extension type {ext.extension_type}")
    return decode_all(ext.extension_data, cls.decode)


def required_capabilities(extensions: tuple[Extension, ...]) -> RequiredCapabilities | None:
    e = find_extension(extensions, ExtensionType.REQUIRED_CAPABILITIES)
    return None if e is None else decode_all(e.extension_data, RequiredCapabilities.decode)


def external_pub(extensions: tuple[Extension, ...]) -> ExternalPub | None:
    e = find_extension(extensions, ExtensionType.EXTERNAL_PUB)
    return None if e is None else decode_all(e.extension_data, ExternalPub.decode)


def external_senders(extensions: tuple[Extension, ...]) -> ExternalSenders | None:
    e = find_extension(extensions, ExtensionType.EXTERNAL_SENDERS)
    return None if e is None else decode_all(e.extension_data, ExternalSenders.decode)
