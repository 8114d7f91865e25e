"""Delegated signing keys: software Ed25519 keys certified by the hardware identity key.

The hardware is slow and must stay off the per-message path, so messages and MLS leaves are signed by a
short-lived software key (default 7 days) whose certificate is issued by the device certificate. The private key
is only ever stored wrapped by the storage key.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.protocol.identity.names import AgentName, DeviceName
from gateway.protocol.identity.signer import Signer, SoftwareSigner
from gateway.protocol.identity.x509build import DELEGATED, issue_certificate
from hsm.api import KeyAlgorithm

DEFAULT_LIFETIME = dt.timedelta(days=7)


@dataclass(frozen=True, slots=True)
class DelegatedKey:
    signer: SoftwareSigner
    certificate: x509.Certificate

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    def raw_public_key(self) -> bytes:
        key = self.signer.public_key()
        assert isinstance(key, ed25519.Ed25519PublicKey)
        return key.public_bytes_raw()

    def raw_private_key(self) -> bytes:
        """The 32-byte Ed25519 seed, for PyNaCl signing on the message path. Never log it."""
        der = self.signer.private_bytes()
        return der[-32:]


def delegate(
    identity: Signer,
    device_certificate: x509.Certificate,
    *,
    device: DeviceName,
    agent: AgentName | None = None,
    now: dt.datetime,
    lifetime: dt.timedelta = DEFAULT_LIFETIME,
) -> DelegatedKey:
    """Make a fresh Ed25519 key and have the hardware identity key certify it (one hardware signature)."""
    signer = SoftwareSigner.generate(KeyAlgorithm.ED25519)
    not_after = min(now + lifetime, device_certificate.not_valid_after_utc)
    name = agent.uri if agent is not None else device.uri
    cert = issue_certificate(
        identity, issuer=device_certificate, subject_key=signer.public_key(),
        common_name=(agent.short if agent else device.device_id) + " (delegated)", organization=device.fleet,
        san_uri=name, serial=int.from_bytes(os.urandom(16), "big") >> 1, not_before=now - dt.timedelta(minutes=5),
        not_after=not_after, profile=DELEGATED)
    return DelegatedKey(signer, cert)
