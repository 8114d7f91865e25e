"""The public ratchet tree (RFC 9420 sections 4, 7.4-7.9 and 12.4.3.1): node storage, resolution, tree hashes,
parent hashes and the validity checks a member runs on a tree it did not build.

The tree always spans a power-of-two number of leaves; the wire form (ratchet_tree extension) drops trailing
blank nodes. Tree hashes are cached per node and invalidated along the direct path of every change, so a commit
in a large group rehashes only one path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from gateway.protocol.mls import tree_math as tm
from gateway.protocol.mls.codec import Writer
from gateway.protocol.mls.credentials import IdentityValidator
from gateway.protocol.mls.crypto import CipherSuite, verify_with_label
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.extensions import Extension, required_capabilities
from gateway.protocol.mls.key_package import LEAF_NODE_SIGN_LABEL, LeafNode
from gateway.protocol.mls.nodes import Node, ParentNode, decode_ratchet_tree, encode_ratchet_tree
from gateway.protocol.mls.tree_math import LeafIndex, NodeIndex
from gateway.protocol.mls.wire import LeafNodeSource, NodeType

DEFAULT_EXTENSION_TYPES = frozenset(range(1, 6))
DEFAULT_PROPOSAL_TYPES = frozenset(range(1, 8))


class MlsTreeError(MlsError):
    """A ratchet tree (or a change to it) violates RFC 9420's structural or cryptographic rules."""


class RatchetTree:
    """Nodes of the public tree, indexed by NodeIndex; `None` is a blank node."""

    __slots__ = ("_cred_summary", "_hash_cache", "_nodes")

    def __init__(self, nodes: Sequence[Node | None]) -> None:
        n_leaves = 1
        while tm.node_width(n_leaves) < len(nodes):
            n_leaves *= 2
        self._nodes: list[Node | None] = list(nodes) + [None] * (tm.node_width(n_leaves) - len(nodes))
        self._hash_cache: dict[int, bytes] = {}
        self._cred_summary: tuple[frozenset[int], frozenset[int]] | None = None

    # --- construction and wire form --------------------------------------------------------------------

    @classmethod
    def from_wire(cls, data: bytes) -> RatchetTree:
        """Decode the ratchet_tree extension body; the list must be non-empty and end in a non-blank leaf."""
        nodes = decode_ratchet_tree(data)
        if not nodes or nodes[-1] is None or len(nodes) % 2 == 0:
            raise MlsTreeError("a ratchet_tree must be non-empty and end with a non-blank leaf")
        return cls(nodes)

    @classmethod
    def one_member(cls, leaf: LeafNode) -> RatchetTree:
        return cls([leaf])

    def to_wire(self) -> bytes:
        nodes = list(self._nodes)
        while nodes and nodes[-1] is None:
            nodes.pop()
        return encode_ratchet_tree(nodes)

    def copy(self) -> RatchetTree:
        t = RatchetTree.__new__(RatchetTree)
        t._nodes = list(self._nodes)
        t._hash_cache = dict(self._hash_cache)
        t._cred_summary = self._cred_summary
        return t

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RatchetTree) and self._nodes == other._nodes

    __hash__ = None  # type: ignore[assignment]

    # --- access ----------------------------------------------------------------------------------------

    @property
    def n_leaves(self) -> int:
        return (len(self._nodes) + 1) // 2

    @property
    def root(self) -> NodeIndex:
        return tm.root(self.n_leaves)

    def node(self, x: NodeIndex) -> Node | None:
        return self._nodes[x]

    def leaf(self, i: LeafIndex) -> LeafNode | None:
        if not 0 <= i < self.n_leaves:
            return None
        node = self._nodes[tm.leaf_to_node(i)]
        assert node is None or isinstance(node, LeafNode)
        return node

    def parent_node(self, x: NodeIndex) -> ParentNode | None:
        node = self._nodes[x]
        assert node is None or isinstance(node, ParentNode)
        return node

    def leaves(self) -> Iterator[tuple[LeafIndex, LeafNode]]:
        """Non-blank leaves with their indices."""
        for i in range(self.n_leaves):
            node = self._nodes[2 * i]
            if isinstance(node, LeafNode):
                yield LeafIndex(i), node

    def nodes(self) -> list[Node | None]:
        return list(self._nodes)

    def credential_summary(self) -> tuple[frozenset[int], frozenset[int]]:
        """(credential types in use, credential types every member supports), cached until a leaf changes."""
        if self._cred_summary is None:
            in_use: set[int] = set()
            supported: set[int] | None = None
            for _, leaf in self.leaves():
                in_use.add(leaf.credential.credential_type)
                caps = set(leaf.capabilities.credentials)
                supported = caps if supported is None else supported & caps
            self._cred_summary = (frozenset(in_use), frozenset(supported or ()))
        return self._cred_summary

    # --- mutation (every change invalidates cached hashes up the direct path) ---------------------------

    def set_node(self, x: NodeIndex, node: Node | None) -> None:
        if node is not None and isinstance(node, LeafNode) != tm.is_leaf(x):
            raise MlsTreeError(f"node {x}: leaves go at even indices, parents at odd ones")
        self._nodes[x] = node
        self._invalidate(x)
        if tm.is_leaf(x):
            self._cred_summary = None

    def _invalidate(self, x: NodeIndex) -> None:
        self._hash_cache.pop(x, None)
        for p in tm.direct_path(x, self.n_leaves):
            self._hash_cache.pop(p, None)

    def _extend(self) -> None:
        """Double the leaf count: the old tree becomes the left subtree of a new blank root."""
        old = self.n_leaves
        self._nodes.extend([None] * (tm.node_width(2 * old) - len(self._nodes)))
        self._hash_cache.clear()

    def truncate(self) -> None:
        """Halve the tree while every leaf of its right half is blank (RFC 9420 section 12.1.3)."""
        while self.n_leaves > 1 and all(n is None for n in self._nodes[self.n_leaves::2]):
            self._nodes = self._nodes[: tm.node_width(self.n_leaves // 2)]
            self._hash_cache.clear()

    def add_leaf(self, leaf: LeafNode) -> LeafIndex:
        """Place a new member in the leftmost blank leaf (extending if full) and mark it unmerged above."""
        index = next((LeafIndex(i) for i in range(self.n_leaves) if self._nodes[2 * i] is None), None)
        if index is None:
            index = LeafIndex(self.n_leaves)
            self._extend()
        x = tm.leaf_to_node(index)
        self.set_node(x, leaf)
        for p in tm.direct_path(x, self.n_leaves):
            pn = self._nodes[p]
            if isinstance(pn, ParentNode):
                self._nodes[p] = ParentNode(pn.encryption_key, pn.parent_hash, (*pn.unmerged_leaves, index))
        return index

    def blank_path(self, leaf: LeafIndex) -> None:
        for p in tm.direct_path(tm.leaf_to_node(leaf), self.n_leaves):
            self.set_node(p, None)

    def remove_leaf(self, leaf: LeafIndex) -> None:
        if self.leaf(leaf) is None:
            raise MlsTreeError(f"cannot remove leaf {leaf}: it is blank or outside the tree")
        self.set_node(tm.leaf_to_node(leaf), None)
        self.blank_path(leaf)
        self.truncate()

    def update_leaf(self, leaf: LeafIndex, node: LeafNode) -> None:
        if self.leaf(leaf) is None:
            raise MlsTreeError(f"cannot update leaf {leaf}: it is blank or outside the tree")
        self.set_node(tm.leaf_to_node(leaf), node)
        self.blank_path(leaf)

    # --- resolution and filtered direct path -----------------------------------------------------------

    def resolution(self, x: NodeIndex, exclude: frozenset[LeafIndex] = frozenset()) -> list[NodeIndex]:
        """Non-blank nodes covering x's subtree (section 4.1.1); `exclude` drops leaves (new joiners)."""
        node = self._nodes[x]
        if node is None:
            if tm.is_leaf(x):
                return []
            return self.resolution(tm.left(x), exclude) + self.resolution(tm.right(x), exclude)
        if isinstance(node, LeafNode):
            return [] if tm.node_to_leaf(x) in exclude else [x]
        return [x, *(tm.leaf_to_node(LeafIndex(u)) for u in node.unmerged_leaves if u not in exclude)]

    def filtered_direct_path(self, leaf: LeafIndex) -> list[NodeIndex]:
        """Direct path minus nodes whose copath child has an empty resolution (section 4.1.2)."""
        x = tm.leaf_to_node(leaf)
        out: list[NodeIndex] = []
        for p, s in zip(tm.direct_path(x, self.n_leaves), tm.copath(x, self.n_leaves), strict=True):
            if self.resolution(s):
                out.append(p)
        return out

    # --- tree hash (section 7.8) -----------------------------------------------------------------------

    def tree_hash(self, cs: CipherSuite) -> bytes:
        return self.node_hash(cs, self.root)

    def node_hash(self, cs: CipherSuite, x: NodeIndex) -> bytes:
        cached = self._hash_cache.get(x)
        if cached is None:
            cached = self._compute_hash(cs, x, frozenset())
            self._hash_cache[x] = cached
        return cached

    def _compute_hash(self, cs: CipherSuite, x: NodeIndex, removed: frozenset[int]) -> bytes:
        node = self._nodes[x]
        w = Writer()
        if tm.is_leaf(x):
            leaf_index = tm.node_to_leaf(x)
            w.u8(NodeType.LEAF).u32(leaf_index)
            if node is None or leaf_index in removed:
                w.u8(0)
            else:
                w.u8(1)
                node.encode(w)
            return cs.hash(w.bytes())
        if removed:
            left = self._compute_hash(cs, tm.left(x), removed)
            right = self._compute_hash(cs, tm.right(x), removed)
        else:
            left = self.node_hash(cs, tm.left(x))
            right = self.node_hash(cs, tm.right(x))
        w.u8(NodeType.PARENT)
        if node is None:
            w.u8(0)
        else:
            assert isinstance(node, ParentNode)
            w.u8(1)
            if removed:
                kept = tuple(u for u in node.unmerged_leaves if u not in removed)
                node = ParentNode(node.encryption_key, node.parent_hash, kept)
            node.encode(w)
        w.opaque(left).opaque(right)
        return cs.hash(w.bytes())

    # --- parent hash (section 7.9) ---------------------------------------------------------------------

    def original_sibling_tree_hash(self, cs: CipherSuite, p: NodeIndex, s: NodeIndex) -> bytes:
        """Tree hash of s as it was when p was last set: p's unmerged leaves are treated as absent."""
        pn = self.parent_node(p)
        removed = frozenset(pn.unmerged_leaves) if pn is not None else frozenset()
        if not removed:
            return self.node_hash(cs, s)
        return self._compute_hash(cs, s, removed)

    def parent_hash_of(self, cs: CipherSuite, p: NodeIndex, child: NodeIndex) -> bytes:
        """The parent_hash value a child of p (on `child`'s side) must carry to be valid with respect to p."""
        pn = self.parent_node(p)
        if pn is None:
            raise MlsTreeError(f"node {p} is blank: it has no parent hash to offer")
        s = tm.right(p) if child == tm.left(p) else tm.left(p)
        osth = self.original_sibling_tree_hash(cs, p, s)
        return cs.hash(Writer().opaque(pn.encryption_key).opaque(pn.parent_hash).opaque(osth).bytes())

    def verify_parent_hashes(self, cs: CipherSuite) -> None:
        """Every non-blank parent must be parent-hash valid with respect to exactly one descendant D (section
        7.9.2): D.parent_hash matches P's parent hash toward D's side C, D is in C's resolution, and the rest of
        that resolution is exactly P's unmerged leaves under C."""
        for i in range(1, len(self._nodes), 2):
            p = NodeIndex(i)
            pn = self._nodes[p]
            if pn is None:
                continue
            assert isinstance(pn, ParentNode)
            matches = 0
            for child in (tm.left(p), tm.right(p)):
                expected = self.parent_hash_of(cs, p, child)
                resolution = self.resolution(child)
                unmerged_below = {
                    tm.leaf_to_node(LeafIndex(u))
                    for u in pn.unmerged_leaves
                    if tm.is_in_subtree(tm.leaf_to_node(LeafIndex(u)), child)
                }
                for d in resolution:
                    node = self._nodes[d]
                    if node is None or node.parent_hash != expected:
                        continue
                    if set(resolution) - {d} == unmerged_below:
                        matches += 1
            if matches != 1:
                raise MlsTreeError(f"parent node {p} is not parent-hash valid ({matches} descendants chain to it)")

    # --- validity when joining (section 12.4.3.1) ------------------------------------------------------

    def verify_leaf_signature(self, cs: CipherSuite, group_id: bytes, leaf_index: LeafIndex) -> bool:
        leaf = self.leaf(leaf_index)
        if leaf is None:
            return False
        return leaf_signature_valid(cs, leaf, group_id, leaf_index)

    def check_unmerged_leaves(self) -> None:
        """Each unmerged leaf is a non-blank descendant, also unmerged at every non-blank node in between."""
        for i in range(1, len(self._nodes), 2):
            pn = self._nodes[i]
            if pn is None:
                continue
            assert isinstance(pn, ParentNode)
            for u in pn.unmerged_leaves:
                x = tm.leaf_to_node(LeafIndex(u))
                if u >= self.n_leaves or self._nodes[x] is None or not tm.is_in_subtree(x, NodeIndex(i)):
                    raise MlsTreeError(f"parent {i} lists unmerged leaf {u}, which is blank or not below it")
                for q in tm.direct_path(x, self.n_leaves):
                    if q == i:
                        break
                    qn = self._nodes[q]
                    if isinstance(qn, ParentNode) and u not in qn.unmerged_leaves:
                        raise MlsTreeError(f"leaf {u} is unmerged at {i} but not at intermediate node {q}")

    def check_unique_keys(self) -> None:
        """HPKE keys are unique across all nodes; signature keys across all leaves."""
        enc: set[bytes] = set()
        sig: set[bytes] = set()
        for x, node in enumerate(self._nodes):
            if node is None:
                continue
            if node.encryption_key in enc:
                raise MlsTreeError(f"node {x}: encryption key appears twice in the tree")
            enc.add(node.encryption_key)
            if isinstance(node, LeafNode):
                if node.signature_key in sig:
                    raise MlsTreeError(f"node {x}: signature key appears twice in the tree")
                sig.add(node.signature_key)

    def validate(
        self,
        cs: CipherSuite,
        group_id: bytes,
        group_extensions: tuple[Extension, ...],
        identity_validator: IdentityValidator,
    ) -> None:
        """Everything a joiner checks about a tree received from others, except the GroupInfo tree hash."""
        self.verify_parent_hashes(cs)
        self.check_unmerged_leaves()
        self.check_unique_keys()
        for index, leaf in self.leaves():
            validate_leaf_node(cs, self, leaf, index, group_id, group_extensions, identity_validator)


def leaf_signature_valid(cs: CipherSuite, leaf: LeafNode, group_id: bytes, leaf_index: LeafIndex) -> bool:
    tbs = leaf.tbs(group_id, leaf_index)
    return verify_with_label(cs, leaf.signature_key, LEAF_NODE_SIGN_LABEL, tbs, leaf.signature)


def validate_leaf_node(
    cs: CipherSuite,
    tree: RatchetTree,
    leaf: LeafNode,
    leaf_index: LeafIndex,
    group_id: bytes,
    group_extensions: tuple[Extension, ...],
    identity_validator: IdentityValidator,
    *,
    expected_source: LeafNodeSource | None = None,
    now: int | None = None,
) -> None:
    """LeafNode validation (section 7.3) of `leaf` at `leaf_index` against the rest of `tree`."""
    identity_validator(leaf.credential, leaf.signature_key)
    if not leaf_signature_valid(cs, leaf, group_id, leaf_index):
        raise MlsTreeError(f"leaf {leaf_index}: invalid LeafNode signature")
    if expected_source is not None and leaf.leaf_node_source != expected_source:
        raise MlsTreeError(f"leaf {leaf_index}: source {leaf.leaf_node_source.name}, expected {expected_source.name}")
    caps = leaf.capabilities
    req = required_capabilities(group_extensions)
    if req is not None:
        missing = (set(req.extension_types) - set(caps.extensions) - DEFAULT_EXTENSION_TYPES) | (
            set(req.proposal_types) - set(caps.proposals) - DEFAULT_PROPOSAL_TYPES
        )
        if missing or not set(req.credential_types) <= set(caps.credentials):
            raise MlsTreeError(f"leaf {leaf_index}: does not support the group's required capabilities")
    if cs.suite_id not in caps.cipher_suites:
        raise MlsTreeError(f"leaf {leaf_index}: does not list the group's cipher suite 0x{cs.suite_id:04x}")
    if leaf.credential.credential_type not in caps.credentials:
        raise MlsTreeError(f"leaf {leaf_index}: does not list its own credential type")
    in_use, supported_by_all = tree.credential_summary()
    if leaf.credential.credential_type not in supported_by_all or not in_use <= set(caps.credentials):
        for other_index, other in tree.leaves():
            if other_index == leaf_index:
                continue
            if leaf.credential.credential_type not in other.capabilities.credentials:
                raise MlsTreeError(f"leaf {leaf_index}: credential type unsupported by member {other_index}")
            if other.credential.credential_type not in caps.credentials:
                raise MlsTreeError(f"leaf {leaf_index}: does not support member {other_index}'s credential type")
    unlisted = {e.extension_type for e in leaf.extensions} - set(caps.extensions) - DEFAULT_EXTENSION_TYPES
    if unlisted:
        raise MlsTreeError(f"leaf {leaf_index}: uses extensions {sorted(unlisted)} it does not list in capabilities")
    if now is not None and leaf.lifetime is not None and not leaf.lifetime.contains(now):
        raise MlsTreeError(f"leaf {leaf_index}: outside its lifetime")


def tree_from_nodes(nodes: Sequence[Node | None]) -> RatchetTree:
    return RatchetTree(nodes)
