"""The fleet CA on the provisioning host: a directory holding the CA certificate, its key (a file, or a
PKCS#11 URI when the key sits in a token), an index of issued and revoked certificates, and the current CRL.

    DIR/ca.pem        CA certificate (URI SAN spiffe://<fleet>)
    DIR/ca.key        PKCS#8 PEM, mode 0600 (absent when DIR/ca.json names a key_uri)
    DIR/ca.json       fleet, key_uri, next CRL number
    DIR/index.json    issued certificates (serial, subject, not_after) and revocations
    DIR/crl.pem       the latest CRL, signed by the CA
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import hsm
from gateway.protocol.identity.errors import BadName
from gateway.protocol.identity.names import DeviceName, check_fleet
from gateway.protocol.identity.signer import Signer, SoftwareSigner
from gateway.protocol.identity.trust import uri_sans
from gateway.protocol.identity.x509build import DEVICE, FLEET_CA, build_crl, issue_certificate
from hsm.api import KeyAlgorithm


class CaError(Exception):
    """A fleet CA operation failed; the message says which file or request and why."""


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class FleetCA:
    directory: Path
    fleet: str
    certificate: x509.Certificate
    signer: Signer

    @classmethod
    def init(cls, directory: Path, fleet: str, *, key_uri: str | None = None,
             algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256, days: int = 3650) -> FleetCA:
        try:
            check_fleet(fleet)
        except BadName as exc:
            raise CaError(str(exc)) from None
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "ca.pem").exists():
            raise CaError(f"{directory}/ca.pem exists: a fleet CA is already initialised there")
        signer: Signer
        if key_uri is not None:
            signer = hsm.create_identity_key(key_uri, algorithm)
        else:
            soft = SoftwareSigner.generate(algorithm)
            _write_private(directory / "ca.key", soft.private_pem())
            signer = soft
        now = dt.datetime.now(dt.UTC)
        cert = issue_certificate(signer, issuer=None, subject_key=signer.public_key(),
                                 common_name=f"{fleet} fleet CA", organization=fleet, san_uri=f"spiffe://{fleet}",
                                 serial=secrets.randbits(63) | 1, not_before=now - dt.timedelta(minutes=5),
                                 not_after=now + dt.timedelta(days=days), profile=FLEET_CA)
        (directory / "ca.pem").write_bytes(pem(cert))
        (directory / "ca.json").write_text(json.dumps({"fleet": fleet, "key_uri": key_uri, "crl_number": 0}))
        (directory / "index.json").write_text(json.dumps({"issued": [], "revoked": []}))
        ca = cls(directory, fleet, cert, signer)
        ca.write_crl()
        return ca

    @classmethod
    def open(cls, directory: Path) -> FleetCA:
        try:
            meta = json.loads((directory / "ca.json").read_text())
            cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        except FileNotFoundError as exc:
            raise CaError(f"{exc.filename}: not found; run `agw ca init --dir {directory}` first") from None
        except (ValueError, OSError) as exc:
            raise CaError(f"{directory}: unreadable CA files: {exc}") from None
        signer: Signer
        if meta.get("key_uri"):
            signer = hsm.load_identity_key(meta["key_uri"])
        else:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
            if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
                raise CaError(f"{directory}/ca.key: unsupported key type")
            signer = SoftwareSigner(key)
        if signer.public_key() != cert.public_key():
            raise CaError(f"{directory}: the CA key does not match ca.pem")
        return cls(directory, meta["fleet"], cert, signer)

    def _index(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.directory / "index.json").read_text())
        return data

    def sign_csr(self, csr_pem: bytes, *, device_id: str | None = None, days: int = 365) -> x509.Certificate:
        """Check a device CSR (signature, fleet, device id) and issue its device certificate."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CaError(f"not a PEM certificate request: {exc}") from None
        if not csr.is_signature_valid:
            raise CaError("the CSR signature is invalid: it was not signed by the key it carries")
        try:
            sans = [str(u) for u in csr.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)]
        except x509.ExtensionNotFound:
            sans = []
        names = []
        for uri in sans:
            try:
                names.append(DeviceName.parse(uri))
            except BadName:
                continue
        if len(names) != 1:
            raise CaError("the CSR must carry exactly one URI SAN spiffe://<fleet>/device/<id>")
        name = names[0]
        if name.fleet != self.fleet:
            raise CaError(f"the CSR is for fleet {name.fleet!r}; this CA signs for {self.fleet!r}")
        if device_id is not None and name.device_id != device_id:
            raise CaError(f"the CSR names device {name.device_id!r}, not {device_id!r}")
        now = dt.datetime.now(dt.UTC)
        pub = csr.public_key()
        if not isinstance(pub, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
            raise CaError("device keys must be Ed25519 or ECDSA P-256")
        cert = issue_certificate(self.signer, issuer=self.certificate, subject_key=pub, common_name=name.device_id,
                                 organization=self.fleet, san_uri=name.uri, serial=secrets.randbits(63) | 1,
                                 not_before=now - dt.timedelta(minutes=5),
                                 not_after=min(now + dt.timedelta(days=days), self.certificate.not_valid_after_utc),
                                 profile=DEVICE)
        index = self._index()
        index["issued"].append({"serial": cert.serial_number, "device": name.device_id,
                                "not_after": cert.not_valid_after_utc.isoformat()})
        _atomic_write(self.directory / "index.json", json.dumps(index, indent=1).encode())
        return cert

    def revoke(self, serial: int) -> x509.CertificateRevocationList:
        index = self._index()
        if serial not in {e["serial"] for e in index["revoked"]}:
            index["revoked"].append({"serial": serial, "at": dt.datetime.now(dt.UTC).isoformat()})
            _atomic_write(self.directory / "index.json", json.dumps(index, indent=1).encode())
        return self.write_crl()

    def revoke_device(self, device_id: str) -> list[int]:
        serials = [e["serial"] for e in self._index()["issued"] if e["device"] == device_id]
        if not serials:
            raise CaError(f"no certificate was issued to device {device_id!r}")
        for s in serials:
            self.revoke(s)
        return serials

    def write_crl(self, days: int = 7) -> x509.CertificateRevocationList:
        meta = json.loads((self.directory / "ca.json").read_text())
        meta["crl_number"] = int(meta.get("crl_number", 0)) + 1
        now = dt.datetime.now(dt.UTC)
        revoked = [(e["serial"], dt.datetime.fromisoformat(e["at"])) for e in self._index()["revoked"]]
        crl = build_crl(self.signer, issuer=self.certificate, revoked=revoked, number=meta["crl_number"],
                        this_update=now - dt.timedelta(minutes=5), next_update=now + dt.timedelta(days=days))
        _atomic_write(self.directory / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))
        _atomic_write(self.directory / "ca.json", json.dumps(meta).encode())
        return crl


def device_id_of(cert: x509.Certificate) -> str | None:
    for uri in uri_sans(cert):
        try:
            return DeviceName.parse(uri).device_id
        except BadName:
            continue
    return None
