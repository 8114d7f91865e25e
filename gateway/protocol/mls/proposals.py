"""Proposals (RFC 9420 section 12.1) and PreSharedKeyID (section 8.4).

Proposal types we do not know cannot be skipped (their bodies carry no length), so they are rejected on decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from gateway.protocol.mls.codec import Reader, Writer
from gateway.protocol.mls.extensions import Extension, decode_extensions, encode_extensions
from gateway.protocol.mls.key_package import KeyPackage, LeafNode
from gateway.protocol.mls.wire import ProposalType, PskType, ResumptionPskUsage, WireStruct, read_enum


@dataclass(frozen=True, slots=True)
class PreSharedKeyID(WireStruct):
    psktype: PskType
    psk_id: bytes = b""
    usage: ResumptionPskUsage = ResumptionPskUsage.APPLICATION
    psk_group_id: bytes = b""
    psk_epoch: int = 0
    psk_nonce: bytes = field(default=b"")

    @classmethod
    def external(cls, psk_id: bytes, psk_nonce: bytes) -> PreSharedKeyID:
        return cls(PskType.EXTERNAL, psk_id=psk_id, psk_nonce=psk_nonce)

    @classmethod
    def resumption(cls, usage: ResumptionPskUsage, group_id: bytes, epoch: int, nonce: bytes) -> PreSharedKeyID:
        return cls(PskType.RESUMPTION, usage=usage, psk_group_id=group_id, psk_epoch=epoch, psk_nonce=nonce)

    def encode(self, w: Writer) -> None:
        w.u8(self.psktype)
        if self.psktype == PskType.EXTERNAL:
            w.opaque(self.psk_id)
        else:
            w.u8(self.usage).opaque(self.psk_group_id).u64(self.psk_epoch)
        w.opaque(self.psk_nonce)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        psktype = read_enum(r, PskType, 1)
        if psktype == PskType.EXTERNAL:
            return cls(psktype, psk_id=r.opaque(), psk_nonce=r.opaque())
        usage = read_enum(r, ResumptionPskUsage, 1)
        group_id = r.opaque()
        epoch = r.u64()
        return cls(psktype, usage=usage, psk_group_id=group_id, psk_epoch=epoch, psk_nonce=r.opaque())


@dataclass(frozen=True, slots=True)
class Add(WireStruct):
    proposal_type: ClassVar[ProposalType] = ProposalType.ADD
    key_package: KeyPackage

    def encode(self, w: Writer) -> None:
        self.key_package.encode(w)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(KeyPackage.decode(r))


@dataclass(frozen=True, slots=True)
class Update(WireStruct):
    proposal_type: ClassVar[ProposalType] = ProposalType.UPDATE
    leaf_node: LeafNode

    def encode(self, w: Writer) -> None:
        self.leaf_node.encode(w)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(LeafNode.decode(r))


@dataclass(frozen=True, slots=True)
class Remove(WireStruct):
    proposal_type: ClassVar[ProposalType] = ProposalType.REMOVE
    removed: int

    def encode(self, w: Writer) -> None:
        w.u32(self.removed)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.u32())


@dataclass(frozen=True, slots=True)
class PreSharedKey(WireStruct):
    proposal_type: ClassVar[ProposalType] = ProposalType.PSK
    psk: PreSharedKeyID

    def encode(self, w: Writer) -> None:
        self.psk.encode(w)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(PreSharedKeyID.decode(r))


@dataclass(frozen=True, slots=True)
class ReInit(WireStruct):
    proposal_type: ClassVar[ProposalType] = ProposalType.REINIT
    group_id: bytes
    version: int
    cipher_suite: int
    extensions: tuple[Extension, ...] = ()

    def encode(self, w: Writer) -> None:
        w.opaque(self.group_id).u16(self.version).u16(self.cipher_suite)
        encode_extensions(w, self.extensions)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.opaque(), r.u16(), r.u16(), decode_extensions(r))


@dataclass(frozen=True, slots=True)
class ExternalInit(WireStruct):
    proposal_type: ClassVar[ProposalType] = ProposalType.EXTERNAL_INIT
    kem_output: bytes

    def encode(self, w: Writer) -> None:
        w.opaque(self.kem_output)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.opaque())


@dataclass(frozen=True, slots=True)
class GroupContextExtensions(WireStruct):
    proposal_type: ClassVar[ProposalType] = ProposalType.GROUP_CONTEXT_EXTENSIONS
    extensions: tuple[Extension, ...]

    def encode(self, w: Writer) -> None:
        encode_extensions(w, self.extensions)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(decode_extensions(r))


Proposal = Add | Update | Remove | PreSharedKey | ReInit | ExternalInit | GroupContextExtensions

_PROPOSAL_CLASSES: dict[ProposalType, type[Proposal]] = {
    ProposalType.ADD: Add,
    ProposalType.UPDATE: Update,
    ProposalType.REMOVE: Remove,
    ProposalType.PSK: PreSharedKey,
    ProposalType.REINIT: ReInit,
    ProposalType.EXTERNAL_INIT: ExternalInit,
    ProposalType.GROUP_CONTEXT_EXTENSIONS: GroupContextExtensions,
}


def encode_proposal(w: Writer, proposal: Proposal) -> None:
    """struct Proposal: the type, then the body."""
    w.u16(proposal.proposal_type)
    proposal.encode(w)


def decode_proposal(r: Reader) -> Proposal:
    ptype = read_enum(r, ProposalType, 2)
    return _PROPOSAL_CLASSES[ptype].decode(r)


def proposal_to_bytes(proposal: Proposal) -> bytes:
    w = Writer()
    encode_proposal(w, proposal)
    return w.bytes()
