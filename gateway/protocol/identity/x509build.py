"""Build CSRs, certificates and CRLs signed by any `Signer`.

`cryptography`'s builders only sign with in-memory keys; a token- or TPM-held key cannot be used with them. So the
to-be-signed structures are built with `asn1crypto`, signed through the `Signer`, and loaded back into
`cryptography` objects, which every consumer then uses. asn1crypto is imported only when something is built (~3 MB
of RSS): a daemon restarted with a valid delegated key never loads it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

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
    from asn1crypto import keys as a_keys

    spki = a_keys.PublicKeyInfo.load(public_key_der(public_key))
    return hashlib.sha1(spki["public_key"].contents[1:], usedforsecurity=False).digest()


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
    """Issue a certificate; `issuer=None` makes it self-signed (the fleet CA)."""
    from asn1crypto import keys as a_keys
    from asn1crypto import x509 as a_x509

    subject = _name(common_name, organization)
    if issuer is None:
        issuer_name = subject
        issuer_ki = key_identifier(subject_key)
    else:
        issuer_name = a_x509.Certificate.load(issuer.public_bytes(Encoding.DER))["tbs_certificate"]["subject"]
        issuer_ki = key_identifier(issuer.public_key())  # type: ignore[arg-type]
    bc: dict[str, Any] = {"ca": profile.is_ca}
    if profile.is_ca and profile.path_len is not None:
        bc["path_len_constraint"] = profile.path_len
    exts: list[dict[str, Any]] = [
        {"extn_id": "basic_constraints", "critical": True, "extn_value": bc},
        {"extn_id": "key_usage", "critical": True, "extn_value": set(profile.key_usage)},
        {"extn_id": "key_identifier", "critical": False, "extn_value": key_identifier(subject_key)},
        {"extn_id": "authority_key_identifier", "critical": False, "extn_value": {"key_identifier": issuer_ki}},
    ]
    if profile.client_auth:
        exts.append({"extn_id": "extended_key_usage", "critical": False, "extn_value": ["client_auth"]})
    if san_uri is not None:
        exts.append({"extn_id": "subject_alt_name", "critical": False,
                     "extn_value": [a_x509.GeneralName(name="uniform_resource_identifier", value=san_uri)]})
    tbs = a_x509.TbsCertificate({
        "version": "v3",
        "serial_number": serial,
        "signature": _sig_alg(signer),
        "issuer": issuer_name,
        "validity": {"not_before": _time(not_before), "not_after": _time(not_after)},
        "subject": subject,
        "subject_public_key_info": a_keys.PublicKeyInfo.load(public_key_der(subject_key)),
        "extensions": exts,
    })
    signature = signer.sign(tbs.dump())
    cert = a_x509.Certificate({"tbs_certificate": tbs, "signature_algorithm": _sig_alg(signer),
                               "signature_value": signature})
    return x509.load_der_x509_certificate(cert.dump())


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
