"""Commit, ProposalOrRef and UpdatePath (RFC 9420 sections 12.4 and 7.6): encodings only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from gateway.protocol.mls.codec import Reader, Writer
from gateway.protocol.mls.key_package import LeafNode
from gateway.protocol.mls.proposals import Proposal, decode_proposal, encode_proposal
from gateway.protocol.mls.wire import HPKECiphertext, ProposalOrRefType, WireStruct, put, read_enum


@dataclass(frozen=True, slots=True)
class ProposalRef:
    """A reference (RefHash of an AuthenticatedContent) to a proposal sent earlier in the epoch."""

    ref: bytes


ProposalOrRef = Proposal | ProposalRef


def encode_proposal_or_ref(w: Writer, item: ProposalOrRef) -> None:
    if isinstance(item, ProposalRef):
        w.u8(ProposalOrRefType.REFERENCE).opaque(item.ref)
    else:
        w.u8(ProposalOrRefType.PROPOSAL)
        encode_proposal(w, item)


def decode_proposal_or_ref(r: Reader) -> ProposalOrRef:
    kind = read_enum(r, ProposalOrRefType, 1)
    if kind == ProposalOrRefType.REFERENCE:
        return ProposalRef(r.opaque())
    return decode_proposal(r)


@dataclass(frozen=True, slots=True)
class UpdatePathNode(WireStruct):
    encryption_key: bytes
    encrypted_path_secret: tuple[HPKECiphertext, ...]

    def encode(self, w: Writer) -> None:
        w.opaque(self.encryption_key)
        w.vector(self.encrypted_path_secret, put)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.opaque(), tuple(r.vector(HPKECiphertext.decode)))


@dataclass(frozen=True, slots=True)
class UpdatePath(WireStruct):
    leaf_node: LeafNode
    nodes: tuple[UpdatePathNode, ...]

    def encode(self, w: Writer) -> None:
        self.leaf_node.encode(w)
        w.vector(self.nodes, put)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(LeafNode.decode(r), tuple(r.vector(UpdatePathNode.decode)))


@dataclass(frozen=True, slots=True)
class Commit(WireStruct):
    proposals: tuple[ProposalOrRef, ...] = ()
    path: UpdatePath | None = None

    def encode(self, w: Writer) -> None:
        w.vector(self.proposals, encode_proposal_or_ref)
        w.optional(self.path, put)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        proposals = tuple(r.vector(decode_proposal_or_ref))
        return cls(proposals, r.optional(UpdatePath.decode))
