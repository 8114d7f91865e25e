"""Message framing (RFC 9420 section 6): FramedContent and what is signed or MACed over it, PublicMessage,
PrivateMessage with its inner content and AAD structures, SenderData, and the MLSMessage envelope.

Encodings only: signing, MACs and encryption are in `protection.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from gateway.protocol.mls.codec import Reader, Writer, decode_all, encode_varint
from gateway.protocol.mls.commit import Commit
from gateway.protocol.mls.errors import MlsDecodeError
from gateway.protocol.mls.key_package import KeyPackage
from gateway.protocol.mls.proposals import Proposal, decode_proposal, encode_proposal
from gateway.protocol.mls.welcome_structs import GroupContext, GroupInfo, Welcome
from gateway.protocol.mls.wire import ContentType, ProtocolVersion, SenderType, WireFormat, WireStruct, read_enum

FRAMED_CONTENT_SIGN_LABEL = b"FramedContentTBS"

Content = bytes | Proposal | Commit
"""Application data (bytes), a Proposal, or a Commit."""


def content_type_of(content: Content) -> ContentType:
    if isinstance(content, bytes):
        return ContentType.APPLICATION
    if isinstance(content, Commit):
        return ContentType.COMMIT
    return ContentType.PROPOSAL


def _encode_content_body(w: Writer, content: Content) -> None:
    if isinstance(content, bytes):
        w.opaque(content)
    elif isinstance(content, Commit):
        content.encode(w)
    else:
        encode_proposal(w, content)


def _decode_content_body(r: Reader, content_type: ContentType) -> Content:
    if content_type == ContentType.APPLICATION:
        return r.opaque()
    if content_type == ContentType.PROPOSAL:
        return decode_proposal(r)
    return Commit.decode(r)


@dataclass(frozen=True, slots=True)
class Sender(WireStruct):
    sender_type: SenderType
    index: int | None = None
    """Leaf index (member) or index into external_senders (external); None for new members."""

    def __post_init__(self) -> None:
        has_index = self.sender_type in (SenderType.MEMBER, SenderType.EXTERNAL)
        if has_index != (self.index is not None):
            raise ValueError(f"sender type {self.sender_type.name} {'needs' if has_index else 'has no'} index")

    @classmethod
    def member(cls, leaf_index: int) -> Sender:
        return cls(SenderType.MEMBER, leaf_index)

    def encode(self, w: Writer) -> None:
        w.u8(self.sender_type)
        if self.index is not None:
            w.u32(self.index)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        st = read_enum(r, SenderType, 1)
        if st in (SenderType.MEMBER, SenderType.EXTERNAL):
            return cls(st, r.u32())
        return cls(st)


@dataclass(frozen=True, slots=True)
class FramedContent(WireStruct):
    group_id: bytes
    epoch: int
    sender: Sender
    authenticated_data: bytes
    content: Content

    @property
    def content_type(self) -> ContentType:
        return content_type_of(self.content)

    def encode(self, w: Writer) -> None:
        w.opaque(self.group_id).u64(self.epoch)
        self.sender.encode(w)
        w.opaque(self.authenticated_data).u8(self.content_type)
        _encode_content_body(w, self.content)

    def to_bytes(self) -> bytes:
        """The same bytes as `encode`; application data (signed and verified once per message) is built
        directly, without a Writer."""
        body = self.content
        if not isinstance(body, bytes):
            return WireStruct.to_bytes(self)
        gid, aad, sender = self.group_id, self.authenticated_data, self.sender
        index = sender.index
        return b"".join((
            encode_varint(len(gid)), gid, self.epoch.to_bytes(8, "big"), sender.sender_type.to_bytes(1, "big"),
            b"" if index is None else index.to_bytes(4, "big"), encode_varint(len(aad)), aad,
            b"\x01", encode_varint(len(body)), body,  # ContentType.APPLICATION
        ))

    @classmethod
    def decode(cls, r: Reader) -> Self:
        group_id = r.opaque()
        epoch = r.u64()
        sender = Sender.decode(r)
        aad = r.opaque()
        ct = read_enum(r, ContentType, 1)
        return cls(group_id, epoch, sender, aad, _decode_content_body(r, ct))


def framed_content_tbs(wire_format: WireFormat, content: FramedContent, context: GroupContext | None) -> bytes:
    """FramedContentTBS: member and new-member-commit senders bind the GroupContext, others do not."""
    w = Writer().u16(ProtocolVersion.MLS10).u16(wire_format)
    content.encode(w)
    needs_context = content.sender.sender_type in (SenderType.MEMBER, SenderType.NEW_MEMBER_COMMIT)
    if needs_context:
        if context is None:
            raise ValueError("FramedContentTBS for a member or new_member_commit sender needs the GroupContext")
        context.encode(w)
    return w.bytes()


@dataclass(frozen=True, slots=True)
class FramedContentAuthData(WireStruct):
    signature: bytes
    confirmation_tag: bytes | None = None
    """Present exactly for commits."""

    def encode(self, w: Writer) -> None:
        w.opaque(self.signature)
        if self.confirmation_tag is not None:
            w.opaque(self.confirmation_tag)

    @classmethod
    def decode_for(cls, r: Reader, content_type: ContentType) -> Self:
        signature = r.opaque()
        tag = r.opaque() if content_type == ContentType.COMMIT else None
        return cls(signature, tag)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        raise TypeError("FramedContentAuthData depends on the content type: use decode_for()")


def _check_auth(content: FramedContent, auth: FramedContentAuthData) -> None:
    if (auth.confirmation_tag is not None) != (content.content_type == ContentType.COMMIT):
        raise ValueError("a confirmation tag is present exactly for commits")


@dataclass(frozen=True, slots=True)
class AuthenticatedContent(WireStruct):
    wire_format: WireFormat
    content: FramedContent
    auth: FramedContentAuthData

    def __post_init__(self) -> None:
        _check_auth(self.content, self.auth)

    def encode(self, w: Writer) -> None:
        w.u16(self.wire_format)
        self.content.encode(w)
        self.auth.encode(w)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        wf = read_enum(r, WireFormat, 2)
        content = FramedContent.decode(r)
        return cls(wf, content, FramedContentAuthData.decode_for(r, content.content_type))


@dataclass(frozen=True, slots=True)
class PublicMessage(WireStruct):
    content: FramedContent
    auth: FramedContentAuthData
    membership_tag: bytes | None = None
    """Present exactly when the sender is a member."""

    def __post_init__(self) -> None:
        _check_auth(self.content, self.auth)
        if (self.membership_tag is not None) != (self.content.sender.sender_type == SenderType.MEMBER):
            raise ValueError("a membership tag is present exactly for member senders")

    def encode(self, w: Writer) -> None:
        self.content.encode(w)
        self.auth.encode(w)
        if self.membership_tag is not None:
            w.opaque(self.membership_tag)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        content = FramedContent.decode(r)
        auth = FramedContentAuthData.decode_for(r, content.content_type)
        tag = r.opaque() if content.sender.sender_type == SenderType.MEMBER else None
        return cls(content, auth, tag)


def authenticated_content_tbm(content_tbs: bytes, auth: FramedContentAuthData) -> bytes:
    """AuthenticatedContentTBM, the input of the membership tag MAC."""
    w = Writer().raw(content_tbs)
    auth.encode(w)
    return w.bytes()


@dataclass(frozen=True, slots=True)
class PrivateMessage(WireStruct):
    group_id: bytes
    epoch: int
    content_type: ContentType
    authenticated_data: bytes
    encrypted_sender_data: bytes
    ciphertext: bytes

    def encode(self, w: Writer) -> None:
        w.opaque(self.group_id).u64(self.epoch).u8(self.content_type).opaque(self.authenticated_data)
        w.opaque(self.encrypted_sender_data).opaque(self.ciphertext)

    def to_bytes(self) -> bytes:
        gid, aad, esd, ct = self.group_id, self.authenticated_data, self.encrypted_sender_data, self.ciphertext
        return b"".join((encode_varint(len(gid)), gid, self.epoch.to_bytes(8, "big"),
                         self.content_type.to_bytes(1, "big"), encode_varint(len(aad)), aad,
                         encode_varint(len(esd)), esd, encode_varint(len(ct)), ct))

    @classmethod
    def decode(cls, r: Reader) -> Self:
        group_id = r.opaque()
        epoch = r.u64()
        ct = read_enum(r, ContentType, 1)
        return cls(group_id, epoch, ct, r.opaque(), r.opaque(), r.opaque())


@dataclass(frozen=True, slots=True)
class PrivateMessageContent:
    """The plaintext inside PrivateMessage.ciphertext: content, auth data and all-zero padding."""

    content: Content
    auth: FramedContentAuthData
    padding_len: int = 0

    def to_bytes(self) -> bytes:
        return encode_private_content(self.content, self.auth, self.padding_len)

    @classmethod
    def from_bytes(cls, data: bytes, content_type: ContentType) -> PrivateMessageContent:
        r = Reader(data)
        content = _decode_content_body(r, content_type)
        auth = FramedContentAuthData.decode_for(r, content_type)
        padding = data[r.pos:]
        if padding.count(0) != len(padding):
            raise MlsDecodeError("PrivateMessageContent padding holds non-zero bytes")
        return cls(content, auth, len(padding))


def encode_private_content(content: Content, auth: FramedContentAuthData, padding_len: int = 0) -> bytes:
    """PrivateMessageContent: the content body, the auth data and `padding_len` zero bytes."""
    if isinstance(content, bytes):
        sig = auth.signature
        parts = [encode_varint(len(content)), content, encode_varint(len(sig)), sig]
        if auth.confirmation_tag is not None:
            parts += (encode_varint(len(auth.confirmation_tag)), auth.confirmation_tag)
    else:
        w = Writer()
        _encode_content_body(w, content)
        auth.encode(w)
        parts = [w.bytes()]
    if padding_len:
        parts.append(bytes(padding_len))
    return b"".join(parts)


def private_content_aad(group_id: bytes, epoch: int, content_type: ContentType, authenticated_data: bytes) -> bytes:
    """PrivateContentAAD, the AEAD associated data of the content encryption."""
    return b"".join((encode_varint(len(group_id)), group_id, epoch.to_bytes(8, "big"),
                     content_type.to_bytes(1, "big"), encode_varint(len(authenticated_data)), authenticated_data))


def sender_data_aad(group_id: bytes, epoch: int, content_type: ContentType) -> bytes:
    """SenderDataAAD, the AEAD associated data of the sender data encryption."""
    return encode_varint(len(group_id)) + group_id + epoch.to_bytes(8, "big") + content_type.to_bytes(1, "big")


@dataclass(frozen=True, slots=True)
class SenderData(WireStruct):
    leaf_index: int
    generation: int
    reuse_guard: bytes

    def __post_init__(self) -> None:
        if len(self.reuse_guard) != 4:
            raise ValueError("reuse_guard is exactly 4 bytes")

    def encode(self, w: Writer) -> None:
        w.u32(self.leaf_index).u32(self.generation).raw(self.reuse_guard)

    def to_bytes(self) -> bytes:
        return self.leaf_index.to_bytes(4, "big") + self.generation.to_bytes(4, "big") + bytes(self.reuse_guard)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.u32(), r.u32(), r.raw(4))


MessageBody = PublicMessage | PrivateMessage | Welcome | GroupInfo | KeyPackage

_BODY_CLASSES: dict[WireFormat, type[MessageBody]] = {
    WireFormat.PUBLIC_MESSAGE: PublicMessage,
    WireFormat.PRIVATE_MESSAGE: PrivateMessage,
    WireFormat.WELCOME: Welcome,
    WireFormat.GROUP_INFO: GroupInfo,
    WireFormat.KEY_PACKAGE: KeyPackage,
}


@dataclass(frozen=True, slots=True)
class MLSMessage(WireStruct):
    body: MessageBody
    version: ProtocolVersion = ProtocolVersion.MLS10

    @property
    def wire_format(self) -> WireFormat:
        for wf, cls in _BODY_CLASSES.items():
            if isinstance(self.body, cls):
                return wf
        raise TypeError(f"not an MLSMessage body: {type(self.body).__name__}")

    def encode(self, w: Writer) -> None:
        w.u16(self.version).u16(self.wire_format)
        self.body.encode(w)

    def to_bytes(self) -> bytes:
        body = self.body
        if isinstance(body, PrivateMessage):  # every application message
            return self.version.to_bytes(2, "big") + b"\x00\x02" + body.to_bytes()
        return WireStruct.to_bytes(self)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        version = read_enum(r, ProtocolVersion, 2)
        wf = read_enum(r, WireFormat, 2)
        return cls(_BODY_CLASSES[wf].decode(r), version)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        if data[:4] == b"\x00\x01\x00\x02":  # MLS 1.0 PrivateMessage (every application message): the two
            r = Reader(data, 4)                   # enumerations decode() would read, compared at once
            body = PrivateMessage.decode(r)
            r.expect_done()
            return cls(body, ProtocolVersion.MLS10)
        return decode_all(data, cls.decode)
