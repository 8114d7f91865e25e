"""The identity CLI contract on a TPM (a real swtpm): P-256 keys in the TPM through keys init/show, CSR, CA
signature, install, delegation and relay tokens; `tpm2_readpublic` confirms the key cannot leave the TPM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cryptography import x509

from tests.support.swtpm import swtpm, swtpm_tcti  # noqa: F401 - pytest fixtures


def agw(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"agw {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def test_tpm_identity_through_every_cli_path(tmp_path, swtpm_tcti):  # noqa: F811 - fixture
    env = dict(os.environ)
    cfg = tmp_path / "agw.yaml"
    cfg.write_text(f"""
device: {{fleet: acme.test, id: pi-tpm}}
keys:
  identity: "tpm2:handle=0x81010007?tcti={swtpm_tcti}"
  storage: "tpm2:sealed={tmp_path / 'storage.tpm'}?tcti={swtpm_tcti}"
  algorithm: ecdsa-p256
paths: {{state_dir: state}}
""")
    agw(env, "config", "check", "--config", str(cfg))
    assert "created identity key" in agw(env, "keys", "init", "--config", str(cfg)).stdout
    assert "identity key exists; kept" in agw(env, "keys", "init", "--config", str(cfg)).stdout
    shown = json.loads(agw(env, "keys", "show", "--config", str(cfg), "--json").stdout)
    assert shown["identity"]["backend"] == "tpm2" and shown["identity"]["algorithm"] == "ecdsa-p256"
    assert shown["identity"]["attributes"]["extractable"] is False
    pub = subprocess.run(["tpm2_readpublic", "-c", "0x81010007", "-T", swtpm_tcti], capture_output=True, text=True,
                         check=True).stdout
    attrs = next(ln for ln in pub.splitlines() if ln.strip().startswith("value:") or "fixedtpm" in ln)
    assert "fixedtpm" in pub and "fixedparent" in pub and "sensitivedataorigin" in pub, attrs

    ca = tmp_path / "ca"
    agw(env, "ca", "init", "--dir", str(ca), "--fleet", "acme.test")
    agw(env, "enroll", "csr", "--config", str(cfg), "--device-id", "pi-tpm", "--out", str(tmp_path / "r.csr"))
    agw(env, "ca", "sign", "--dir", str(ca), "--csr", str(tmp_path / "r.csr"), "--out", str(tmp_path / "d.pem"))
    v = subprocess.run(["openssl", "verify", "-CAfile", ca / "ca.pem", tmp_path / "d.pem"], capture_output=True,
                       text=True)
    assert v.returncode == 0, v.stderr
    agw(env, "enroll", "install", "--config", str(cfg), "--cert", str(tmp_path / "d.pem"), "--chain",
        str(ca / "ca.pem"))
    agw(env, "keys", "delegate", "--config", str(cfg))
    record = json.loads((tmp_path / "state" / "delegated.json").read_text())
    deleg = x509.load_pem_x509_certificate(record["certificate"].encode())
    assert deleg.issuer == x509.load_pem_x509_certificate((tmp_path / "d.pem").read_bytes()).subject
    script = f"""
import os, jwt, time
from gateway.config import load_config
from gateway.device_identity import DeviceIdentity
from gateway.protocol.identity.tokens import verify_relay_token
ident = DeviceIdentity.load(load_config({str(cfg)!r}))
ch = os.urandom(32)
tok = ident.mint_token(ch, "relay.acme.test")
jwt.decode(tok, ident.certificate.public_key(), algorithms=["ES256"], audience="relay.acme.test")
print(verify_relay_token(tok, trust=ident.trust, audience="relay.acme.test", challenge=ch,
                         now=int(time.time())).device_id, jwt.get_unverified_header(tok)["alg"])
"""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pi-tpm", "ES256"]
