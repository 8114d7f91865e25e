"""Fleet trust: the CA certificate, its revocation list, and chain validation.

Chains are short and of a fixed shape, so they are checked by hand with `cryptography` doing each signature check:
    device certificate <- fleet CA                     (the device's hardware identity key)
    delegated certificate <- device certificate <- CA  (a short-lived software key certified by the hardware key)
The CA is the fleet's trust anchor; its certificate carries the URI SAN `spiffe://<fleet>`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.protocol.identity.errors import BadName, CertificateError, CertificateExpired, CertificateRevoked
from gateway.protocol.identity.names import AgentName, DeviceName, check_fleet
from hsm.api import PublicKey


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in ext.value.get_values_for_type(x509.UniformResourceIdentifier)]


def fleet_of_ca(ca: x509.Certificate) -> str:
    for uri in uri_sans(ca):
        if uri.startswith("spiffe://") and "/" not in uri[len("spiffe://"):]:
            return check_fleet(uri[len("spiffe://"):])
    raise CertificateError("the fleet CA certificate has no URI SAN spiffe://<fleet>")


def _describe(cert: x509.Certificate) -> str:
    return f"certificate serial {cert.serial_number:#x} ({cert.subject.rfc4514_string()})"


@dataclass(frozen=True, slots=True)
class VerifiedChain:
    """The result of a successful chain check."""

    device: DeviceName
    agent: AgentName | None
    leaf: x509.Certificate
    device_certificate: x509.Certificate
    not_after: dt.datetime

    @property
    def leaf_public_key(self) -> PublicKey:
        key = self.leaf.public_key()
        assert isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey)
        return key

    @property
    def serials(self) -> tuple[int, ...]:
        return (self.leaf.serial_number, self.device_certificate.serial_number)


class FleetTrust:
    """The fleet CA and, when present, its current CRL."""

    def __init__(self, ca: x509.Certificate, crl: x509.CertificateRevocationList | None = None) -> None:
        self.ca = ca
        self.fleet = fleet_of_ca(ca)
        if crl is not None:
            ca_key = ca.public_key()
            if not isinstance(ca_key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) or \
                    not crl.is_signature_valid(ca_key):
                raise CertificateError("the revocation list is not signed by the fleet CA")
        self.crl = crl
        self._revoked = frozenset(r.serial_number for r in crl) if crl is not None else frozenset()

    @classmethod
    def from_pem(cls, ca_pem: bytes, crl_pem: bytes | None = None) -> FleetTrust:
        try:
            ca = x509.load_pem_x509_certificate(ca_pem)
            crl = x509.load_pem_x509_crl(crl_pem) if crl_pem else None
        except ValueError as exc:
            raise CertificateError(f"cannot parse the CA certificate or CRL: {exc}") from None
        return cls(ca, crl)

    def with_crl(self, crl_pem: bytes) -> FleetTrust:
        return FleetTrust.from_pem(_pem(self.ca), crl_pem)

    def is_revoked(self, serial: int) -> bool:
        return serial in self._revoked

    def verify_chain(self, chain: list[x509.Certificate], *, now: dt.datetime) -> VerifiedChain:
        """Check a leaf-first chain (the CA itself may be appended) against this fleet at time `now`.

        `cryptography` parses certificate fields lazily, so a malformed field surfaces here, as a ValueError from
        whichever accessor touches it first: every such failure becomes a `CertificateError`.
        """
        try:
            return self._verify_chain(chain, now=now)
        except (ValueError, TypeError, x509.InvalidVersion) as exc:
            raise CertificateError(f"malformed certificate in chain: {exc}") from None

    def _verify_chain(self, chain: list[x509.Certificate], *, now: dt.datetime) -> VerifiedChain:
        certs = [c for c in chain if c != self.ca]
        if not 1 <= len(certs) <= 2:
            raise CertificateError(f"a chain holds a device certificate and at most one delegated certificate, "
                                   f"got {len(certs)}")
        device_cert = certs[-1]
        self._check_link(device_cert, self.ca, now=now)
        self._check_ca_flag(device_cert, path_len=0)
        device = self._device_name(device_cert)
        agent = None
        leaf = device_cert
        if len(certs) == 2:
            leaf = certs[0]
            self._check_link(leaf, device_cert, now=now)
            agent = self._check_delegated(leaf, device)
        for cert in certs:
            if self.is_revoked(cert.serial_number):
                raise CertificateRevoked(f"{_describe(cert)} is revoked by the fleet CA")
        not_after = min(c.not_valid_after_utc for c in certs)
        return VerifiedChain(device, agent, leaf, device_cert, not_after)

    def _check_link(self, cert: x509.Certificate, issuer: x509.Certificate, *, now: dt.datetime) -> None:
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CertificateError(f"{_describe(cert)} is not signed by {_describe(issuer)}: {exc or 'bad signature'}"
                                   ) from None
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CertificateExpired(f"{_describe(cert)} is not valid at {now:%Y-%m-%dT%H:%M:%SZ} "
                                   f"(valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                                   f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")

    def _check_ca_flag(self, cert: x509.Certificate, *, path_len: int) -> None:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            raise CertificateError(f"{_describe(cert)} lacks basicConstraints or keyUsage") from None
        if not bc.ca or bc.path_length != path_len or not ku.key_cert_sign or not ku.digital_signature:
            raise CertificateError(f"{_describe(cert)} is not a device certificate (CA:TRUE, pathlen:0, "
                                   "keyCertSign, digitalSignature)")

    def _device_name(self, cert: x509.Certificate) -> DeviceName:
        for uri in uri_sans(cert):
            try:
                name = DeviceName.parse(uri)
            except BadName:
                continue
            if name.fleet != self.fleet:
                raise CertificateError(f"{_describe(cert)} names fleet {name.fleet!r}, expected {self.fleet!r}")
            return name
        raise CertificateError(f"{_describe(cert)} has no URI SAN spiffe://{self.fleet}/device/<id>")

    def _check_delegated(self, cert: x509.Certificate, device: DeviceName) -> AgentName | None:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise CertificateError(f"{_describe(cert)} lacks basicConstraints or extendedKeyUsage") from None
        if bc.ca or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise CertificateError(f"{_describe(cert)} is not a delegated end-entity certificate")
        for uri in uri_sans(cert):
            if uri == device.uri:
                return None
            try:
                agent = AgentName.parse(uri)
            except BadName:
                continue
            if agent.device == device:
                return agent
        raise CertificateError(f"{_describe(cert)} names no identity under {device.uri}")


def _pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM)
