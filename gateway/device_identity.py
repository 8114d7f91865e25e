"""The device's identity as the gateway uses it: hardware keys from the config, the enrolled certificate, the
delegated signing key (stored wrapped by the storage key) and relay tokens.

The hardware is touched at start-up, enrollment, delegation and token minting only; never per message.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

import hsm
from gateway.config import GatewayConfig
from gateway.fleet_ca import device_id_of, pem
from gateway.protocol.identity.delegation import DelegatedKey, delegate
from gateway.protocol.identity.errors import CertificateError
from gateway.protocol.identity.names import AgentName, DeviceName
from gateway.protocol.identity.signer import SoftwareSigner
from gateway.protocol.identity.tokens import mint_relay_token
from gateway.protocol.identity.trust import FleetTrust
from gateway.protocol.identity.x509build import build_csr
from hsm.api import IdentityKey, KeyInfo, StorageKey
from hsm.errors import KeyExists, KeyNotFound


class EnrollmentError(Exception):
    """Enrollment cannot proceed: the message says which file or setting is wrong."""


@dataclass
class KeysInitResult:
    created: list[str]
    existing: list[str]


def _exists(load: Any, uri: str) -> bool:
    try:
        load(uri)
    except KeyNotFound:
        return False
    return True


def init_keys(cfg: GatewayConfig, *, force: bool = False) -> KeysInitResult:
    """Create the identity and storage keys in the configured hardware. Idempotent: existing keys are kept
    (and checked) unless `force`."""
    result = KeysInitResult([], [])
    if not force and _exists(hsm.load_identity_key, cfg.keys.identity):
        key = hsm.load_identity_key(cfg.keys.identity)
        if key.algorithm is not cfg.keys.algorithm:
            raise KeyExists(f"an identity key of algorithm {key.algorithm.value} exists but the config asks for "
                            f"{cfg.keys.algorithm.value}; pass --force to replace it", uri=key.uri)
        result.existing.append("identity")
    else:
        hsm.create_identity_key(cfg.keys.identity, cfg.keys.algorithm, force=force)
        result.created.append("identity")
    if not force and _exists(hsm.load_storage_key, cfg.keys.storage):
        result.existing.append("storage")
    else:
        hsm.create_storage_key(cfg.keys.storage, force=force)
        result.created.append("storage")
    return result


def show_keys(cfg: GatewayConfig) -> dict[str, Any]:
    identity = hsm.load_identity_key(cfg.keys.identity).info()
    storage = hsm.load_storage_key(cfg.keys.storage).info()

    def as_dict(info: KeyInfo) -> dict[str, Any]:
        return {"backend": info.backend, "uri": info.uri, "algorithm": info.algorithm,
                "attributes": info.attributes.as_dict(), **({"public_key": info.public_key_pem}
                                                           if info.public_key_pem else {})}

    out: dict[str, Any] = {"identity": as_dict(identity), "storage": as_dict(storage)}
    if cfg.certificate_path.exists():
        cert = x509.load_pem_x509_certificate(cfg.certificate_path.read_bytes())
        out["certificate"] = {"subject": cert.subject.rfc4514_string(), "serial": cert.serial_number,
                              "not_after": cert.not_valid_after_utc.isoformat(), "device_id": device_id_of(cert)}
    return out


def make_csr(cfg: GatewayConfig, device_id: str) -> x509.CertificateSigningRequest:
    name = DeviceName(cfg.device.fleet, device_id)
    key = hsm.load_identity_key(cfg.keys.identity)
    return build_csr(key, common_name=device_id, organization=cfg.device.fleet, san_uri=name.uri)


def install_certificate(cfg: GatewayConfig, cert_pem: bytes, chain_pem: bytes) -> x509.Certificate:
    """Check that the certificate chains to the CA given, names this fleet, and belongs to our hardware key;
    then install both into the state directory."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        trust = FleetTrust.from_pem(chain_pem)
    except (ValueError, CertificateError) as exc:
        raise EnrollmentError(f"cannot read the certificate or CA chain: {exc}") from None
    if trust.fleet != cfg.device.fleet:
        raise EnrollmentError(f"the CA is for fleet {trust.fleet!r}, the config says {cfg.device.fleet!r}")
    try:
        verified = trust.verify_chain([cert], now=dt.datetime.now(dt.UTC))
    except CertificateError as exc:
        raise EnrollmentError(f"the certificate does not verify against the CA: {exc}") from None
    if cfg.device.id is not None and verified.device.device_id != cfg.device.id:
        raise EnrollmentError(f"the certificate is for device {verified.device.device_id!r}, the config says "
                              f"{cfg.device.id!r}")
    key = hsm.load_identity_key(cfg.keys.identity)
    if key.public_key() != cert.public_key():
        raise EnrollmentError("the certificate's public key is not this device's hardware identity key")
    cfg.paths.state_dir.mkdir(parents=True, exist_ok=True)
    cfg.certificate_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.certificate_path.write_bytes(pem(cert))
    cfg.ca_path.write_bytes(pem(trust.ca))
    return cert


@dataclass
class DeviceIdentity:
    """The loaded identity of an enrolled device: hardware handles plus certificates."""

    config: GatewayConfig
    identity_key: IdentityKey
    storage_key: StorageKey
    certificate: x509.Certificate
    trust: FleetTrust

    @classmethod
    def load(cls, cfg: GatewayConfig) -> DeviceIdentity:
        try:
            cert = x509.load_pem_x509_certificate(cfg.certificate_path.read_bytes())
            ca_pem = cfg.ca_path.read_bytes()
        except FileNotFoundError as exc:
            raise EnrollmentError(f"{exc.filename}: not found; enroll the device first (agw enroll csr / "
                                  "agw ca sign / agw enroll install)") from None
        crl_path = cfg.paths.state_dir / "crl.pem"
        trust = FleetTrust.from_pem(ca_pem, crl_path.read_bytes() if crl_path.exists() else None)
        identity_key = hsm.load_identity_key(cfg.keys.identity)
        if identity_key.public_key() != cert.public_key():
            raise EnrollmentError(f"{cfg.certificate_path}: certificate does not match the hardware identity key")
        return cls(cfg, identity_key, hsm.load_storage_key(cfg.keys.storage), cert, trust)

    @property
    def device(self) -> DeviceName:
        device_id = device_id_of(self.certificate)
        assert device_id is not None
        return DeviceName(self.trust.fleet, device_id)

    def mint_token(self, challenge: bytes, audience: str, *, now: int | None = None) -> str:
        """One hardware signature: a relay token bound to `challenge`."""
        return mint_relay_token(self.identity_key, chain=[self.certificate], audience=audience,
                                challenge=challenge, now=int(now if now is not None else dt.datetime.now(
                                    dt.UTC).timestamp()))

    def _delegated_path(self, agent: str | None) -> Path:
        return self.config.paths.state_dir / (f"delegated-{agent}.json" if agent else "delegated.json")

    def delegated_stamp(self, agent: str | None = None) -> tuple[int, int] | None:
        """(mtime_ns, size) of the delegated key file, None if missing: cheap, to notice a renewal (by the
        daemon or by `agw keys delegate --force`) without touching the hardware."""
        try:
            st = self._delegated_path(agent).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def delegated_certificate(self, agent: str | None = None) -> x509.Certificate | None:
        """The certificate of the delegated key on disk (no hardware operation), None if there is none yet."""
        try:
            data = json.loads(self._delegated_path(agent).read_text())
            return x509.load_pem_x509_certificate(data["certificate"].encode())
        except (OSError, ValueError, KeyError):
            return None

    @property
    def renew_before(self) -> dt.timedelta:
        """Renew a delegated key this long before it expires: a day, or half its lifetime if that is shorter."""
        return min(dt.timedelta(days=1), dt.timedelta(hours=self.config.keys.delegated_lifetime_hours) / 2)

    def delegated_key(self, *, agent: str | None = None, renew_before: dt.timedelta | None = None,
                      force_new: bool = False) -> DelegatedKey:
        """The current delegated signing key, made (one hardware signature) when missing or near expiry.
        On disk it is a JSON file holding the certificate and the private key wrapped by the storage key."""
        path = self._delegated_path(agent)
        now = dt.datetime.now(dt.UTC)
        if path.exists() and not force_new:
            data = json.loads(path.read_text())
            cert = x509.load_pem_x509_certificate(data["certificate"].encode())
            if cert.not_valid_after_utc - now > (self.renew_before if renew_before is None else renew_before):
                der = self.storage_key.unwrap(bytes.fromhex(data["wrapped_key"]))
                return DelegatedKey(SoftwareSigner.from_private_bytes(der), cert)
        agent_name = AgentName(self.device.fleet, self.device.device_id, agent) if agent else None
        lifetime = dt.timedelta(hours=self.config.keys.delegated_lifetime_hours)
        key = delegate(self.identity_key, self.certificate, device=self.device, agent=agent_name, now=now,
                       lifetime=lifetime)
        record = {"certificate": key.certificate.public_bytes(serialization.Encoding.PEM).decode(),
                  "wrapped_key": self.storage_key.wrap(key.signer.private_bytes()).hex(),
                  "storage_key": self.storage_key.uri}
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
        return key
