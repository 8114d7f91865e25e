"""Build CSRs, certificates and CRLs signed by any `Signer`.

`cryptography`'s builders only sign with in-memory keys; a token- or TPM-held key cannot be used with them. So
certificates are encoded by `cryptography`'s builder (its to-be-signed part, see `issue_certificate`) and the CSRs
and CRLs (fleet CA tools, never the daemon) with `asn1crypto`; each is signed through the `Signer` and loaded back
into a `cryptography` object, which every consumer then uses. asn1crypto is imported only when a CSR or CRL is
built (~1 MB of RSS that would stay for the process's life).
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.protocol.identity.signer import Signer, public_key_der
from hsm.api import KeyAlgorithm, PublicKey


def _sig_alg(signer: Signer) -> Any:
    from asn1crypto import algos as a_algos

    name = "ed25519" if signer.algorithm is KeyAlgorithm.ED25519 else "sha256_ecdsa"
    return a_algos.SignedDigestAlgorithm({"algorithm": name})


def _time(t: dt.datetime) -> Any:
    from asn1crypto import x509 as a_x509

    t = t.astimezone(dt.UTC).replace(microsecond=0)
    if t.year < 2050:
        return a_x509.Time(name="utc_time", value=t)
    return a_x509.Time(name="general_time", value=t)


def _name(common_name: str, organization: str) -> Any:
    from asn1crypto import x509 as a_x509

    return a_x509.Name.build({"organization_name": organization, "common_name": common_name})


def key_identifier(public_key: PublicKey) -> bytes:
    """RFC 5280 method 1: SHA-1 of the subjectPublicKey bit string."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


@dataclass(frozen=True, slots=True)
class CertProfile:
    """What kind of certificate: the fleet CA, a device (which certifies its delegated keys) or a delegated key."""

    is_ca: bool
    path_len: int | None
    key_usage: frozenset[str]
    client_auth: bool


FLEET_CA = CertProfile(True, 1, frozenset({"key_cert_sign", "crl_sign", "digital_signature"}), False)
DEVICE = CertProfile(True, 0, frozenset({"key_cert_sign", "digital_signature"}), True)
DELEGATED = CertProfile(False, None, frozenset({"digital_signature"}), True)


def issue_certificate(
    signer: Signer,
    *,
    issuer: x509.Certificate | None,
    subject_key: PublicKey,
    common_name: str,
    organization: str,
    san_uri: str | None,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    profile: CertProfile,
) -> x509.Certificate:
    """Issue a certificate; `issuer=None` makes it self-signed (the fleet CA).

    Built without asn1crypto (a device issues its delegated certificates at first start and at each renewal,
    and asn1crypto stays resident afterwards, ~1 MB): `cryptography`'s builder encodes the to-be-signed part
    (signed there with a throwaway key of the same algorithm, whose signature is discarded), `signer` signs
    those exact bytes, and the certificate is assembled around them."""
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization), _common_name(common_name)])
    with warnings.catch_warnings():  # (cryptography warns when it reads an issuer CN over 64: see _common_name)
        warnings.simplefilter("ignore", UserWarning)
        issuer_name = subject if issuer is None else issuer.subject
    issuer_key = subject_key if issuer is None else issuer.public_key()
    usage = profile.key_usage
    if not usage <= _KEY_USAGES:
        raise ValueError(f"unknown key usage {sorted(usage - _KEY_USAGES)}")
    builder = (
        x509.CertificateBuilder()
        .serial_number(serial)
        .issuer_name(issuer_name)
        .subject_name(subject)
        .not_valid_before(_whole_seconds(not_before))
        .not_valid_after(_whole_seconds(not_after))
        .public_key(subject_key)
        .add_extension(x509.BasicConstraints(ca=profile.is_ca, path_length=profile.path_len if profile.is_ca
                                             else None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature="digital_signature" in usage, content_commitment="non_repudiation" in usage,
            key_encipherment="key_encipherment" in usage, data_encipherment="data_encipherment" in usage,
            key_agreement="key_agreement" in usage, key_cert_sign="key_cert_sign" in usage,
            crl_sign="crl_sign" in usage, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(key_identifier(subject_key)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(key_identifier(issuer_key),  # type: ignore[arg-type]
                                                   None, None), critical=False)
    )
    if profile.client_auth:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                        critical=False)
    if san_uri is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san_uri)]),
                                        critical=False)
    tbs = _tbs_bytes(builder, signer.algorithm)
    return x509.load_der_x509_certificate(_signed(tbs, signer.algorithm, signer.sign(tbs)))


def _common_name(value: str) -> x509.NameAttribute[str]:
    """RFC 5280 bounds a common name at 64 characters and cryptography's builder refuses longer ones; ours can be
    longer (a 64-character device id + " (delegated)", "<fleet> fleet CA"), as they were when asn1crypto encoded
    them, and every certificate issued so far carries them so: encoded as is (nothing reads the CN; the identity
    is the SAN URI)."""
    if len(value) <= 64 and len(value.encode()) <= 64:
        return x509.NameAttribute(NameOID.COMMON_NAME, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ("Attribute's length must be >= 1 and <= 64")
        return x509.NameAttribute(NameOID.COMMON_NAME, value, _validate=False)


_KEY_USAGES = frozenset({"digital_signature", "non_repudiation", "key_encipherment", "data_encipherment",
                         "key_agreement", "key_cert_sign", "crl_sign"})


def _whole_seconds(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(microsecond=0)


# AlgorithmIdentifier DER of the two signature algorithms (RFC 8410 section 3: no parameters for Ed25519;
# RFC 5758 section 3.2: none for ecdsa-with-SHA256).
_ALG_ID = {
    KeyAlgorithm.ED25519: bytes.fromhex("300506032b6570"),
    KeyAlgorithm.ECDSA_P256: bytes.fromhex("300a06082a8648ce3d040302"),
}


def _tbs_bytes(builder: x509.CertificateBuilder, algorithm: KeyAlgorithm) -> bytes:
    """The to-be-signed bytes `builder` encodes for a certificate signed with `algorithm`."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if algorithm is KeyAlgorithm.ED25519:
        cert = builder.sign(ed25519.Ed25519PrivateKey.generate(), None)
    else:
        cert = builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    return cert.tbs_certificate_bytes


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _signed(tbs: bytes, algorithm: KeyAlgorithm, signature: bytes) -> bytes:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING } (RFC 5280)."""
    bits = b"\x00" + signature  # no unused bits
    body = tbs + _ALG_ID[algorithm] + b"\x03" + _der_length(len(bits)) + bits
    return b"\x30" + _der_length(len(body)) + body


def build_csr(signer: Signer, *, common_name: str, organization: str, san_uri: str) -> x509.CertificateSigningRequest:
    """A PKCS#10 request signed by `signer` (the device's hardware identity key), asking for `san_uri`."""
    from asn1crypto import csr as a_csr
    from asn1crypto import keys as a_keys
    from asn1crypto import x509 as a_x509

    san = a_x509.Extension({"extn_id": "subject_alt_name", "critical": False,
                            "extn_value": [a_x509.GeneralName(name="uniform_resource_identifier", value=san_uri)]})
    info = a_csr.CertificationRequestInfo({
        "version": "v1",
        "subject": _name(common_name, organization),
        "subject_pk_info": a_keys.PublicKeyInfo.load(public_key_der(signer.public_key())),
        "attributes": [{"type": "extension_request", "values": [a_x509.Extensions([san])]}],
    })
    signature = signer.sign(info.dump())
    req = a_csr.CertificationRequest({"certification_request_info": info, "signature_algorithm": _sig_alg(signer),
                                      "signature": signature})
    return x509.load_der_x509_csr(req.dump())


def build_crl(
    signer: Signer,
    *,
    issuer: x509.Certificate,
    revoked: list[tuple[int, dt.datetime]],
    number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
) -> x509.CertificateRevocationList:
    """A v2 CRL listing `revoked` (serial, revocation time), signed by the fleet CA."""
    from asn1crypto import crl as a_crl
    from asn1crypto import x509 as a_x509

    issuer_name = a_x509.Certificate.load(issuer.public_bytes(Encoding.DER))["tbs_certificate"]["subject"]
    tbs: dict[str, Any] = {
        "version": "v2",
        "signature": _sig_alg(signer),
        "issuer": issuer_name,
        "this_update": _time(this_update),
        "next_update": _time(next_update),
        "crl_extensions": [
            {"extn_id": "crl_number", "critical": False, "extn_value": number},
            {"extn_id": "authority_key_identifier", "critical": False,
             "extn_value": {"key_identifier": key_identifier(issuer.public_key())}},  # type: ignore[arg-type]
        ],
    }
    if revoked:
        tbs["revoked_certificates"] = [{"user_certificate": s, "revocation_date": _time(t)} for s, t in revoked]
    tbs_list = a_crl.TbsCertList(tbs)
    signature = signer.sign(tbs_list.dump())
    crl = a_crl.CertificateList({"tbs_cert_list": tbs_list, "signature_algorithm": _sig_alg(signer),
                                 "signature": signature})
    return x509.load_der_x509_crl(crl.dump())
