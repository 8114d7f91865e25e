"""GroupContext, GroupInfo, GroupSecrets and Welcome (RFC 9420 sections 8.1 and 12.4.3): encodings only.

Secrets (joiner secret, path secret) are kept out of repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Self

from gateway.protocol.mls.codec import Reader, Writer
from gateway.protocol.mls.extensions import Extension, decode_extensions, encode_extensions
from gateway.protocol.mls.proposals import PreSharedKeyID
from gateway.protocol.mls.wire import HPKECiphertext, WireStruct, put

GROUP_INFO_SIGN_LABEL = b"GroupInfoTBS"


@dataclass(frozen=True, slots=True)
class GroupContext(WireStruct):
    version: int
    cipher_suite: int
    group_id: bytes
    epoch: int
    tree_hash: bytes
    confirmed_transcript_hash: bytes
    extensions: tuple[Extension, ...] = ()

    def encode(self, w: Writer) -> None:
        w.u16(self.version).u16(self.cipher_suite).opaque(self.group_id).u64(self.epoch)
        w.opaque(self.tree_hash).opaque(self.confirmed_transcript_hash)
        encode_extensions(w, self.extensions)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.u16(), r.u16(), r.opaque(), r.u64(), r.opaque(), r.opaque(), decode_extensions(r))


@dataclass(frozen=True, slots=True)
class GroupInfo(WireStruct):
    group_context: GroupContext
    extensions: tuple[Extension, ...]
    confirmation_tag: bytes
    signer: int
    signature: bytes = b""

    def _encode_content(self, w: Writer) -> None:
        self.group_context.encode(w)
        encode_extensions(w, self.extensions)
        w.opaque(self.confirmation_tag).u32(self.signer)

    def tbs(self) -> bytes:
        """GroupInfoTBS: everything but the signature."""
        w = Writer()
        self._encode_content(w)
        return w.bytes()

    def encode(self, w: Writer) -> None:
        self._encode_content(w)
        w.opaque(self.signature)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        gc = GroupContext.decode(r)
        exts = decode_extensions(r)
        tag = r.opaque()
        signer = r.u32()
        return cls(gc, exts, tag, signer, r.opaque())


def _put_path_secret(w: Writer, secret: bytes) -> None:
    w.opaque(secret)  # struct PathSecret { opaque path_secret<V>; }


@dataclass(frozen=True, slots=True)
class GroupSecrets(WireStruct):
    joiner_secret: bytes = field(repr=False)
    path_secret: bytes | None = field(default=None, repr=False)
    psks: tuple[PreSharedKeyID, ...] = ()

    def encode(self, w: Writer) -> None:
        w.opaque(self.joiner_secret)
        w.optional(self.path_secret, _put_path_secret)
        w.vector(self.psks, put)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        joiner = r.opaque()
        path_secret = r.optional(Reader.opaque)
        return cls(joiner, path_secret, tuple(r.vector(PreSharedKeyID.decode)))


@dataclass(frozen=True, slots=True)
class EncryptedGroupSecrets(WireStruct):
    new_member: bytes
    encrypted_group_secrets: HPKECiphertext

    def encode(self, w: Writer) -> None:
        w.opaque(self.new_member)
        self.encrypted_group_secrets.encode(w)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.opaque(), HPKECiphertext.decode(r))


@dataclass(frozen=True, slots=True)
class Welcome(WireStruct):
    cipher_suite: int
    secrets: tuple[EncryptedGroupSecrets, ...]
    encrypted_group_info: bytes

    def encode(self, w: Writer) -> None:
        w.u16(self.cipher_suite)
        w.vector(self.secrets, put)
        w.opaque(self.encrypted_group_info)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.u16(), tuple(r.vector(EncryptedGroupSecrets.decode)), r.opaque())

    def secrets_for(self, key_package_ref: bytes) -> EncryptedGroupSecrets | None:
        for s in self.secrets:
            if s.new_member == key_package_ref:
                return s
        return None
