"""treekem.json: UpdatePath processing and creation.

Format: {cipher_suite, group_id, epoch, confirmed_transcript_hash, ratchet_tree,
leaves_private: [{index, encryption_priv, signature_priv, path_secrets: [{node, path_secret}]}],
update_paths: [{sender, update_path, path_secrets[leaf] (hex or null), commit_secret, tree_hash_after}]}.

Beyond the vectors, a group driven by the tree layer alone (adds with joiners, commits from every member,
removals) checks that all members stay in agreement and that removed members cannot decrypt.

Checks: each member's private keys match the public tree; every vector path, processed by every other member
with private state, yields that member's expected path secret, the commit secret and the tree hash after, and
leaves a parent-hash-valid tree; and a path created by each member is processed by every other member to the
same commit secret, path secret and tree. The provisional GroupContext is {group_id, epoch, tree_hash_after,
confirmed_transcript_hash, no extensions}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.protocol.mls.commit import UpdatePath
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.crypto import CipherSuite, Ed25519Signer, decrypt_with_label, get_suite, sign_with_label
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.key_package import LEAF_NODE_SIGN_LABEL, Capabilities, LeafNode, Lifetime
from gateway.protocol.mls.ratchet_tree import MlsTreeError, RatchetTree
from gateway.protocol.mls.tree_math import LeafIndex, NodeIndex, common_ancestor, leaf_to_node
from gateway.protocol.mls.treekem import (
    UPDATE_PATH_NODE_LABEL,
    ContextFactory,
    TreeKemPrivate,
    create_update_path,
    process_update_path,
)
from gateway.protocol.mls.welcome_structs import GroupContext
from gateway.protocol.mls.wire import LeafNodeSource

from .conftest import unhex, vector_params

VECTORS = vector_params("treekem.json")


def _context_factory(cs: CipherSuite, v: dict[str, Any]) -> ContextFactory:
    def make(tree_hash: bytes) -> GroupContext:
        return GroupContext(1, cs.suite_id, unhex(v["group_id"]), v["epoch"], tree_hash,
                            unhex(v["confirmed_transcript_hash"]), ())

    return make


def _private_states(cs: CipherSuite, tree: RatchetTree, v: dict[str, Any]) -> dict[int, TreeKemPrivate]:
    states = {}
    for lp in v["leaves_private"]:
        priv = TreeKemPrivate.for_leaf(LeafIndex(lp["index"]), unhex(lp["encryption_priv"]))
        priv.check_leaf(cs, tree)
        for ps in lp["path_secrets"]:
            priv.set_node_secret(cs, tree, NodeIndex(ps["node"]), unhex(ps["path_secret"]))
        states[lp["index"]] = priv
    return states


@pytest.mark.parametrize("v", VECTORS)
def test_private_state_matches_tree(v: dict[str, Any]) -> None:
    cs = get_suite(v["cipher_suite"])
    tree = RatchetTree.from_wire(unhex(v["ratchet_tree"]))
    tree.verify_parent_hashes(cs)
    states = _private_states(cs, tree, v)
    assert len(states) == len(v["leaves_private"]) >= 1
    for lp in v["leaves_private"]:
        assert len(states[lp["index"]].keys) == 1 + len(lp["path_secrets"])


@pytest.mark.parametrize("v", VECTORS)
def test_process_vector_update_paths(v: dict[str, Any]) -> None:
    cs = get_suite(v["cipher_suite"])
    tree = RatchetTree.from_wire(unhex(v["ratchet_tree"]))
    states = _private_states(cs, tree, v)
    make_context = _context_factory(cs, v)
    processed = 0
    for up in v["update_paths"]:
        sender = LeafIndex(up["sender"])
        path = UpdatePath.from_bytes(unhex(up["update_path"]))
        assert path.to_bytes() == unhex(up["update_path"])
        assert up["path_secrets"][sender] is None
        for index, priv in states.items():
            if index == sender:
                continue
            result = process_update_path(cs, tree, priv, sender, path, unhex(v["group_id"]), make_context)
            assert result.path_secret.hex() == up["path_secrets"][index], f"path secret of leaf {index}"
            assert result.commit_secret.hex() == up["commit_secret"]
            assert result.tree.tree_hash(cs).hex() == up["tree_hash_after"]
            assert result.context.tree_hash.hex() == up["tree_hash_after"]
            result.tree.verify_parent_hashes(cs)
            result.private.check_leaf(cs, result.tree)
            processed += 1
    assert processed >= 1


@pytest.mark.parametrize("v", VECTORS)
def test_created_paths_are_processed_by_every_member(v: dict[str, Any]) -> None:
    cs = get_suite(v["cipher_suite"])
    tree = RatchetTree.from_wire(unhex(v["ratchet_tree"]))
    states = _private_states(cs, tree, v)
    make_context = _context_factory(cs, v)
    group_id = unhex(v["group_id"])
    signers = {lp["index"]: Ed25519Signer.from_seed(unhex(lp["signature_priv"])) for lp in v["leaves_private"]}
    for sender, sender_priv in states.items():
        leaf = tree.leaf(LeafIndex(sender))
        assert leaf is not None
        created = create_update_path(cs, tree, sender_priv, group_id, leaf, signers[sender], make_context)
        created.tree.verify_parent_hashes(cs)
        created.private.check_leaf(cs, created.tree)
        wire = created.update_path.to_bytes()
        for index, priv in states.items():
            if index == sender:
                continue
            result = process_update_path(cs, tree, priv, LeafIndex(sender), UpdatePath.from_bytes(wire), group_id,
                                         make_context)
            assert result.commit_secret == created.commit_secret
            assert result.path_secret == created.path_secrets[result.decrypted_at]
            assert result.tree == created.tree
            assert result.tree.tree_hash(cs) == created.tree.tree_hash(cs)


def _first_case() -> tuple[CipherSuite, RatchetTree, dict[int, TreeKemPrivate], dict[str, Any]]:
    for p in VECTORS:
        v = p.values[0]
        if len(v["leaves_private"]) >= 2:
            cs = get_suite(v["cipher_suite"])
            tree = RatchetTree.from_wire(unhex(v["ratchet_tree"]))
            return cs, tree, _private_states(cs, tree, v), v
    raise AssertionError("no vector with two private members")


def test_tampered_path_key_is_rejected_and_state_unchanged() -> None:
    cs, tree, states, v = _first_case()
    up = v["update_paths"][0]
    sender = LeafIndex(up["sender"])
    path = UpdatePath.from_bytes(unhex(up["update_path"]))
    receiver = next(i for i in states if i != sender)
    before_tree, before_keys = tree.to_wire(), dict(states[receiver].keys)
    top = path.nodes[-1]
    bad = dataclasses.replace(path, nodes=(*path.nodes[:-1], dataclasses.replace(top, encryption_key=bytes(32))))
    with pytest.raises(MlsTreeError):
        process_update_path(cs, tree, states[receiver], sender, bad, unhex(v["group_id"]), _context_factory(cs, v))
    assert tree.to_wire() == before_tree
    assert states[receiver].keys == before_keys


def test_path_with_wrong_node_count_is_rejected() -> None:
    cs, tree, states, v = _first_case()
    up = v["update_paths"][0]
    sender = LeafIndex(up["sender"])
    path = UpdatePath.from_bytes(unhex(up["update_path"]))
    receiver = next(i for i in states if i != sender)
    short = dataclasses.replace(path, nodes=path.nodes[:-1])
    with pytest.raises(MlsTreeError):
        process_update_path(cs, tree, states[receiver], sender, short, unhex(v["group_id"]), _context_factory(cs, v))


def test_path_under_wrong_context_fails_to_decrypt() -> None:
    cs, tree, states, v = _first_case()
    up = v["update_paths"][0]
    sender = LeafIndex(up["sender"])
    path = UpdatePath.from_bytes(unhex(up["update_path"]))
    receiver = next(i for i in states if i != sender)
    wrong = dict(v, epoch=v["epoch"] + 1)
    with pytest.raises(MlsTreeError):
        process_update_path(cs, tree, states[receiver], sender, path, unhex(v["group_id"]), _context_factory(cs, wrong))


def test_joiner_installs_path_secret_from_welcome() -> None:
    cs, tree, states, v = _first_case()
    group_id = unhex(v["group_id"])
    sender = next(iter(states))
    leaf = tree.leaf(LeafIndex(sender))
    assert leaf is not None
    lp = next(lp for lp in v["leaves_private"] if lp["index"] == sender)
    created = create_update_path(cs, tree, states[sender], group_id, leaf,
                                 Ed25519Signer.from_seed(unhex(lp["signature_priv"])), _context_factory(cs, v))
    for other, priv in states.items():
        if other == sender:
            continue
        x, y = leaf_to_node(LeafIndex(sender)), leaf_to_node(LeafIndex(other))
        ancestor = common_ancestor(x, y)
        if ancestor not in created.path_secrets:
            continue
        joiner = TreeKemPrivate.for_leaf(LeafIndex(other), priv.keys[y])
        joiner.install_path_secret(cs, created.tree, ancestor, created.path_secrets[ancestor])
        root = created.tree.root
        assert root in joiner.keys
        assert created.private.keys[root] == joiner.keys[root]
        return
    pytest.fail("no member shares a filtered-path node with the sender")


def test_prune_drops_keys_of_blanked_nodes_and_repr_hides_keys() -> None:
    cs, tree, states, _v = _first_case()
    index, priv = next((i, p) for i, p in states.items() if len(p.keys) > 1)
    pruned = priv.copy()
    pruned.prune(tree)
    assert pruned.keys == priv.keys
    blanked = tree.copy()
    blanked.blank_path(LeafIndex(index))
    pruned.prune(blanked)
    assert list(pruned.keys) == [leaf_to_node(LeafIndex(index))]
    assert all(k.hex() not in repr(priv) for k in priv.keys.values())
    pruned.check_leaf(cs, blanked)


def test_stale_private_key_is_detected() -> None:
    cs, tree, states, v = _first_case()
    up = v["update_paths"][0]
    sender = LeafIndex(up["sender"])
    receiver = next(i for i in states if i != sender)
    stale = TreeKemPrivate(LeafIndex(receiver), {k: bytes(31) + b"\x01" for k in states[receiver].keys})
    path = UpdatePath.from_bytes(unhex(up["update_path"]))
    with pytest.raises(MlsTreeError):
        process_update_path(cs, tree, stale, sender, path, unhex(v["group_id"]), _context_factory(cs, v))


# --- a group driven by the tree layer alone: adds with joiners, commits from every member, removal ---------


class _Member:
    def __init__(self, cs: CipherSuite, name: bytes) -> None:
        self.signer = Ed25519Signer.generate()
        self.leaf_priv, pub = cs.derive_key_pair(name.ljust(32, b"."))
        unsigned = LeafNode(pub, self.signer.public_key, Credential.basic(name),
                            Capabilities((1,), (cs.suite_id,), (), (), (1,)), LeafNodeSource.KEY_PACKAGE,
                            Lifetime(0, 2**64 - 1), None, (), b"")
        self.leaf = dataclasses.replace(unsigned,
                                        signature=sign_with_label(self.signer, LEAF_NODE_SIGN_LABEL, unsigned.tbs()))
        self.private: TreeKemPrivate | None = None


def _ctx(cs: CipherSuite, epoch: int) -> ContextFactory:
    return lambda th: GroupContext(1, cs.suite_id, b"group", epoch, th, b"cth", ())


def _commit(cs: CipherSuite, tree: RatchetTree, members: dict[int, _Member], committer: int, epoch: int,
            joiners: frozenset[LeafIndex] = frozenset()) -> RatchetTree:
    """Committer creates a path; every other current member processes it (joiners install the Welcome path
    secret); all must agree on the commit secret and the tree."""
    m = members[committer]
    assert m.private is not None
    leaf = tree.leaf(LeafIndex(committer))
    assert leaf is not None
    created = create_update_path(cs, tree, m.private, b"group", leaf, m.signer, _ctx(cs, epoch), joiners)
    created.tree.verify_parent_hashes(cs)
    for index, other in members.items():
        if index == committer:
            continue
        if LeafIndex(index) in joiners:
            other.private = TreeKemPrivate.for_leaf(LeafIndex(index), other.leaf_priv)
            ancestor = common_ancestor(leaf_to_node(LeafIndex(committer)), leaf_to_node(LeafIndex(index)))
            other.private.install_path_secret(cs, created.tree, ancestor, created.path_secrets[ancestor])
            assert other.private.keys[created.tree.root] == created.private.keys[created.tree.root]
            continue
        assert other.private is not None
        result = process_update_path(cs, tree, other.private, LeafIndex(committer),
                                     UpdatePath.from_bytes(created.update_path.to_bytes()), b"group", _ctx(cs, epoch),
                                     joiners)
        assert result.commit_secret == created.commit_secret
        assert result.tree == created.tree
        other.private = result.private
    m.private = created.private
    return created.tree


@pytest.mark.parametrize("suite", [1, 3])
def test_tree_only_group_lifecycle(suite: int) -> None:
    cs = get_suite(suite)
    members = {0: _Member(cs, b"m0")}
    members[0].private = TreeKemPrivate.for_leaf(LeafIndex(0), members[0].leaf_priv)
    tree = RatchetTree.one_member(members[0].leaf)
    epoch = 0

    # Member 0 adds six members in one commit; they join with the path secret from the "Welcome".
    staged = tree.copy()
    joiners = []
    for k in range(1, 7):
        members[k] = _Member(cs, b"m%d" % k)
        joiners.append(staged.add_leaf(members[k].leaf))
    assert joiners == list(range(1, 7))
    tree = _commit(cs, staged, members, 0, epoch, frozenset(joiners))

    # Every member commits in turn.
    for committer in range(7):
        epoch += 1
        tree = _commit(cs, tree, members, committer, epoch)

    # Remove member 5 (and 6, so the tree truncates); they cannot process the next path.
    removed = {5: members.pop(5), 6: members.pop(6)}
    for leaf_index in removed:
        tree.remove_leaf(LeafIndex(leaf_index))
    assert tree.n_leaves == 8 and tree.leaf(LeafIndex(6)) is None
    for m in members.values():
        assert m.private is not None
        m.private.prune(tree)
    epoch += 1
    before = tree.copy()
    tree = _commit(cs, tree, members, 2, epoch)
    sender_leaf = before.leaf(LeafIndex(2))
    assert sender_leaf is not None
    path = create_update_path(cs, before, TreeKemPrivate(LeafIndex(2)), b"group", sender_leaf, members[2].signer,
                              _ctx(cs, epoch))
    context = path.context.to_bytes()
    for gone in removed.values():
        assert gone.private is not None
        with pytest.raises(MlsTreeError):
            process_update_path(cs, before, gone.private, LeafIndex(2), path.update_path, b"group", _ctx(cs, epoch))
        for node in path.update_path.nodes:
            for ct in node.encrypted_path_secret:
                for key in gone.private.keys.values():
                    with pytest.raises(MlsError):
                        decrypt_with_label(cs, key, UPDATE_PATH_NODE_LABEL, context, ct.kem_output, ct.ciphertext)

    # An added member fills the leftmost blank leaf.
    members[5] = _Member(cs, b"m5b")
    staged = tree.copy()
    assert staged.add_leaf(members[5].leaf) == 5
    epoch += 1
    tree = _commit(cs, staged, members, 4, epoch, frozenset({LeafIndex(5)}))
    tree.verify_parent_hashes(cs)
