"""The credential a device shows its peers: its delegated-key certificate and its device certificate.

Wire form (inside prekey bundles and session-setup messages): count (u8, 1..3), then each certificate as a
u16 big-endian length and its DER, leaf first. `credential_verifier` turns fleet trust into the pairwise
layer's `verify_credential(device_id, credential) -> Ed25519 verify key` callback.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.protocol.identity.errors import CertificateError
from gateway.protocol.identity.trust import FleetTrust, VerifiedChain

MAX_CERTS = 3


def encode_credential(chain: list[x509.Certificate]) -> bytes:
    if not 1 <= len(chain) <= MAX_CERTS:
        raise ValueError("a credential holds 1..3 certificates")
    out = bytearray([len(chain)])
    for cert in chain:
        der = cert.public_bytes(Encoding.DER)
        out += len(der).to_bytes(2, "big") + der
    return bytes(out)


def decode_credential(data: bytes) -> list[x509.Certificate]:
    if not data or not 1 <= data[0] <= MAX_CERTS:
        raise CertificateError("credential must start with a certificate count of 1..3")
    pos, certs = 1, []
    for _ in range(data[0]):
        if pos + 2 > len(data):
            raise CertificateError("credential truncated")
        n = int.from_bytes(data[pos:pos + 2], "big")
        pos += 2
        if pos + n > len(data):
            raise CertificateError("credential truncated")
        try:
            certs.append(x509.load_der_x509_certificate(data[pos:pos + n]))
        except (ValueError, x509.InvalidVersion) as exc:
            raise CertificateError(f"unreadable certificate in credential: {exc}") from None
        pos += n
    if pos != len(data):
        raise CertificateError("trailing bytes after the credential")
    return certs


def verify_peer_credential(trust: FleetTrust, device_id: str, credential: bytes, *, now: dt.datetime) -> VerifiedChain:
    """Check a peer's credential: chain to the fleet CA, not revoked, naming `device_id`, leaf a delegated
    Ed25519 key of the device itself."""
    chain = trust.verify_chain(decode_credential(credential), now=now)  # parse errors become CertificateError
    if chain.device.device_id != device_id:
        raise CertificateError(f"credential is for device {chain.device.device_id!r}, not {device_id!r}")
    if chain.leaf == chain.device_certificate or chain.agent is not None:
        raise CertificateError("a device credential's leaf must be the device's delegated key")
    if not isinstance(chain.leaf_public_key, ed25519.Ed25519PublicKey):
        raise CertificateError("delegated keys are Ed25519")
    return chain


def credential_verifier(trust_fn: Callable[[], FleetTrust],
                        now_fn: Callable[[], dt.datetime]) -> Callable[[str, bytes], bytes]:
    """The pairwise layer's callback. `trust_fn` is read on every call, so a new CRL applies at once."""

    def verify(device_id: str, credential: bytes) -> bytes:
        chain = verify_peer_credential(trust_fn(), device_id, credential, now=now_fn())
        key = chain.leaf_public_key
        assert isinstance(key, ed25519.Ed25519PublicKey)
        return key.public_bytes_raw()

    return verify
