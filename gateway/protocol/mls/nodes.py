"""Ratchet-tree nodes on the wire (RFC 9420 sections 7.1 and 12.4.3.3): ParentNode, Node, and the
`optional<Node> ratchet_tree<V>` list carried in the ratchet_tree extension.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

from gateway.protocol.mls.codec import Reader, Writer, decode_all
from gateway.protocol.mls.errors import MlsDecodeError
from gateway.protocol.mls.extensions import Extension
from gateway.protocol.mls.key_package import LeafNode
from gateway.protocol.mls.wire import ExtensionType, NodeType, WireStruct, put_u32, read_enum


@dataclass(frozen=True, slots=True)
class ParentNode(WireStruct):
    encryption_key: bytes
    parent_hash: bytes = b""
    unmerged_leaves: tuple[int, ...] = ()

    def encode(self, w: Writer) -> None:
        w.opaque(self.encryption_key).opaque(self.parent_hash)
        w.vector(self.unmerged_leaves, put_u32)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        return cls(r.opaque(), r.opaque(), tuple(r.vector(Reader.u32)))


Node = LeafNode | ParentNode


def encode_node(w: Writer, node: Node) -> None:
    if isinstance(node, LeafNode):
        w.u8(NodeType.LEAF)
    else:
        w.u8(NodeType.PARENT)
    node.encode(w)


def decode_node(r: Reader) -> Node:
    node_type = read_enum(r, NodeType, 1)
    if node_type == NodeType.LEAF:
        return LeafNode.decode(r)
    return ParentNode.decode(r)


def _encode_optional_node(w: Writer, node: Node | None) -> None:
    if node is None:
        w.u8(0)
    else:
        w.u8(1)
        encode_node(w, node)


def _decode_optional_node(r: Reader) -> Node | None:
    return r.optional(decode_node)


def encode_ratchet_tree(nodes: Sequence[Node | None]) -> bytes:
    return Writer().vector(list(nodes), _encode_optional_node).bytes()


def decode_ratchet_tree(data: bytes) -> list[Node | None]:
    """Syntactic decode of the node list; node kinds are checked against positions (leaves at even indices)."""
    nodes = decode_all(data, lambda r: r.vector(_decode_optional_node))
    for i, node in enumerate(nodes):
        if node is not None and isinstance(node, LeafNode) != (i % 2 == 0):
            raise MlsDecodeError(f"node {i}: a {'leaf' if i % 2 == 0 else 'parent'} position holds the wrong kind")
    return nodes


def ratchet_tree_extension(nodes: Sequence[Node | None]) -> Extension:
    return Extension(ExtensionType.RATCHET_TREE, encode_ratchet_tree(nodes))
