"""The key layer's API: callers hold key handles, never key bytes.

An identity key signs (CSRs, delegation certificates, relay tokens) and shows its public key and the attributes
the hardware reports. A storage key wraps and unwraps the data-encryption key of the local store. Both are made
from a URI by a backend (`hsm.load_identity_key` and friends). Handles are safe to share between threads:
each backend serialises its hardware calls itself.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


class KeyAlgorithm(enum.StrEnum):
    """Identity key algorithms. Ed25519 where the token has CKM_EDDSA; ECDSA P-256 otherwise (and on a TPM)."""

    ED25519 = "ed25519"
    ECDSA_P256 = "ecdsa-p256"


@dataclass(frozen=True, slots=True)
class KeyAttributes:
    """Protection attributes as read back from the hardware, not as requested.

    For a TPM key, `sensitive`/`extractable` are derived from the object attributes: fixedTPM and fixedParent
    mean not extractable, sensitiveDataOrigin means generated on the TPM (`local`).
    """

    sensitive: bool
    extractable: bool
    never_extractable: bool
    local: bool

    def as_dict(self) -> dict[str, bool]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What `agw keys show` prints about one key."""

    role: str
    backend: str
    uri: str
    algorithm: str
    attributes: KeyAttributes
    public_key_pem: str | None = None


@runtime_checkable
class IdentityKey(Protocol):
    """A non-exportable signing key held by the hardware."""

    @property
    def uri(self) -> str: ...

    @property
    def algorithm(self) -> KeyAlgorithm: ...

    def public_key(self) -> PublicKey:
        """The public half, as a `cryptography` object."""
        ...

    def sign(self, data: bytes) -> bytes:
        """Sign `data`. Ed25519: the 64-byte signature. ECDSA P-256: SHA-256 over `data`, DER-encoded signature."""
        ...

    def attributes(self) -> KeyAttributes: ...

    def info(self) -> KeyInfo: ...


@runtime_checkable
class StorageKey(Protocol):
    """A key that never leaves the hardware and protects the store's data-encryption key."""

    @property
    def uri(self) -> str: ...

    def wrap(self, key: bytes) -> bytes:
        """Wrap (encrypt and authenticate) a secret; the result is safe to write to disk."""
        ...

    def unwrap(self, blob: bytes) -> bytes:
        """Reverse `wrap`; raises `UnwrapFailed` on a corrupt or foreign blob."""
        ...

    def info(self) -> KeyInfo: ...
