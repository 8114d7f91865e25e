"""treekem.json: UpdatePath processing and creation.

Format: {cipher_suite, group_id, epoch, confirmed_transcript_hash, ratchet_tree,
leaves_private: [{index, encryption_priv, signature_priv, path_secrets: [{node, path_secret}]}],
update_paths: [{sender, update_path, path_secrets[leaf] (hex or null), commit_secret, tree_hash_after}]}.

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
from gateway.protocol.mls.crypto import CipherSuite, Ed25519Signer, get_suite
from gateway.protocol.mls.ratchet_tree import MlsTreeError, RatchetTree
from gateway.protocol.mls.tree_math import LeafIndex, NodeIndex, common_ancestor, leaf_to_node
from gateway.protocol.mls.treekem import (
    ContextFactory,
    TreeKemPrivate,
    create_update_path,
    process_update_path,
)
from gateway.protocol.mls.welcome_structs import GroupContext

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
