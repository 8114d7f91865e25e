"""The signing interface identity code needs, and a software implementation of it.

A hardware key handle (`hsm.IdentityKey`) already satisfies `Signer`. `SoftwareSigner` wraps a `cryptography`
private key for the fleet CA (when its key is a file) and for delegated keys.
"""

from __future__ import annotations

from typing import Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from hsm.api import KeyAlgorithm, PublicKey


class Signer(Protocol):
    """Anything that signs: Ed25519 gives 64 raw bytes, ECDSA P-256 a DER signature over SHA-256(data)."""

    @property
    def algorithm(self) -> KeyAlgorithm: ...

    def public_key(self) -> PublicKey: ...

    def sign(self, data: bytes) -> bytes: ...


class SoftwareSigner:
    """A `Signer` over a key held in memory. Used for the file-based fleet CA and for delegated keys."""

    def __init__(self, key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> None:
        if isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("only ECDSA P-256 and Ed25519 keys are supported")
        self._key = key

    @property
    def algorithm(self) -> KeyAlgorithm:
        return KeyAlgorithm.ED25519 if isinstance(self._key, ed25519.Ed25519PrivateKey) else KeyAlgorithm.ECDSA_P256

    def public_key(self) -> PublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def private_bytes(self) -> bytes:
        """PKCS#8 DER of the key: only for wrapping by a storage key, never for logs."""
        return self._key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def private_pem(self) -> bytes:
        """PKCS#8 PEM, for the file-based fleet CA key (written with mode 0600)."""
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    @classmethod
    def from_private_bytes(cls, der: bytes) -> SoftwareSigner:
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError("unsupported key type")
        return cls(key)

    @classmethod
    def generate(cls, algorithm: KeyAlgorithm) -> SoftwareSigner:
        if algorithm is KeyAlgorithm.ED25519:
            return cls(ed25519.Ed25519PrivateKey.generate())
        return cls(ec.generate_private_key(ec.SECP256R1()))


def algorithm_of(public_key: PublicKey) -> KeyAlgorithm:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return KeyAlgorithm.ED25519
    if isinstance(public_key.curve, ec.SECP256R1):
        return KeyAlgorithm.ECDSA_P256
    raise ValueError(f"unsupported curve {public_key.curve.name}")


def der_to_raw_ecdsa(signature: bytes) -> bytes:
    """DER ECDSA signature -> r||s (32 bytes each), as JWS ES256 wants."""
    r, s = decode_dss_signature(signature)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_to_der_ecdsa(signature: bytes) -> bytes:
    if len(signature) != 64:
        raise ValueError("an ES256 signature is 64 bytes")
    return encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))


def public_key_der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
