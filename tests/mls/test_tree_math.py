"""tree-math.json: for each tree size, n_nodes, root, and left/right/parent/sibling of every node.

Format: {n_leaves, n_nodes, root, left[], right[], parent[], sibling[]}, where an absent relation is null.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocol.mls import tree_math as tm
from gateway.protocol.mls.tree_math import NodeIndex

from .conftest import vector_params


def _or_none(f: Any, *args: Any) -> int | None:
    try:
        return int(f(*args))
    except tm.TreeMathError:
        return None


@pytest.mark.parametrize("v", vector_params("tree-math.json", per_suite=False))
def test_tree_math_vector(v: dict[str, Any]) -> None:
    n = int(v["n_leaves"])
    assert tm.node_width(n) == v["n_nodes"]
    assert tm.root(n) == v["root"]
    width = tm.node_width(n)
    assert len(v["left"]) == len(v["right"]) == len(v["parent"]) == len(v["sibling"]) == width
    for i in range(width):
        x = NodeIndex(i)
        assert _or_none(tm.left, x) == v["left"][i], f"left({i})"
        assert _or_none(tm.right, x) == v["right"][i], f"right({i})"
        assert _or_none(tm.parent, x, n) == v["parent"][i], f"parent({i})"
        assert _or_none(tm.sibling, x, n) == v["sibling"][i], f"sibling({i})"


def test_leaf_node_conversions() -> None:
    assert tm.leaf_to_node(tm.LeafIndex(3)) == 6
    assert tm.node_to_leaf(NodeIndex(6)) == 3
    with pytest.raises(tm.TreeMathError):
        tm.node_to_leaf(NodeIndex(5))


def test_direct_path_and_copath_in_eight_leaf_tree() -> None:
    # Figures in RFC 9420 section 4.1: leaf A (node 0) in an 8-leaf tree.
    assert tm.direct_path(NodeIndex(0), 8) == [1, 3, 7]
    assert tm.copath(NodeIndex(0), 8) == [2, 5, 11]
    assert tm.direct_path(NodeIndex(7), 8) == []


def test_common_ancestor_matches_direct_paths() -> None:
    n = 16
    for a in range(0, 2 * n - 1):
        for b in range(0, 2 * n - 1):
            x, y = NodeIndex(a), NodeIndex(b)
            ancestors_x = [x, *tm.direct_path(x, n)]
            ancestors_y = set([y, *tm.direct_path(y, n)])
            expected = next(z for z in ancestors_x if z in ancestors_y)
            assert tm.common_ancestor(x, y) == expected, (a, b)
