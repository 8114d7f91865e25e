"""Array-tree arithmetic (RFC 9420 section 4.2 and appendix C).

Leaves sit at even node indices, parents at odd ones; a tree of n leaves has 2n - 1 nodes and, in MLS, n is
always a power of two. Leaf and node indices are distinct types so one can never be passed for the other.
"""

from __future__ import annotations

from typing import NewType

LeafIndex = NewType("LeafIndex", int)
NodeIndex = NewType("NodeIndex", int)


class TreeMathError(ValueError):
    """A tree-math question with no answer (e.g. the parent of the root): a caller bug, not bad input."""


def leaf_to_node(leaf: LeafIndex) -> NodeIndex:
    return NodeIndex(2 * leaf)


def node_to_leaf(node: NodeIndex) -> LeafIndex:
    if node & 1:
        raise TreeMathError(f"node {node} is a parent node, not a leaf")
    return LeafIndex(node >> 1)


def is_leaf(node: NodeIndex) -> bool:
    return node & 1 == 0


def log2(x: int) -> int:
    """floor(log2(x)), with log2(0) = 0 as in the RFC."""
    return 0 if x == 0 else x.bit_length() - 1


def level(x: NodeIndex) -> int:
    """Height of a node: the number of trailing one bits of its index (leaves are level 0)."""
    return (x ^ (x + 1)).bit_length() - 1


def node_width(n_leaves: int) -> int:
    return 0 if n_leaves == 0 else 2 * (n_leaves - 1) + 1


def root(n_leaves: int) -> NodeIndex:
    if n_leaves <= 0:
        raise TreeMathError("an empty tree has no root")
    return NodeIndex((1 << log2(node_width(n_leaves))) - 1)


def left(x: NodeIndex) -> NodeIndex:
    k = level(x)
    if k == 0:
        raise TreeMathError(f"leaf node {x} has no children")
    return NodeIndex(x ^ (1 << (k - 1)))


def right(x: NodeIndex) -> NodeIndex:
    k = level(x)
    if k == 0:
        raise TreeMathError(f"leaf node {x} has no children")
    return NodeIndex(x ^ (3 << (k - 1)))


def _parent_step(x: int) -> int:
    k = level(NodeIndex(x))
    b = (x >> (k + 1)) & 1
    return (x | (1 << k)) ^ (b << (k + 1))


def parent(x: NodeIndex, n_leaves: int) -> NodeIndex:
    if x == root(n_leaves):
        raise TreeMathError(f"root node {x} has no parent")
    if x >= node_width(n_leaves):
        raise TreeMathError(f"node {x} is outside a tree of {n_leaves} leaves")
    p = _parent_step(x)
    while p >= node_width(n_leaves):
        p = _parent_step(p)
    return NodeIndex(p)


def sibling(x: NodeIndex, n_leaves: int) -> NodeIndex:
    p = parent(x, n_leaves)
    return right(p) if x < p else left(p)


def direct_path(x: NodeIndex, n_leaves: int) -> list[NodeIndex]:
    """Ancestors of x from its parent up to and including the root."""
    r = root(n_leaves)
    out: list[NodeIndex] = []
    while x != r:
        x = parent(x, n_leaves)
        out.append(x)
    return out


def copath(x: NodeIndex, n_leaves: int) -> list[NodeIndex]:
    """Siblings of x and of each of its ancestors below the root."""
    r = root(n_leaves)
    if x == r:
        return []
    path = [x, *direct_path(x, n_leaves)]
    path.pop()
    return [sibling(y, n_leaves) for y in path]


def is_in_subtree(x: NodeIndex, subtree_root: NodeIndex) -> bool:
    """Whether x lies in the subtree rooted at subtree_root (inclusive)."""
    k = level(subtree_root)
    return (x >> (k + 1)) == (subtree_root >> (k + 1)) and abs(x - subtree_root) < (1 << k)


def common_ancestor(x: NodeIndex, y: NodeIndex) -> NodeIndex:
    """Lowest node whose subtree holds both x and y (semantic, independent of the tree size)."""
    lx, ly = level(x) + 1, level(y) + 1
    if lx <= ly and (x >> ly) == (y >> ly):
        return y
    if ly <= lx and (x >> lx) == (y >> lx):
        return x
    xn, yn = int(x), int(y)
    k = 0
    while xn != yn:
        xn >>= 1
        yn >>= 1
        k += 1
    return NodeIndex((xn << k) + (1 << (k - 1)) - 1)
