"""tree-validation.json: tree hashes, resolutions, parent hashes and leaf signatures of a given tree.

Format: {cipher_suite, tree (ratchet_tree extension body), group_id, resolutions[node] (lists of node indices),
tree_hashes[node] (hex)}, one entry per node of the full (power-of-two) tree. Checks: every node's tree hash and
resolution, every non-blank parent is parent-hash valid, every non-blank leaf's signature verifies, and the tree
passes the structural validity checks of RFC 9420 section 12.4.3.1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.protocol.mls.credentials import accept_any_identity
from gateway.protocol.mls.crypto import get_suite
from gateway.protocol.mls.nodes import ParentNode, encode_ratchet_tree
from gateway.protocol.mls.ratchet_tree import MlsTreeError, RatchetTree
from gateway.protocol.mls.tree_math import LeafIndex, NodeIndex

from .conftest import unhex, vector_params


@pytest.mark.parametrize("v", vector_params("tree-validation.json"))
def test_tree_validation_vector(v: dict[str, Any]) -> None:
    cs = get_suite(v["cipher_suite"])
    tree = RatchetTree.from_wire(unhex(v["tree"]))
    width = len(tree.nodes())
    assert len(v["tree_hashes"]) == width
    assert len(v["resolutions"]) == width
    for i in range(width):
        assert tree.node_hash(cs, NodeIndex(i)).hex() == v["tree_hashes"][i], f"tree hash of node {i}"
        assert tree.resolution(NodeIndex(i)) == v["resolutions"][i], f"resolution of node {i}"
    group_id = unhex(v["group_id"])
    tree.verify_parent_hashes(cs)
    tree.validate(cs, group_id, (), accept_any_identity)
    n_checked = 0
    for index, _leaf in tree.leaves():
        assert tree.verify_leaf_signature(cs, group_id, index), f"signature of leaf {index}"
        n_checked += 1
    assert n_checked >= 1
    assert tree.to_wire() == unhex(v["tree"])


def _first_vector_tree(min_leaves: int = 4) -> tuple[Any, RatchetTree, dict[str, Any]]:
    for p in vector_params("tree-validation.json"):
        v = p.values[0]
        tree = RatchetTree.from_wire(unhex(v["tree"]))
        if tree.n_leaves >= min_leaves and any(n is not None for n in tree.nodes()[1::2]):
            return get_suite(v["cipher_suite"]), tree, v
    raise AssertionError("no suitable vector tree")


def test_tampered_parent_hash_is_rejected() -> None:
    cs, tree, _ = _first_vector_tree()
    x = next(i for i, n in enumerate(tree.nodes()) if isinstance(n, ParentNode))
    node = tree.nodes()[x]
    assert isinstance(node, ParentNode)
    tree.set_node(NodeIndex(x), ParentNode(node.encryption_key, bytes(len(node.parent_hash) or 32), ()))
    with pytest.raises(MlsTreeError):
        tree.verify_parent_hashes(cs)


def test_tampered_leaf_signature_fails() -> None:
    cs, tree, v = _first_vector_tree()
    index, leaf = next(iter(tree.leaves()))
    bad = dataclasses.replace(leaf, signature=bytes(len(leaf.signature)))
    tree.set_node(NodeIndex(2 * index), bad)
    assert not tree.verify_leaf_signature(cs, unhex(v["group_id"]), LeafIndex(index))


def test_tree_hash_cache_is_invalidated_on_change() -> None:
    cs, tree, _ = _first_vector_tree()
    before = tree.tree_hash(cs)
    fresh = RatchetTree(tree.nodes())
    index, _leaf = next(iter(tree.leaves()))
    tree.blank_path(index)
    fresh.blank_path(index)
    assert tree.tree_hash(cs) == RatchetTree(fresh.nodes()).tree_hash(cs)
    assert tree.tree_hash(cs) != before or all(n is None for n in tree.nodes()[1::2])


def test_duplicate_encryption_key_is_rejected() -> None:
    _cs, tree, _ = _first_vector_tree()
    leaves = list(tree.leaves())
    (_i0, l0), (i1, l1) = leaves[0], leaves[1]
    tree.set_node(NodeIndex(2 * i1), dataclasses.replace(l1, encryption_key=l0.encryption_key))
    with pytest.raises(MlsTreeError):
        tree.check_unique_keys()


def test_truncated_tree_with_trailing_blank_is_rejected() -> None:
    _cs, tree, _ = _first_vector_tree()
    with pytest.raises(MlsTreeError):
        RatchetTree.from_wire(encode_ratchet_tree([*tree.nodes(), None, None]))


def test_remove_truncates_to_smallest_tree_holding_the_rightmost_leaf() -> None:
    _cs, tree, _ = _first_vector_tree(min_leaves=8)
    indices = [i for i, _leaf in tree.leaves()]
    for i in indices[:0:-1]:
        tree.remove_leaf(i)
        rightmost = max(j for j, _leaf in tree.leaves())
        # RFC 9420 12.1.3: 2^d leaves for the smallest d with 2^d > rightmost non-blank leaf index.
        assert tree.n_leaves == 1 << rightmost.bit_length()
    assert [i for i, _leaf in tree.leaves()] == [indices[0]]
