"""Hardware key layer: PKCS#11 tokens and TPM 2.0 behind one small API.

Callers name keys by URI (`pkcs11:...` or `tpm2:...`) and get handles back (`IdentityKey`, `StorageKey`). No
asyncio and no network here. Each backend module provides the same four functions:
`create_identity_key(uri, algorithm, force)`, `load_identity_key(uri)`, `create_storage_key(uri, force)`,
`load_storage_key(uri)`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hsm.api import IdentityKey, KeyAlgorithm, KeyAttributes, KeyInfo, PublicKey, StorageKey
from hsm.errors import BadKeyUri, HsmError

__all__ = [
    "HsmError",
    "IdentityKey",
    "KeyAlgorithm",
    "KeyAttributes",
    "KeyInfo",
    "PublicKey",
    "StorageKey",
    "backend_name",
    "create_identity_key",
    "create_storage_key",
    "load_identity_key",
    "load_storage_key",
]


def backend_name(uri: str) -> str:
    if uri.startswith("pkcs11:"):
        return "pkcs11"
    if uri.startswith("tpm2:"):
        return "tpm2"
    raise BadKeyUri("unknown key URI scheme; expected 'pkcs11:' or 'tpm2:'", uri=uri.partition("?")[0])


def _backend(uri: str) -> ModuleType:
    """Import the backend lazily: a PKCS#11-only device need not have the TSS libraries, and vice versa."""
    name = "hsm.pkcs11_backend" if backend_name(uri) == "pkcs11" else "hsm.tpm2_backend"
    return importlib.import_module(name)


def create_identity_key(uri: str, algorithm: KeyAlgorithm, *, force: bool = False) -> IdentityKey:
    """Generate a non-exportable identity key inside the hardware. Refuses to replace one unless `force`."""
    key: IdentityKey = _backend(uri).create_identity_key(uri, algorithm, force=force)
    return key


def load_identity_key(uri: str) -> IdentityKey:
    """Open an existing identity key, checking it is sensitive and not extractable."""
    key: IdentityKey = _backend(uri).load_identity_key(uri)
    return key


def create_storage_key(uri: str, *, force: bool = False) -> StorageKey:
    key: StorageKey = _backend(uri).create_storage_key(uri, force=force)
    return key


def load_storage_key(uri: str) -> StorageKey:
    key: StorageKey = _backend(uri).load_storage_key(uri)
    return key
