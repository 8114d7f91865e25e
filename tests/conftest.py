"""Shared fixtures: a pool of real SoftHSM2 tokens created before the first PKCS#11 call of the test process."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.softhsm import SoftHsmDir

POOL_SIZE = 24
_counter = itertools.count()


@pytest.fixture(scope="session")
def softhsm_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmDir]:
    d = SoftHsmDir(tmp_path_factory.mktemp("softhsm"))
    for i in range(POOL_SIZE):
        d.init_token(f"pool{i}")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(d.conf)
    yield d
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture
def softhsm_token(softhsm_pool: SoftHsmDir) -> str:
    """The label of a fresh, empty token from the pool (each test gets its own)."""
    i = next(_counter)
    if i >= POOL_SIZE:
        pytest.fail("SoftHSM token pool exhausted: raise POOL_SIZE in tests/conftest.py")
    return f"pool{i}"


@pytest.fixture
def softhsm_dir(tmp_path: Path) -> SoftHsmDir:
    """A private SoftHSM directory for subprocess tests (CLI, daemon)."""
    return SoftHsmDir(tmp_path / "softhsm")
