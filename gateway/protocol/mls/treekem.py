"""TreeKEM (RFC 9420 sections 7.4-7.6 and 12.4.2): creating an UpdatePath as a committer, and processing one
as a receiver.

Both directions work on copies and return a new tree and new private state, so a path that fails any check
leaves the caller's state untouched. The caller supplies the provisional GroupContext through `make_context`
because it depends on the tree hash after the path is merged.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.protocol.mls import tree_math as tm
from gateway.protocol.mls.commit import UpdatePath, UpdatePathNode
from gateway.protocol.mls.crypto import (
    CipherSuite,
    Signer,
    decrypt_with_label,
    derive_secret,
    encrypt_with_label,
    sign_with_label,
)
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.key_package import LEAF_NODE_SIGN_LABEL, LeafNode
from gateway.protocol.mls.nodes import ParentNode
from gateway.protocol.mls.ratchet_tree import MlsTreeError, RatchetTree, leaf_signature_valid
from gateway.protocol.mls.tree_math import LeafIndex, NodeIndex
from gateway.protocol.mls.welcome_structs import GroupContext
from gateway.protocol.mls.wire import HPKECiphertext, LeafNodeSource

UPDATE_PATH_NODE_LABEL = b"UpdatePathNode"

ContextFactory = Callable[[bytes], GroupContext]
"""Given the tree hash after the path is merged, returns the provisional GroupContext to encrypt to."""


def derive_node_key_pair(cs: CipherSuite, path_secret: bytes) -> tuple[bytes, bytes]:
    """(private, public) HPKE key pair of a node from its path secret."""
    return cs.derive_key_pair(derive_secret(cs, path_secret, b"node"))


def next_path_secret(cs: CipherSuite, path_secret: bytes) -> bytes:
    return derive_secret(cs, path_secret, b"path")


@dataclass(slots=True)
class TreeKemPrivate:
    """A member's HPKE private keys: its leaf key and the keys of the parent nodes it knows."""

    leaf_index: LeafIndex
    keys: dict[NodeIndex, bytes] = field(default_factory=dict, repr=False)

    def copy(self) -> TreeKemPrivate:
        return TreeKemPrivate(self.leaf_index, dict(self.keys))

    @classmethod
    def for_leaf(cls, leaf_index: LeafIndex, encryption_priv: bytes) -> TreeKemPrivate:
        return cls(leaf_index, {tm.leaf_to_node(leaf_index): encryption_priv})

    def set_node_secret(self, cs: CipherSuite, tree: RatchetTree, node: NodeIndex, path_secret: bytes) -> None:
        """Install the key of one parent node from its path secret, checking it against the public tree."""
        priv, pub = derive_node_key_pair(cs, path_secret)
        tree_node = tree.node(node)
        if tree_node is None or tree_node.encryption_key != pub:
            raise MlsTreeError(f"path secret for node {node} does not match the tree's public key")
        self.keys[node] = priv

    def install_path_secret(self, cs: CipherSuite, tree: RatchetTree, start: NodeIndex, path_secret: bytes) -> None:
        """Install `path_secret` at `start` and the secrets derived from it at every non-blank ancestor
        (a joiner's path secret from a Welcome, RFC 9420 section 12.4.3.1)."""
        if not tm.is_in_subtree(tm.leaf_to_node(self.leaf_index), start):
            raise MlsTreeError(f"node {start} is not an ancestor of leaf {self.leaf_index}")
        secret = path_secret
        for x in [start, *tm.direct_path(start, tree.n_leaves)]:
            if tree.node(x) is None:
                continue
            self.set_node_secret(cs, tree, x, secret)
            secret = next_path_secret(cs, secret)

    def check_leaf(self, cs: CipherSuite, tree: RatchetTree) -> None:
        """Our leaf private key matches the public key in our leaf."""
        leaf = tree.leaf(self.leaf_index)
        priv = self.keys.get(tm.leaf_to_node(self.leaf_index))
        if leaf is None or priv is None or cs.hpke_public_key(priv) != leaf.encryption_key:
            raise MlsTreeError(f"leaf {self.leaf_index}: private key does not match the tree")

    def prune(self, tree: RatchetTree) -> None:
        """Delete keys of nodes that are blank or no longer on our direct path (forward secrecy after
        removes and updates blank parts of the tree)."""
        own = tm.leaf_to_node(self.leaf_index)
        keep = {own, *tm.direct_path(own, tree.n_leaves)}
        for x in list(self.keys):
            if x not in keep or x >= len(tree.nodes()) or tree.node(x) is None:
                del self.keys[x]

    def forget_path(self, tree: RatchetTree, leaf: LeafIndex) -> None:
        """Drop keys of nodes on `leaf`'s direct path (they are being replaced or blanked)."""
        for x in tm.direct_path(tm.leaf_to_node(leaf), tree.n_leaves):
            self.keys.pop(x, None)


@dataclass(frozen=True, slots=True)
class CreatedPath:
    """Result of creating an UpdatePath: send `update_path`; merge `tree` and `private` when the commit is."""

    update_path: UpdatePath
    tree: RatchetTree
    private: TreeKemPrivate
    commit_secret: bytes = field(repr=False)
    path_secrets: dict[NodeIndex, bytes] = field(repr=False)
    """Path secret of each node on the filtered direct path, for joiners' GroupSecrets."""
    context: GroupContext


@dataclass(frozen=True, slots=True)
class ProcessedPath:
    tree: RatchetTree
    private: TreeKemPrivate
    commit_secret: bytes = field(repr=False)
    path_secret: bytes = field(repr=False)
    """The path secret this member decrypted (at the lowest node shared with the sender's path)."""
    decrypted_at: NodeIndex
    context: GroupContext


def _toward(p: NodeIndex, x: NodeIndex) -> tuple[NodeIndex, NodeIndex]:
    """(child of p on x's side, the other child)."""
    left, right = tm.left(p), tm.right(p)
    return (left, right) if x < p else (right, left)


def _merge_public_path(
    cs: CipherSuite, tree: RatchetTree, sender: LeafIndex, path_nodes: list[NodeIndex], keys: list[bytes]
) -> bytes:
    """Blank the sender's direct path, set the new parent nodes with their parent hashes (top down) and
    return the parent hash the sender's new leaf must carry."""
    tree.blank_path(sender)
    x = tm.leaf_to_node(sender)
    parent_hash = b""
    for i in range(len(path_nodes) - 1, -1, -1):
        tree.set_node(path_nodes[i], ParentNode(keys[i], parent_hash, ()))
        parent_hash = tree.parent_hash_of(cs, path_nodes[i], _toward(path_nodes[i], x)[0])
    return parent_hash


def create_update_path(
    cs: CipherSuite,
    tree: RatchetTree,
    private: TreeKemPrivate,
    group_id: bytes,
    leaf_template: LeafNode,
    signer: Signer,
    make_context: ContextFactory,
    excluded: frozenset[LeafIndex] = frozenset(),
    random: Callable[[int], bytes] = os.urandom,
) -> CreatedPath:
    """Create an UpdatePath from our leaf over `tree` (proposals already applied); `excluded` are the leaves
    added by this commit, which get the path secret through the Welcome instead."""
    sender = private.leaf_index
    if tree.leaf(sender) is None:
        raise MlsTreeError(f"leaf {sender} is blank: cannot commit from it")
    new_tree = tree.copy()
    fdp = new_tree.filtered_direct_path(sender)
    secrets = [random(cs.hash_len)]
    for _ in fdp:
        secrets.append(next_path_secret(cs, secrets[-1]))
    node_keys = [derive_node_key_pair(cs, s) for s in secrets[: len(fdp)]]
    leaf_priv, leaf_pub = cs.derive_key_pair(random(32))

    parent_hash = _merge_public_path(cs, new_tree, sender, fdp, [pub for _, pub in node_keys])
    unsigned = LeafNode(
        leaf_pub,
        leaf_template.signature_key,
        leaf_template.credential,
        leaf_template.capabilities,
        LeafNodeSource.COMMIT,
        None,
        parent_hash,
        leaf_template.extensions,
        b"",
    )
    signature = sign_with_label(signer, LEAF_NODE_SIGN_LABEL, unsigned.tbs(group_id, sender))
    leaf = dataclasses.replace(unsigned, signature=signature)
    new_tree.set_node(tm.leaf_to_node(sender), leaf)
    context = make_context(new_tree.tree_hash(cs))
    ctx_bytes = context.to_bytes()

    x = tm.leaf_to_node(sender)
    path_nodes: list[UpdatePathNode] = []
    for i, p in enumerate(fdp):
        copath_child = _toward(p, x)[1]
        cts = []
        for r in new_tree.resolution(copath_child, excluded):
            target = new_tree.node(r)
            assert target is not None
            kem_output, ct = encrypt_with_label(
                cs, target.encryption_key, UPDATE_PATH_NODE_LABEL, ctx_bytes, secrets[i]
            )
            cts.append(HPKECiphertext(kem_output, ct))
        path_nodes.append(UpdatePathNode(node_keys[i][1], tuple(cts)))

    new_private = private.copy()
    new_private.forget_path(tree, sender)
    new_private.keys[x] = leaf_priv
    for p, (priv, _pub) in zip(fdp, node_keys, strict=True):
        new_private.keys[p] = priv
    return CreatedPath(
        UpdatePath(leaf, tuple(path_nodes)),
        new_tree,
        new_private,
        secrets[len(fdp)],
        dict(zip(fdp, secrets, strict=False)),
        context,
    )


def process_update_path(
    cs: CipherSuite,
    tree: RatchetTree,
    private: TreeKemPrivate,
    sender: LeafIndex,
    path: UpdatePath,
    group_id: bytes,
    make_context: ContextFactory,
    excluded: frozenset[LeafIndex] = frozenset(),
) -> ProcessedPath:
    """Apply another member's UpdatePath to `tree` (proposals already applied) and decrypt our path secret.

    Checks: the new leaf is a commit leaf signed by the sender, the path has one node per filtered direct path
    node and one ciphertext per resolution member, the leaf's parent hash chains to the new parent nodes, and
    every public key derived from the decrypted secret matches the one sent. Full LeafNode validation
    (capabilities, credential) is the group layer's (`ratchet_tree.validate_leaf_node`).
    """
    me = private.leaf_index
    if sender == me:
        raise MlsTreeError("a member does not process its own UpdatePath; merge the created path instead")
    if tree.leaf(sender) is None:
        raise MlsTreeError(f"UpdatePath sender leaf {sender} is blank")
    leaf = path.leaf_node
    if leaf.leaf_node_source != LeafNodeSource.COMMIT:
        raise MlsTreeError("the UpdatePath leaf must have leaf_node_source commit")
    if not leaf_signature_valid(cs, leaf, group_id, sender):
        raise MlsTreeError(f"UpdatePath leaf of sender {sender}: invalid signature")
    fdp = tree.filtered_direct_path(sender)
    if len(path.nodes) != len(fdp):
        raise MlsTreeError(f"UpdatePath has {len(path.nodes)} nodes, the filtered direct path has {len(fdp)}")
    x = tm.leaf_to_node(sender)
    for p, upn in zip(fdp, path.nodes, strict=True):
        expected = len(tree.resolution(_toward(p, x)[1], excluded))
        if len(upn.encrypted_path_secret) != expected:
            got = len(upn.encrypted_path_secret)
            raise MlsTreeError(f"UpdatePath node for {p}: {got} ciphertexts, need {expected}")

    new_tree = tree.copy()
    parent_hash = _merge_public_path(cs, new_tree, sender, fdp, [n.encryption_key for n in path.nodes])
    if leaf.parent_hash != parent_hash:
        raise MlsTreeError("UpdatePath leaf parent_hash does not match the new path (parent hash invalid)")
    new_tree.set_node(x, leaf)
    new_tree.check_unique_keys()
    context = make_context(new_tree.tree_hash(cs))

    me_node = tm.leaf_to_node(me)
    i = next((k for k, p in enumerate(fdp) if tm.is_in_subtree(me_node, _toward(p, x)[1])), None)
    if i is None:
        raise MlsTreeError(f"leaf {me} is not covered by the sender's filtered direct path")
    p = fdp[i]
    copath_child = _toward(p, x)[1]
    resolution = tree.resolution(copath_child, excluded)
    held = next(((j, r) for j, r in enumerate(resolution) if r in private.keys), None)
    if held is None:
        raise MlsTreeError(f"leaf {me} holds no private key in the resolution of node {copath_child}")
    j, r = held
    held_node = tree.node(r)
    if held_node is None or cs.hpke_public_key(private.keys[r]) != held_node.encryption_key:
        raise MlsTreeError(f"our private key for node {r} does not match the tree (stale private state)")
    ct = path.nodes[i].encrypted_path_secret[j]
    try:
        path_secret = decrypt_with_label(
            cs, private.keys[r], UPDATE_PATH_NODE_LABEL, context.to_bytes(), ct.kem_output, ct.ciphertext
        )
    except MlsError as e:
        raise MlsTreeError(f"cannot decrypt the path secret for node {p}: {e}") from e

    new_private = private.copy()
    new_private.forget_path(tree, sender)
    secret = path_secret
    for k in range(i, len(fdp)):
        priv, pub = derive_node_key_pair(cs, secret)
        if pub != path.nodes[k].encryption_key:
            raise MlsTreeError(f"decrypted path secret does not derive the public key sent for node {fdp[k]}")
        new_private.keys[fdp[k]] = priv
        secret = next_path_secret(cs, secret)
    return ProcessedPath(new_tree, new_private, secret, path_secret, fdp[i], context)
