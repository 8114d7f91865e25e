"""Shared helpers for the MLS conformance tests: where the official vectors live and which entries we run.

The vectors stay in `../shared/vectors/mls/` (never copied into the project). Entries for cipher suites we do not
implement are filtered out of the parametrisation, so every collected test is one that runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

VECTORS_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "mls"
SUPPORTED_SUITES = frozenset({1, 3})


def load_vectors(name: str) -> list[dict[str, Any]]:
    """All entries of one vector file, e.g. `load_vectors("tree-math.json")`."""
    with (VECTORS_DIR / name).open() as f:
        data = json.load(f)
    assert isinstance(data, list) and data, f"{name}: expected a non-empty JSON list"
    return data


def suite_entries(name: str) -> list[dict[str, Any]]:
    """The entries of a per-suite vector file for the suites we implement (1 and 3)."""
    entries = [e for e in load_vectors(name) if int(e["cipher_suite"]) in SUPPORTED_SUITES]
    assert entries, f"{name}: no entries for suites {sorted(SUPPORTED_SUITES)}"
    return entries


def vector_params(name: str, *, per_suite: bool = True) -> list[Any]:
    """`pytest.param` list, one per entry, with a readable id (`s1-0`, `s3-4`, or the entry index)."""
    if not per_suite:
        return [pytest.param(e, id=str(i)) for i, e in enumerate(load_vectors(name))]
    params = []
    counts: dict[int, int] = {}
    for e in suite_entries(name):
        suite = int(e["cipher_suite"])
        n = counts.get(suite, 0)
        counts[suite] = n + 1
        params.append(pytest.param(e, id=f"s{suite}-{n}"))
    return params


def unhex(s: str) -> bytes:
    return bytes.fromhex(s)
