"""The identity CLI contract, end to end in subprocesses against real SoftHSM2 tokens, checked with OpenSC's
pkcs11-tool and OpenSSL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.softhsm import MODULE, USER_PIN, SoftHsmDir

ALGORITHMS = ["ed25519", "ecdsa-p256"]


def agw(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, capture_output=True, text=True,
                         timeout=120)
    if ok:
        assert out.returncode == 0, f"agw {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    assert USER_PIN not in out.stdout + out.stderr
    return out


def write_config(path: Path, hsmdir: SoftHsmDir, token: str, alg: str, extra: str = "") -> Path:
    path.write_text(f"""
device:
  fleet: acme.test
  id: pi-7
keys:
  identity: "{hsmdir.uri(token, 'agw-identity')}"
  storage: "{hsmdir.uri(token, 'agw-storage')}"
  algorithm: {alg}
paths:
  state_dir: state
{extra}""")
    return path


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_keys_enroll_and_openssl_verify(tmp_path, softhsm_dir, alg):
    softhsm_dir.init_token("dev")
    env = softhsm_dir.env
    cfg = write_config(tmp_path / "agw.yaml", softhsm_dir, "dev", alg)
    agw(env, "config", "check", "--config", str(cfg))

    first = agw(env, "keys", "init", "--config", str(cfg))
    assert "created identity key" in first.stdout and "created storage key" in first.stdout
    again = agw(env, "keys", "init", "--config", str(cfg))
    assert "identity key exists; kept" in again.stdout
    shown = json.loads(agw(env, "keys", "show", "--config", str(cfg), "--json").stdout)
    assert shown["identity"]["algorithm"] == alg and shown["identity"]["backend"] == "pkcs11"
    assert shown["identity"]["attributes"] == {"sensitive": True, "extractable": False,
                                               "never_extractable": True, "local": True}
    assert shown["storage"]["attributes"]["extractable"] is False
    assert "pin-value" not in json.dumps(shown) and USER_PIN not in json.dumps(shown)

    # OpenSC, independently of our code, reads the key attributes from the token.
    listing = subprocess.run(["pkcs11-tool", "--module", MODULE, "--token-label", "dev", "--login", "--pin",
                              USER_PIN, "--list-objects", "--type", "privkey"], env=env, capture_output=True,
                             text=True, check=True).stdout
    assert "label:      agw-identity" in listing
    access = next(ln for ln in listing.splitlines() if "Access:" in ln)
    assert "sensitive" in access and "never extractable" in access
    assert "extractable" not in access.replace("never extractable", "")
    assert ("EC_EDWARDS" if alg == "ed25519" else "Private Key Object; EC") in listing

    ca_dir = tmp_path / "ca"
    agw(env, "ca", "init", "--dir", str(ca_dir), "--fleet", "acme.test")
    csr = tmp_path / "pi-7.csr"
    agw(env, "enroll", "csr", "--config", str(cfg), "--device-id", "pi-7", "--out", str(csr))
    subprocess.run(["openssl", "req", "-in", csr, "-noout", "-verify"], check=True, capture_output=True)
    cert = tmp_path / "device.pem"
    agw(env, "ca", "sign", "--dir", str(ca_dir), "--csr", str(csr), "--out", str(cert), "--device-id", "pi-7")
    v = subprocess.run(["openssl", "verify", "-CAfile", ca_dir / "ca.pem", cert], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.strip().endswith("OK"), v.stdout + v.stderr
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    san = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)] == \
        ["spiffe://acme.test/device/pi-7"]

    agw(env, "enroll", "install", "--config", str(cfg), "--cert", str(cert), "--chain", str(ca_dir / "ca.pem"))
    assert (tmp_path / "state" / "device.pem").read_bytes() == cert.read_bytes()
    agw(env, "keys", "delegate", "--config", str(cfg))
    record = json.loads((tmp_path / "state" / "delegated.json").read_text())
    (tmp_path / "deleg.pem").write_text(record["certificate"])
    v = subprocess.run(["openssl", "verify", "-CAfile", ca_dir / "ca.pem", "-untrusted", cert,
                        tmp_path / "deleg.pem"], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    deleg = x509.load_pem_x509_certificate(record["certificate"].encode())
    assert (deleg.not_valid_after_utc - deleg.not_valid_before_utc).days == 7
    assert "PRIVATE KEY" not in json.dumps(record)

    # A relay token minted with the hardware key verifies with PyJWT and with our relay-side verifier.
    script = f"""
import os, jwt, time
from gateway.config import load_config
from gateway.device_identity import DeviceIdentity
from gateway.protocol.identity.tokens import verify_relay_token
ident = DeviceIdentity.load(load_config({str(cfg)!r}))
ch = os.urandom(32)
tok = ident.mint_token(ch, "relay.acme.test")
jwt.decode(tok, ident.certificate.public_key(), algorithms=["EdDSA", "ES256"], audience="relay.acme.test")
v = verify_relay_token(tok, trust=ident.trust, audience="relay.acme.test", challenge=ch, now=int(time.time()))
print(v.device_id, jwt.get_unverified_header(tok)["alg"])
"""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pi-7", "EdDSA" if alg == "ed25519" else "ES256"]

    # Revocation: the CA publishes a CRL that openssl honours.
    agw(env, "ca", "revoke", "--dir", str(ca_dir), "--device-id", "pi-7")
    v = subprocess.run(["openssl", "verify", "-crl_check", "-CRLfile", ca_dir / "crl.pem", "-CAfile",
                        ca_dir / "ca.pem", cert], capture_output=True, text=True)
    assert v.returncode != 0 and "revoked" in (v.stdout + v.stderr)


def test_keys_init_refuses_algorithm_change_without_force(tmp_path, softhsm_dir):
    softhsm_dir.init_token("dev")
    env = softhsm_dir.env
    agw(env, "keys", "init", "--config", str(write_config(tmp_path / "a.yaml", softhsm_dir, "dev", "ed25519")))
    cfg_b = write_config(tmp_path / "b.yaml", softhsm_dir, "dev", "ecdsa-p256")
    out = agw(env, "keys", "init", "--config", str(cfg_b), ok=False)
    assert out.returncode == 1 and "--force" in out.stderr
    agw(env, "keys", "init", "--config", str(cfg_b), "--force")
    shown = json.loads(agw(env, "keys", "show", "--config", str(cfg_b), "--json").stdout)
    assert shown["identity"]["algorithm"] == "ecdsa-p256"


def test_ca_refuses_foreign_fleet_and_mismatched_device(tmp_path, softhsm_dir):
    softhsm_dir.init_token("dev")
    env = softhsm_dir.env
    cfg = write_config(tmp_path / "agw.yaml", softhsm_dir, "dev", "ed25519")
    agw(env, "keys", "init", "--config", str(cfg))
    agw(env, "enroll", "csr", "--config", str(cfg), "--device-id", "pi-7", "--out", str(tmp_path / "r.csr"))
    agw(env, "ca", "init", "--dir", str(tmp_path / "other"), "--fleet", "other.test")
    out = agw(env, "ca", "sign", "--dir", str(tmp_path / "other"), "--csr", str(tmp_path / "r.csr"), "--out",
              str(tmp_path / "x.pem"), ok=False)
    assert out.returncode == 1 and "fleet 'acme.test'" in out.stderr
    agw(env, "ca", "init", "--dir", str(tmp_path / "ca"), "--fleet", "acme.test")
    out = agw(env, "ca", "sign", "--dir", str(tmp_path / "ca"), "--csr", str(tmp_path / "r.csr"), "--out",
              str(tmp_path / "x.pem"), "--device-id", "pi-8", ok=False)
    assert out.returncode == 1 and "'pi-7', not 'pi-8'" in out.stderr
    # A certificate for another key is refused at install time.
    agw(env, "ca", "sign", "--dir", str(tmp_path / "ca"), "--csr", str(tmp_path / "r.csr"), "--out",
        str(tmp_path / "ok.pem"))
    agw(env, "keys", "init", "--config", str(cfg), "--force")
    out = agw(env, "enroll", "install", "--config", str(cfg), "--cert", str(tmp_path / "ok.pem"), "--chain",
              str(tmp_path / "ca" / "ca.pem"), ok=False)
    assert out.returncode == 1 and "not this device's hardware identity key" in out.stderr


@pytest.mark.parametrize(("body", "expect"), [
    ("device: {fleet: acme.test}\nkeys: {identity: 'pkcs11:token=a;object=b', storage: 'pkcs11:token=a;object=c'}\n"
     "colour: blue\n", "colour: unknown key"),
    ("device: {fleet: acme.test}\nkeys: {identity: 'pkcs11:token=a;object=b', storage: 'pkcs11:token=a;object=c', "
     "delegated_lifetime_hours: soon}\n", "keys.delegated_lifetime_hours:"),
    ("device: {fleet: acme.test}\nkeys: {identity: 'pkcs12:token=a', storage: 'pkcs11:token=a;object=c'}\n",
     "keys.identity:"),
    ("device: {fleet: acme.test}\nkeys: {identity: 'pkcs11:object=b', storage: 'pkcs11:token=a;object=c'}\n",
     "must name a token"),
    ("device: {fleet: acme.test}\n", "keys: required key is missing"),
    ("device: [\n", "not valid YAML at line"),
    ("keys: {identity: 'tpm2:handle=0x1234', storage: 'tpm2:sealed=/x'}\ndevice: {fleet: a}\n",
     "persistent handle"),
])
def test_config_check_names_file_key_and_expectation(tmp_path, body, expect):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(body)
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "config", "check", "--config", str(cfg)], capture_output=True,
        text=True)
    assert out.returncode == 2
    assert str(cfg) in out.stderr and expect in out.stderr, out.stderr


def test_config_check_missing_file_and_profiles_are_valid(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", "--config",
                          str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert out.returncode == 2 and "nope.yaml: configuration file not found" in out.stderr
    root = Path(__file__).resolve().parents[2]
    for profile in sorted((root / "firmware-config" / "profiles").glob("*.yaml")):
        out = subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", "--config", str(profile)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_published_schema_matches_the_model():
    from gateway.config import SCHEMA_PATH, json_schema

    assert SCHEMA_PATH.read_text() == json_schema(), "regenerate with: agw config schema > " + str(SCHEMA_PATH)


def test_fleet_ca_key_in_a_token(tmp_path, softhsm_dir):
    softhsm_dir.init_token("ca-token")
    softhsm_dir.init_token("dev")
    env = softhsm_dir.env
    ca_uri = softhsm_dir.uri("ca-token", "fleet-ca")
    agw(env, "ca", "init", "--dir", str(tmp_path / "ca"), "--fleet", "acme.test", "--key-uri", ca_uri)
    assert not (tmp_path / "ca" / "ca.key").exists()
    cfg = write_config(tmp_path / "agw.yaml", softhsm_dir, "dev", "ed25519")
    agw(env, "keys", "init", "--config", str(cfg))
    agw(env, "enroll", "csr", "--config", str(cfg), "--device-id", "pi-7", "--out", str(tmp_path / "r.csr"))
    agw(env, "ca", "sign", "--dir", str(tmp_path / "ca"), "--csr", str(tmp_path / "r.csr"), "--out",
        str(tmp_path / "d.pem"))
    v = subprocess.run(["openssl", "verify", "-CAfile", tmp_path / "ca" / "ca.pem", tmp_path / "d.pem"],
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    listing = subprocess.run(["pkcs11-tool", "--module", MODULE, "--token-label", "ca-token", "--login", "--pin",
                              USER_PIN, "--list-objects", "--type", "privkey"], env=env, capture_output=True,
                             text=True, check=True).stdout
    assert "label:      fleet-ca" in listing and "never extractable" in listing
