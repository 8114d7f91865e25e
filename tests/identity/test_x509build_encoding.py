"""`issue_certificate` encodes certificates with `cryptography`'s builder (no asn1crypto in the daemon, see
gateway/protocol/identity/x509build.py). These pin its output to what the asn1crypto encoder it replaced produced:
the same to-be-signed bytes for every profile and both algorithms, and byte for byte the same certificate for
Ed25519 (deterministic signatures), so chains issued before and after the change verify against each other."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import pytest
from asn1crypto import algos as a_algos
from asn1crypto import keys as a_keys
from asn1crypto import x509 as a_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.protocol.identity.signer import Signer, SoftwareSigner, public_key_der
from gateway.protocol.identity.x509build import DELEGATED, DEVICE, FLEET_CA, CertProfile, issue_certificate
from hsm.api import KeyAlgorithm, PublicKey

NOT_BEFORE = dt.datetime(2026, 12, 7, 10, 0, 0, 123456, tzinfo=dt.UTC)  # microseconds are dropped by both


def _reference(signer: Signer, *, issuer: x509.Certificate | None, subject_key: PublicKey, common_name: str,
               organization: str, san_uri: str | None, serial: int, not_before: dt.datetime,
               not_after: dt.datetime, profile: CertProfile) -> x509.Certificate:
    """The asn1crypto encoder `issue_certificate` used until 2026-12-07, unchanged."""
    def sig_alg() -> Any:
        name = "ed25519" if signer.algorithm is KeyAlgorithm.ED25519 else "sha256_ecdsa"
        return a_algos.SignedDigestAlgorithm({"algorithm": name})

    def time(t: dt.datetime) -> Any:
        t = t.astimezone(dt.UTC).replace(microsecond=0)
        return a_x509.Time(name="utc_time" if t.year < 2050 else "general_time", value=t)

    def ki(key: PublicKey) -> bytes:
        spki = a_keys.PublicKeyInfo.load(public_key_der(key))
        return hashlib.sha1(spki["public_key"].contents[1:], usedforsecurity=False).digest()

    subject = a_x509.Name.build({"organization_name": organization, "common_name": common_name})
    if issuer is None:
        issuer_name, issuer_ki = subject, ki(subject_key)
    else:
        issuer_name = a_x509.Certificate.load(issuer.public_bytes(Encoding.DER))["tbs_certificate"]["subject"]
        issuer_ki = ki(issuer.public_key())  # type: ignore[arg-type]
    bc: dict[str, Any] = {"ca": profile.is_ca}
    if profile.is_ca and profile.path_len is not None:
        bc["path_len_constraint"] = profile.path_len
    exts: list[dict[str, Any]] = [
        {"extn_id": "basic_constraints", "critical": True, "extn_value": bc},
        {"extn_id": "key_usage", "critical": True, "extn_value": set(profile.key_usage)},
        {"extn_id": "key_identifier", "critical": False, "extn_value": ki(subject_key)},
        {"extn_id": "authority_key_identifier", "critical": False, "extn_value": {"key_identifier": issuer_ki}},
    ]
    if profile.client_auth:
        exts.append({"extn_id": "extended_key_usage", "critical": False, "extn_value": ["client_auth"]})
    if san_uri is not None:
        exts.append({"extn_id": "subject_alt_name", "critical": False,
                     "extn_value": [a_x509.GeneralName(name="uniform_resource_identifier", value=san_uri)]})
    tbs = a_x509.TbsCertificate({
        "version": "v3", "serial_number": serial, "signature": sig_alg(), "issuer": issuer_name,
        "validity": {"not_before": time(not_before), "not_after": time(not_after)}, "subject": subject,
        "subject_public_key_info": a_keys.PublicKeyInfo.load(public_key_der(subject_key)), "extensions": exts,
    })
    cert = a_x509.Certificate({"tbs_certificate": tbs, "signature_algorithm": sig_alg(),
                               "signature_value": signer.sign(tbs.dump())})
    return x509.load_der_x509_certificate(cert.dump())


# Names as the fleet CA tools and the delegation build them, short and as long as the name rules allow: a fleet
# of 120 characters ("<fleet> fleet CA"), a device id of 64 ("<device> (delegated)"), an agent name of 64. RFC
# 5280 bounds a common name at 64 characters, which cryptography's builder enforces; asn1crypto did not, and
# certificates already issued carry such names, so the longer ones are encoded as before.
SHORT = ("acme", "pi-1", "pi-1/agent é")
LONG = ("f" * 60 + "." + "g" * 55 + ".org", "d" * 64, "d" * 64 + "/" + "a" * 64 + " (delegated)")


def _chain(build: Any, alg: KeyAlgorithm, keys: tuple[SoftwareSigner, ...], names: tuple[str, str, str] = SHORT
           ) -> list[x509.Certificate]:
    ca, dev, deleg = keys
    fleet, device, delegated = names
    far = dt.datetime(2056, 3, 1, tzinfo=dt.UTC)  # past 2049: GeneralizedTime
    c = build(ca, issuer=None, subject_key=ca.public_key(), common_name=f"{fleet} fleet CA", organization=fleet,
              san_uri=f"spiffe://{fleet}", serial=1, not_before=NOT_BEFORE, not_after=far, profile=FLEET_CA)
    d = build(ca, issuer=c, subject_key=dev.public_key(), common_name=device, organization=fleet,
              san_uri=f"spiffe://{fleet}/device/{device}", serial=2**70 + 5, not_before=NOT_BEFORE,
              not_after=NOT_BEFORE + dt.timedelta(days=365), profile=DEVICE)
    e = build(dev, issuer=d, subject_key=deleg.public_key(), common_name=delegated, organization=fleet,
              san_uri=None, serial=3, not_before=NOT_BEFORE, not_after=NOT_BEFORE + dt.timedelta(days=1),
              profile=DELEGATED)
    return [c, d, e]


@pytest.mark.parametrize("names", [SHORT, LONG], ids=["short-names", "longest-names"])
@pytest.mark.parametrize("alg", list(KeyAlgorithm))
def test_issue_certificate_encodes_what_the_asn1crypto_encoder_did(alg: KeyAlgorithm, names: tuple[str, str, str]
                                                                   ) -> None:
    keys = (SoftwareSigner.generate(alg), SoftwareSigner.generate(alg), SoftwareSigner.generate(alg))
    ours, theirs = _chain(issue_certificate, alg, keys, names), _chain(_reference, alg, keys, names)
    for new, old in zip(ours, theirs, strict=True):
        assert new.tbs_certificate_bytes == old.tbs_certificate_bytes
        assert new.signature_algorithm_oid == old.signature_algorithm_oid
        if alg is KeyAlgorithm.ED25519:
            assert new.public_bytes(Encoding.DER) == old.public_bytes(Encoding.DER)
    # Each new certificate verifies under the old issuer and the other way round.
    for chain_a, chain_b in ((ours, theirs), (theirs, ours)):
        chain_a[1].verify_directly_issued_by(chain_b[0])
        chain_a[2].verify_directly_issued_by(chain_b[1])


def test_the_signature_is_the_signers_over_the_to_be_signed_bytes() -> None:
    """A signer that signs something else than the to-be-signed bytes gives a certificate that does not verify."""
    ca = SoftwareSigner.generate(KeyAlgorithm.ECDSA_P256)

    class Wrong:
        algorithm = ca.algorithm

        def public_key(self) -> PublicKey:
            return ca.public_key()

        def sign(self, data: bytes) -> bytes:
            return ca.sign(data + b"x")

    cert = issue_certificate(Wrong(), issuer=None, subject_key=ca.public_key(), common_name="ca", organization="o",
                             san_uri=None, serial=1, not_before=NOT_BEFORE,
                             not_after=NOT_BEFORE + dt.timedelta(days=1), profile=FLEET_CA)
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(cert)
    good = issue_certificate(ca, issuer=None, subject_key=ca.public_key(), common_name="ca", organization="o",
                             san_uri=None, serial=1, not_before=NOT_BEFORE,
                             not_after=NOT_BEFORE + dt.timedelta(days=1), profile=FLEET_CA)
    good.verify_directly_issued_by(good)


def test_an_unknown_key_usage_is_refused() -> None:
    ca = SoftwareSigner.generate(KeyAlgorithm.ED25519)
    with pytest.raises(ValueError, match="unknown key usage"):
        issue_certificate(ca, issuer=None, subject_key=ca.public_key(), common_name="ca", organization="o",
                          san_uri=None, serial=1, not_before=NOT_BEFORE, not_after=NOT_BEFORE + dt.timedelta(days=1),
                          profile=CertProfile(True, None, frozenset({"key_cert_sign", "typo"}), False))


def test_a_device_and_agent_with_the_longest_names_get_delegated_keys() -> None:
    """What the daemon does at its first start and at each renewal, with a 64-character device id and agent name
    (their common names then exceed RFC 5280's 64)."""
    from gateway.protocol.identity.delegation import delegate
    from gateway.protocol.identity.names import AgentName, DeviceName

    fleet, device_id, agent = "fleet.example", "d" * 64, "a" * 64
    ca, dev = SoftwareSigner.generate(KeyAlgorithm.ECDSA_P256), SoftwareSigner.generate(KeyAlgorithm.ECDSA_P256)
    chain = _chain(issue_certificate, KeyAlgorithm.ECDSA_P256, (ca, dev, dev), (fleet, device_id, "unused"))
    now = NOT_BEFORE + dt.timedelta(days=1)
    for name in (None, AgentName(fleet, device_id, agent)):
        key = delegate(dev, chain[1], device=DeviceName(fleet, device_id), agent=name, now=now)
        key.certificate.verify_directly_issued_by(chain[1])
        with pytest.warns(UserWarning, match="length"):  # (cryptography reading a CN over 64)
            cn = key.certificate.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
        assert cn == (f"{device_id}/{agent}" if name else device_id) + " (delegated)"
