"""Fixtures for relay tests: a TLS CA and server certificate, a fleet CA with device certificates, a running
relay on a free loopback port, and helpers to connect real RelayLink clients or hand-driven raw clients.

All certificates are made with `cryptography` / the identity layer in temporary directories.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import itertools
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import ClientConnection, connect

from gateway.link import RelayLink, RelayLinkConfig
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.identity.signer import SoftwareSigner
from gateway.protocol.identity.tokens import mint_relay_token
from gateway.protocol.identity.x509build import DEVICE, FLEET_CA, build_crl, issue_certificate
from gateway.protocol.link import ClientLink, LinkState
from hsm.api import KeyAlgorithm
from relay.auth import FleetVerifier
from relay.config import RelayConfig
from relay.server import RelayServer

FLEET = "acme"
AUDIENCE = "relay.test"
_serials = itertools.count(1000)


@dataclass
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _make_tls(d: Path) -> TlsFiles:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay test TLS CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(d / "tls-ca.pem", d / "relay.pem", d / "relay.key")
    files.ca_file.write_bytes(ca.public_bytes(Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(Encoding.PEM))
    files.key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return files


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return _make_tls(tmp_path_factory.mktemp("tls"))


@dataclass
class Device:
    device_id: str
    signer: SoftwareSigner
    cert: x509.Certificate
    lifetime: int = 3600
    tokens_minted: int = 0

    def token_provider(self, challenge: bytes, audience: str) -> str:
        self.tokens_minted += 1
        return mint_relay_token(self.signer, chain=[self.cert], audience=audience, challenge=challenge,
                                now=int(time.time()), lifetime=self.lifetime)


@dataclass
class Fleet:
    ca_signer: SoftwareSigner
    ca_cert: x509.Certificate
    revoked: list[int] = field(default_factory=list)

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(Encoding.PEM)

    def device(self, device_id: str, alg: KeyAlgorithm = KeyAlgorithm.ED25519) -> Device:
        now = dt.datetime.now(dt.UTC)
        key = SoftwareSigner.generate(alg)
        cert = issue_certificate(
            self.ca_signer, issuer=self.ca_cert, subject_key=key.public_key(), common_name=device_id,
            organization=FLEET, san_uri=f"spiffe://{FLEET}/device/{device_id}", serial=next(_serials),
            not_before=now - dt.timedelta(hours=1), not_after=now + dt.timedelta(days=1), profile=DEVICE,
        )
        return Device(device_id, key, cert)

    def crl_pem(self, number: int = 1) -> bytes:
        now = dt.datetime.now(dt.UTC)
        crl = build_crl(self.ca_signer, issuer=self.ca_cert, revoked=[(s, now) for s in self.revoked],
                        number=number, this_update=now - dt.timedelta(minutes=1),
                        next_update=now + dt.timedelta(days=1))
        return crl.public_bytes(Encoding.PEM)


def make_fleet() -> Fleet:
    now = dt.datetime.now(dt.UTC)
    key = SoftwareSigner.generate(KeyAlgorithm.ED25519)
    cert = issue_certificate(key, issuer=None, subject_key=key.public_key(), common_name="acme fleet CA",
                             organization=FLEET, san_uri=f"spiffe://{FLEET}", serial=1,
                             not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=30),
                             profile=FLEET_CA)
    return Fleet(key, cert)


@pytest.fixture(scope="session")
def fleet() -> Fleet:
    return make_fleet()


@dataclass
class RelayEnv:
    tls: TlsFiles
    fleet: Fleet
    tmp: Path
    relay: RelayServer | None = None
    links: list[RelayLink] = field(default_factory=list)
    raws: list[RawClient] = field(default_factory=list)

    @property
    def crl_file(self) -> Path:
        return self.tmp / "fleet.crl"

    def config(self, **overrides: Any) -> RelayConfig:
        base: dict[str, Any] = dict(host="127.0.0.1", port=0, audience=AUDIENCE, cert_file=self.tls.cert_file,
                                    key_file=self.tls.key_file, crl_file=self.crl_file, crl_poll_interval=0.2)
        base.update(overrides)
        return RelayConfig(**base)

    async def start(self, **overrides: Any) -> RelayServer:
        self.relay = RelayServer(self.config(**overrides), FleetVerifier(self.fleet.ca_pem))
        await self.relay.start()
        return self.relay

    @property
    def url(self) -> str:
        assert self.relay is not None
        return f"wss://localhost:{self.relay.port}/"

    def link_config(self, **overrides: Any) -> RelayLinkConfig:
        base: dict[str, Any] = dict(url=self.url, ca_file=self.tls.ca_file, backoff_initial=0.1, backoff_max=0.5)
        base.update(overrides)
        return RelayLinkConfig(**base)

    async def link(self, device: Device, *, wait: bool = True, **overrides: Any) -> RelayLink:
        link = RelayLink(self.link_config(**overrides), device.token_provider)
        link.start()
        self.links.append(link)
        if wait:
            await link.wait_ready(5)
        return link

    async def raw(self, device: Device | None = None, **kwargs: Any) -> RawClient:
        """A hand-driven client: the real ClientLink, but the test decides what to send."""
        ctx = ssl.create_default_context(cafile=str(self.tls.ca_file))
        ws = await connect(self.url, ssl=ctx, compression=None, proxy=None, **kwargs)
        raw = RawClient(ws, ClientLink())
        self.raws.append(raw)
        if device is not None:
            await raw.authenticate(device)
        return raw


@dataclass
class RawClient:
    ws: ClientConnection
    link: ClientLink

    async def recv_events(self, timeout: float = 5.0) -> list[Any]:
        msg = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(msg, bytes)
        self.link.receive_data(msg)
        return list(self.link.events_received())

    async def flush(self) -> None:
        for msg in self.link.data_to_send():
            await self.ws.send(msg)

    async def authenticate(self, device: Device) -> None:
        (challenge,) = await self.recv_events()
        self.link.authenticate(device.token_provider(challenge.nonce, challenge.audience))
        await self.flush()
        await self.recv_events()
        assert self.link.state is LinkState.READY


@pytest.fixture
async def env(tls: TlsFiles, fleet: Fleet, tmp_path: Path) -> AsyncIterator[RelayEnv]:
    e = RelayEnv(tls, fleet, tmp_path)
    yield e
    for link in e.links:
        await link.close()
    for raw in e.raws:
        raw.ws.transport.abort()
    if e.relay is not None:
        await e.relay.stop()


def envelope(sender: str, recipient: str, payload: bytes = b"ciphertext", kind: EnvelopeKind = EnvelopeKind.PAIRWISE,
             ) -> Envelope:
    return Envelope(kind, os.urandom(16), sender, recipient, payload)


async def next_event(link: RelayLink, cls: type | tuple[type, ...], timeout: float = 5.0) -> Any:
    """The next event of the given type(s) from a link, skipping others."""
    async with asyncio.timeout(timeout):
        async for ev in link.events():
            if isinstance(ev, cls):
                return ev
    raise AssertionError("event stream ended")


async def eventually(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
