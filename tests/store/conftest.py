"""Fixtures for the store tests: a software AES key-wrap stand-in for the hardware storage key.

The real PKCS#11/TPM storage keys are tested with the hsm package; here only the store's own code is under test,
so a small AES-KW (RFC 3394) class that honours the `hsm.api.StorageKey` protocol is enough. It remembers what it
wrapped so tests can look for the data key's bytes on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from gateway.store import Store
from hsm.api import KeyAlgorithm, KeyAttributes, KeyInfo
from hsm.errors import UnwrapFailed


class SoftStorageKey:
    """AES-256 key wrap in software, standing in for a token-held storage key."""

    def __init__(self, name: str = "k1", kek: bytes | None = None) -> None:
        self.kek = os.urandom(32) if kek is None else kek
        self._uri = f"pkcs11:token=test;object={name}?pin-value=1234"
        self.wrapped: list[bytes] = []

    @property
    def uri(self) -> str:
        return self._uri

    def wrap(self, key: bytes) -> bytes:
        self.wrapped.append(key)
        return aes_key_wrap(self.kek, key)

    def unwrap(self, blob: bytes) -> bytes:
        try:
            return aes_key_unwrap(self.kek, blob)
        except InvalidUnwrap:
            raise UnwrapFailed("unwrap failed", uri=self._uri) from None

    def info(self) -> KeyInfo:
        attrs = KeyAttributes(sensitive=True, extractable=False, never_extractable=True, local=True)
        return KeyInfo("storage", "soft", self._uri, KeyAlgorithm.ED25519.value, attrs)


@pytest.fixture
def key() -> SoftStorageKey:
    return SoftStorageKey()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "agw.db"


@pytest.fixture
def store(db_path: Path, key: SoftStorageKey) -> Iterator[Store]:
    s = Store.open(db_path, key)
    try:
        yield s
    finally:
        s.close()


def mid(n: int) -> bytes:
    """A 16-byte message id derived from a small integer."""
    return n.to_bytes(16, "big")
