"""Fleet CA chains, delegation, CRLs and relay tokens, with software keys (hardware paths: tests/hsm, tests/cli)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.protocol.identity.delegation import delegate
from gateway.protocol.identity.errors import (
    CertificateError,
    CertificateRevoked,
    TokenError,
    TokenExpired,
    TokenRevoked,
    TokenUntrusted,
)
from gateway.protocol.identity.names import AgentName, DeviceName
from gateway.protocol.identity.signer import SoftwareSigner
from gateway.protocol.identity.tokens import mint_relay_token, verify_relay_token
from gateway.protocol.identity.trust import FleetTrust
from gateway.protocol.identity.x509build import DEVICE, FLEET_CA, build_crl, build_csr, issue_certificate
from hsm.api import KeyAlgorithm

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
FLEET = "acme"


def make_ca(alg: KeyAlgorithm = KeyAlgorithm.ECDSA_P256):
    key = SoftwareSigner.generate(alg)
    cert = issue_certificate(key, issuer=None, subject_key=key.public_key(), common_name="acme fleet CA",
                             organization=FLEET, san_uri=f"spiffe://{FLEET}", serial=1,
                             not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=3650),
                             profile=FLEET_CA)
    return key, cert


def make_device(ca_key, ca_cert, alg: KeyAlgorithm, device_id: str = "pi-1", serial: int = 100):
    key = SoftwareSigner.generate(alg)
    csr = build_csr(key, common_name=device_id, organization=FLEET, san_uri=f"spiffe://{FLEET}/device/{device_id}")
    assert csr.is_signature_valid
    cert = issue_certificate(ca_key, issuer=ca_cert, subject_key=csr.public_key(), common_name=device_id,
                             organization=FLEET, san_uri=f"spiffe://{FLEET}/device/{device_id}", serial=serial,
                             not_before=NOW - dt.timedelta(hours=1), not_after=NOW + dt.timedelta(days=365),
                             profile=DEVICE)
    return key, cert


@pytest.mark.parametrize("alg", list(KeyAlgorithm))
def test_openssl_verifies_device_and_delegated_chain(tmp_path, alg):
    ca_key, ca_cert = make_ca()
    dev_key, dev_cert = make_device(ca_key, ca_cert, alg)
    deleg = delegate(dev_key, dev_cert, device=DeviceName(FLEET, "pi-1"), now=NOW)
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(Encoding.PEM))
    (tmp_path / "dev.pem").write_bytes(dev_cert.public_bytes(Encoding.PEM))
    (tmp_path / "deleg.pem").write_bytes(deleg.certificate.public_bytes(Encoding.PEM))
    # Certificates are made for the fixed NOW; -attime checks them at that instant.
    at = str(int(NOW.timestamp()))
    out = subprocess.run(["openssl", "verify", "-attime", at, "-CAfile", tmp_path / "ca.pem", tmp_path / "dev.pem"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr
    out = subprocess.run(["openssl", "verify", "-attime", at, "-CAfile", tmp_path / "ca.pem",
                          "-untrusted", tmp_path / "dev.pem", tmp_path / "deleg.pem"], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_chain_verification_and_delegation_names():
    ca_key, ca_cert = make_ca()
    dev_key, dev_cert = make_device(ca_key, ca_cert, KeyAlgorithm.ED25519)
    trust = FleetTrust(ca_cert)
    v = trust.verify_chain([dev_cert], now=NOW)
    assert v.device == DeviceName(FLEET, "pi-1") and v.agent is None
    agent = AgentName(FLEET, "pi-1", "planner")
    deleg = delegate(dev_key, dev_cert, device=v.device, agent=agent, now=NOW)
    v2 = trust.verify_chain([deleg.certificate, dev_cert, ca_cert], now=NOW)
    assert v2.agent == agent and v2.leaf == deleg.certificate
    assert deleg.not_after == NOW + dt.timedelta(days=7)
    with pytest.raises(CertificateError, match="not valid at"):
        trust.verify_chain([deleg.certificate, dev_cert], now=NOW + dt.timedelta(days=8))


def test_foreign_ca_and_wrong_fleet_rejected():
    _, ca_cert = make_ca()
    other_key, other_cert = make_ca()
    dev_key, dev_cert = make_device(other_key, other_cert, KeyAlgorithm.ED25519)
    with pytest.raises(CertificateError, match="not signed by"):
        FleetTrust(ca_cert).verify_chain([dev_cert], now=NOW)
    ch, now = os.urandom(32), int(NOW.timestamp())
    token = mint_relay_token(dev_key, chain=[dev_cert], audience="r", challenge=ch, now=now)
    with pytest.raises(TokenUntrusted):
        verify_relay_token(token, trust=FleetTrust(ca_cert), audience="r", challenge=ch, now=now)


def test_delegated_key_cannot_certify_another_device():
    ca_key, ca_cert = make_ca()
    dev_key, dev_cert = make_device(ca_key, ca_cert, KeyAlgorithm.ED25519, "pi-1")
    deleg = issue_certificate(dev_key, issuer=dev_cert, subject_key=SoftwareSigner.generate(
        KeyAlgorithm.ED25519).public_key(), common_name="x", organization=FLEET,
        san_uri=f"spiffe://{FLEET}/device/pi-2", serial=5, not_before=NOW, not_after=NOW + dt.timedelta(days=1),
        profile=DEVICE)
    with pytest.raises(CertificateError):
        FleetTrust(ca_cert).verify_chain([deleg, dev_cert], now=NOW)


def test_crl_revokes_and_must_be_signed_by_ca():
    ca_key, ca_cert = make_ca()
    _, dev_cert = make_device(ca_key, ca_cert, KeyAlgorithm.ECDSA_P256, serial=4242)
    crl = build_crl(ca_key, issuer=ca_cert, revoked=[(4242, NOW)], number=2, this_update=NOW,
                    next_update=NOW + dt.timedelta(days=7))
    trust = FleetTrust(ca_cert, crl)
    assert trust.is_revoked(4242)
    with pytest.raises(CertificateRevoked):
        trust.verify_chain([dev_cert], now=NOW)
    other_key, _ = make_ca()
    forged = build_crl(other_key, issuer=ca_cert, revoked=[], number=3, this_update=NOW,
                       next_update=NOW + dt.timedelta(days=7))
    with pytest.raises(CertificateError, match="not signed by the fleet CA"):
        FleetTrust(ca_cert, forged)


@pytest.mark.parametrize("alg", list(KeyAlgorithm))
def test_relay_token_round_trip_and_standard_library_verifies(alg):
    ca_key, ca_cert = make_ca()
    dev_key, dev_cert = make_device(ca_key, ca_cert, alg)
    trust = FleetTrust(ca_cert)
    challenge = os.urandom(32)
    now = int(NOW.timestamp())
    token = mint_relay_token(dev_key, chain=[dev_cert, ca_cert], audience="relay.acme", challenge=challenge, now=now)
    v = verify_relay_token(token, trust=trust, audience="relay.acme", challenge=challenge, now=now + 10)
    assert (v.device_id, v.fleet, v.expires_at) == ("pi-1", FLEET, now + 3600)
    # An independent check with PyJWT and nothing of ours but the public key.
    claims = jwt.decode(token, dev_cert.public_key(), algorithms=["EdDSA", "ES256"], audience="relay.acme",
                        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
    assert claims["sub"] == "spiffe://acme/device/pi-1"
    assert jwt.get_unverified_header(token)["alg"] == ("EdDSA" if alg is KeyAlgorithm.ED25519 else "ES256")


def test_relay_token_rejections():
    ca_key, ca_cert = make_ca()
    dev_key, dev_cert = make_device(ca_key, ca_cert, KeyAlgorithm.ED25519, serial=77)
    trust = FleetTrust(ca_cert)
    ch = os.urandom(32)
    now = int(NOW.timestamp())
    token = mint_relay_token(dev_key, chain=[dev_cert], audience="relay.acme", challenge=ch, now=now)
    with pytest.raises(TokenError, match="audience"):
        verify_relay_token(token, trust=trust, audience="other", challenge=ch, now=now)
    with pytest.raises(TokenError, match="challenge"):
        verify_relay_token(token, trust=trust, audience="relay.acme", challenge=os.urandom(32), now=now)
    with pytest.raises(TokenExpired, match="expired"):
        verify_relay_token(token, trust=trust, audience="relay.acme", challenge=ch, now=now + 3600 + 61)
    crl = build_crl(ca_key, issuer=ca_cert, revoked=[(77, NOW)], number=1, this_update=NOW,
                    next_update=NOW + dt.timedelta(days=1))
    with pytest.raises(TokenRevoked, match="revoked"):
        verify_relay_token(token, trust=FleetTrust(ca_cert, crl), audience="relay.acme", challenge=ch, now=now)
    head, body, sig = token.split(".")
    tampered = head + "." + body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + sig
    with pytest.raises(TokenError):
        verify_relay_token(tampered, trust=trust, audience="relay.acme", challenge=ch, now=now)
    for junk in ["", "a.b.c", "x" * 20000, "...."]:
        with pytest.raises(TokenError):
            verify_relay_token(junk, trust=trust, audience="relay.acme", challenge=ch, now=now)
    # A token signed by a delegated key is refused even though its chain is valid.
    deleg = delegate(dev_key, dev_cert, device=DeviceName(FLEET, "pi-1"), now=NOW)
    with pytest.raises((TokenError, Exception)):
        t2 = mint_relay_token(deleg.signer, chain=[deleg.certificate, dev_cert], audience="relay.acme",
                              challenge=ch, now=now)
        verify_relay_token(t2, trust=trust, audience="relay.acme", challenge=ch, now=now)
    with pytest.raises(ValueError):
        mint_relay_token(dev_key, chain=[dev_cert], audience="a", challenge=ch, now=now, lifetime=7200)


@pytest.mark.parametrize("bad", ["pi-1\n", "Pi-1", "-pi", "pi-", "", "a" * 65, "pi/1", "pi 1"])
def test_device_ids_are_strict(bad):
    from gateway.protocol.identity.errors import BadName
    from gateway.protocol.identity.names import check_id

    with pytest.raises(BadName):
        check_id("device id", bad)
