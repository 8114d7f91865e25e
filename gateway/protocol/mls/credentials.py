"""Credentials (RFC 9420 section 5.3): basic (an opaque identity) and X.509 (a DER chain, leaf first).

Whether a credential is acceptable for a signature key is the application's decision, made by an
`IdentityValidator` callback (the gateway checks fleet certificates); this module only encodes and decodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from gateway.protocol.mls.codec import Reader, Writer
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


IdentityValidator = Callable[[Credential, bytes], None]
"""Called with (credential, signature public key); raises an `MlsError` to reject the pair."""


def accept_any_identity(credential: Credential, signature_key: bytes) -> None:
    """An `IdentityValidator` for tests and conformance vectors only: accepts every credential."""
    del credential, signature_key
