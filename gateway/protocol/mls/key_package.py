"""KeyPackage and LeafNode (RFC 9420 sections 7.2 and 10), with Capabilities and Lifetime.

These are encodings only; the signed-over bytes are exposed (`tbs()`), and signature checks are done by the
callers that hold the crypto (`ratchet_tree.verify_leaf_signature`, KeyPackage validation in the group layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from gateway.protocol.mls.codec import Reader, Writer
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.extensions import Extension, decode_extensions, encode_extensions
from gateway.protocol.mls.wire import LeafNodeSource, WireStruct, put_u16, read_enum

LEAF_NODE_SIGN_LABEL = b"LeafNodeTBS"
KEY_PACKAGE_SIGN_LABEL = b"KeyPackageTBS"


@dataclass(frozen=True, slots=True)
class Capabilities(WireStruct):
    versions: tuple[int, ...] = (1,)
    cipher_suites: tuple[int, ...] = ()
    extensions: tuple[int, ...] = ()
    proposals: tuple[int, ...] = ()
    credentials: tuple[int, ...] = ()

    def encode(self, w: Writer) -> None:
        for xs in (self.versions, self.cipher_suites, self.extensions, self.proposals, self.credentials):
            w.vector(xs, put_u16)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(*(tuple(r.vector(Reader.u16)) for _ in range(5)))


@dataclass(frozen=True, slots=True)
class Lifetime(WireStruct):
    not_before: int
    not_after: int

    def encode(self, w: Writer) -> None:
        w.u64(self.not_before).u64(self.not_after)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.u64(), r.u64())

    def contains(self, now: int) -> bool:
        """Whether `now` (seconds since the epoch, supplied by the caller) lies in [not_before, not_after]."""
        return self.not_before <= now <= self.not_after


@dataclass(frozen=True, slots=True)
class LeafNode(WireStruct):
    encryption_key: bytes
    signature_key: bytes
    credential: Credential
    capabilities: Capabilities
    leaf_node_source: LeafNodeSource
    lifetime: Lifetime | None = None
    parent_hash: bytes | None = None
    extensions: tuple[Extension, ...] = ()
    signature: bytes = b""

    def __post_init__(self) -> None:
        if (self.lifetime is not None) != (self.leaf_node_source == LeafNodeSource.KEY_PACKAGE):
            raise ValueError("a lifetime is present exactly when leaf_node_source is key_package")
        if (self.parent_hash is not None) != (self.leaf_node_source == LeafNodeSource.COMMIT):
            raise ValueError("a parent_hash is present exactly when leaf_node_source is commit")

    def _encode_content(self, w: Writer) -> None:
        w.opaque(self.encryption_key).opaque(self.signature_key)
        self.credential.encode(w)
        self.capabilities.encode(w)
        w.u8(self.leaf_node_source)
        if self.lifetime is not None:
            self.lifetime.encode(w)
        if self.parent_hash is not None:
            w.opaque(self.parent_hash)
        encode_extensions(w, self.extensions)

    def encode(self, w: Writer) -> None:
        self._encode_content(w)
        w.opaque(self.signature)

    def tbs(self, group_id: bytes | None = None, leaf_index: int | None = None) -> bytes:
        """LeafNodeTBS: for update and commit sources the group id and leaf index are bound in."""
        w = Writer()
        self._encode_content(w)
        if self.leaf_node_source != LeafNodeSource.KEY_PACKAGE:
            if group_id is None or leaf_index is None:
                raise ValueError("LeafNodeTBS of an update/commit leaf needs group_id and leaf_index")
            w.opaque(group_id).u32(leaf_index)
        return w.bytes()

    @classmethod
    def decode(cls, r: Reader) -> Self:
        encryption_key = r.opaque()
        signature_key = r.opaque()
        credential = Credential.decode(r)
        capabilities = Capabilities.decode(r)
        source = read_enum(r, LeafNodeSource, 1)
        lifetime = Lifetime.decode(r) if source == LeafNodeSource.KEY_PACKAGE else None
        parent_hash = r.opaque() if source == LeafNodeSource.COMMIT else None
        extensions = decode_extensions(r)
        signature = r.opaque()
        return cls(encryption_key, signature_key, credential, capabilities, source, lifetime, parent_hash,
                   extensions, signature)


@dataclass(frozen=True, slots=True)
class KeyPackage(WireStruct):
    version: int
    cipher_suite: int
    init_key: bytes
    leaf_node: LeafNode
    extensions: tuple[Extension, ...] = ()
    signature: bytes = b""

    def _encode_content(self, w: Writer) -> None:
        w.u16(self.version).u16(self.cipher_suite).opaque(self.init_key)
        self.leaf_node.encode(w)
        encode_extensions(w, self.extensions)

    def encode(self, w: Writer) -> None:
        self._encode_content(w)
        w.opaque(self.signature)

    def tbs(self) -> bytes:
        w = Writer()
        self._encode_content(w)
        return w.bytes()

    @classmethod
    def decode(cls, r: Reader) -> Self:
        version = r.u16()
        cipher_suite = r.u16()
        init_key = r.opaque()
        leaf_node = LeafNode.decode(r)
        extensions = decode_extensions(r)
        return cls(version, cipher_suite, init_key, leaf_node, extensions, r.opaque())
