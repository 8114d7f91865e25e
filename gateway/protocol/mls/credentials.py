"""Credentials (RFC 9420 section 5.3): basic (an opaque identity) and X.509 (a DER chain, leaf first).

Whether a credential is acceptable for a signature key is the application's decision, made by an
`IdentityValidator` callback (the gateway checks fleet certificates); this module only encodes and decodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.protocol.mls.codec import Reader, Writer
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.wire import CredentialType, WireStruct, put_opaque, read_enum


@dataclass(frozen=True, slots=True)
class Credential(WireStruct):
    credential_type: CredentialType
    identity: bytes = b""
    certificates: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.credential_type == CredentialType.BASIC and self.certificates:
            raise ValueError("a basic credential carries an identity, not certificates")
        if self.credential_type == CredentialType.X509 and self.identity:
            raise ValueError("an x509 credential carries certificates, not an identity")

    @classmethod
    def basic(cls, identity: bytes) -> Credential:
        return cls(CredentialType.BASIC, identity=identity)

    @classmethod
    def x509(cls, chain_der: list[bytes] | tuple[bytes, ...]) -> Credential:
        return cls(CredentialType.X509, certificates=tuple(chain_der))

    def encode(self, w: Writer) -> None:
        w.u16(self.credential_type)
        if self.credential_type == CredentialType.BASIC:
            w.opaque(self.identity)
        else:
            w.vector(self.certificates, put_opaque)

    @classmethod
    def decode(cls, r: Reader) -> Self:
        ctype = read_enum(r, CredentialType, 2)
        if ctype == CredentialType.BASIC:
            return cls(ctype, identity=r.opaque())
        return cls(ctype, certificates=tuple(r.vector(Reader.opaque)))


class MlsCredentialError(MlsError):
    """A credential is malformed, or does not belong to the signature key presented with it."""


IdentityValidator = Callable[[Credential, bytes], None]
"""Called with (credential, signature public key); raises an `MlsError` to reject the pair."""


def accept_any_identity(credential: Credential, signature_key: bytes) -> None:
    """An `IdentityValidator` for tests and conformance vectors only: accepts every credential."""
    del credential, signature_key


SuccessorValidator = Callable[[Credential, Credential], None]
"""Called with (old credential, new credential) when a member's leaf is replaced by one with a different
credential or signature key (an Update proposal, or the LeafNode of a commit's UpdatePath: RFC 9420 section
5.3.1, "the AS MUST also verify that the set of presented identifiers in the new credential is valid as a
successor to the set of presented identifiers in the old credential"); raises an `MlsError` to reject. The new
credential has already passed the `IdentityValidator` with the new signature key."""


def accept_any_successor(old: Credential, new: Credential) -> None:
    """A `SuccessorValidator` for tests and conformance vectors only: any credential may replace any other."""
    del old, new


def x509_leaf_public_key(credential: Credential) -> bytes:
    """Raw public key of the first (end-entity) certificate of an X.509 credential."""
    if credential.credential_type != CredentialType.X509 or not credential.certificates:
        raise MlsCredentialError("not an X.509 credential with at least one certificate")
    try:
        cert = x509.load_der_x509_certificate(credential.certificates[0])
        return cert.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    except (ValueError, TypeError) as e:
        raise MlsCredentialError(f"X.509 credential: end-entity certificate unusable: {e}") from e


def x509_key_binding(chain_validator: Callable[[tuple[bytes, ...]], None]) -> IdentityValidator:
    """An `IdentityValidator` for X.509 credentials: the leaf certificate must certify exactly the MLS
    signature key, then `chain_validator` (the application's CA, expiry and revocation policy) sees the chain."""

    def validate(credential: Credential, signature_key: bytes) -> None:
        if x509_leaf_public_key(credential) != signature_key:
            raise MlsCredentialError("X.509 credential certifies a different key than the leaf's signature key")
        chain_validator(credential.certificates)

    return validate
