"""The relay under abuse, while two real gateways keep a stream going through it.

Abuse, from one attacker device with a valid certificate and from anonymous connections: garbage before
authentication, oversized frames (before and after auth), envelope floods past the rate limit, many idle
WebSocket connections and half-open TCP connections, and expired, replayed (other challenge), wrongly-audienced,
forged and revoked tokens. Promised: each is refused or cut off; legitimate traffic keeps flowing, exactly once,
at a measured fraction of the undisturbed rate.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.fleet_ca import FleetCA
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.identity.signer import SoftwareSigner
from gateway.protocol.identity.tokens import mint_relay_token
from gateway.protocol.identity.x509build import build_csr
from gateway.protocol.link import (
    Auth,
    AuthFail,
    AuthOk,
    Challenge,
    Envelopes,
    Error,
    LinkLimits,
    Undeliverable,
    UndeliverableReason,
    decode_frame,
    encode_frame,
)
from gateway.testbed import Testbed
from hsm.api import KeyAlgorithm
from tests.torture.conftest import LONG, record
from tests.torture.stream import Receiver, Sender, tally, wait_delivered

STREAM = 2000 if LONG else 300
IDLE_WS = 500 if LONG else 60
HALF_OPEN = 3000 if LONG else 300
FLOOD_FRAMES = 2000 if LONG else 200
LIMITS = LinkLimits()
HOLD_SOCKETS = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
print(len(held), flush=True)
sys.stdin.read()
"""


class Attacker:
    """A device of the fleet with a software key: its certificate is valid, its intentions are not."""

    def __init__(self, bed: Testbed, device_id: str) -> None:
        self.device_id = device_id
        self.key = SoftwareSigner.generate(KeyAlgorithm.ED25519)
        csr = build_csr(self.key, common_name=device_id, organization=bed.fleet,
                        san_uri=f"spiffe://{bed.fleet}/device/{device_id}")
        from cryptography.hazmat.primitives.serialization import Encoding

        ca = FleetCA.open(bed.ca_dir)
        self.cert = ca.sign_csr(csr.public_bytes(Encoding.PEM), device_id=device_id, days=2)
        self.ca_cert = ca.certificate
        self.audience = f"relay.{bed.fleet}"
        self.url = f"wss://127.0.0.1:{bed.relay_port}/"
        self.tls = ssl.create_default_context(cafile=str(bed.tls_ca))

    def token(self, challenge: bytes, *, audience: str | None = None, now: int | None = None,
              key: SoftwareSigner | None = None) -> str:
        return mint_relay_token(key or self.key, chain=[self.cert, self.ca_cert], audience=audience or self.audience,
                                challenge=challenge, now=int(time.time()) if now is None else now)

    async def open(self) -> tuple[ClientConnection, bytes]:
        ws = await connect(self.url, ssl=self.tls, compression=None, max_size=None, open_timeout=10)
        frame = decode_frame(bytes(await ws.recv()), LIMITS)  # type: ignore[arg-type]
        assert isinstance(frame, Challenge)
        return ws, frame.nonce


async def closed_by_relay(ws: ClientConnection, timeout: float = 15.0) -> list[object]:
    """Read until the relay closes the connection; return the frames it sent before closing."""
    frames: list[object] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                frames.append(decode_frame(bytes(await ws.recv()), LIMITS))  # type: ignore[arg-type]
    except ConnectionClosed:
        return frames
    except TimeoutError:
        raise AssertionError(f"the relay kept the connection open; frames: {frames}") from None


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    root = tmp_path_factory.mktemp("abuse")
    conf = root / "relay.toml"
    conf.write_text("[relay]\nauth_timeout = 3.0\n")
    tb = Testbed(root, relay_extra=["--config", str(conf)])
    try:
        tb.start_relay()
        tb.add_gateway("dev-a", agents={"alice": ["dev-b/bob"]})
        tb.add_gateway("dev-b", agents={"bob": ["dev-a/alice"]})
        for gw in tb.gateways.values():
            gw.start()
        for gw in tb.gateways.values():
            gw.wait_ready()
        yield tb
    finally:
        tb.close()


def _stream(bed: Testbed, prefix: bytes, n: int,
            until: threading.Event | None = None) -> tuple[int, float, dict[str, int]]:
    """Stream alice -> bob in chunks of `n` until `until` is set (at least one chunk); (messages, seconds, tally)."""
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    rx = Receiver("bob", b.broker.port)
    rx.start()
    tx = Sender("alice", a.broker.port, "dev-b/bob")
    tx.start()
    t0 = time.monotonic()
    chunk = 0
    while True:
        tx.run(prefix + f"{chunk}|".encode(), n)
        wait_delivered(rx, prefix, len(tx.sent), 180)
        chunk += 1
        if until is None or until.is_set():
            break
    elapsed = time.monotonic() - t0
    time.sleep(1.0)
    t = tally(tx.sent, rx.payloads(prefix))
    rx.stop()
    tx.stop()
    return len(tx.sent), elapsed, t.as_dict()


async def _abuse(bed: Testbed, attacker: Attacker, revoked: Attacker) -> dict[str, object]:
    out: dict[str, object] = {}

    # Garbage before authentication: the relay closes the connection.
    ws, _ = await attacker.open()
    await ws.send(os.urandom(200))
    await closed_by_relay(ws)
    out["garbage_before_auth_closed"] = True

    # An oversized frame before authentication.
    ws, _ = await attacker.open()
    try:
        await ws.send(b"\x01\x02" + os.urandom(LIMITS.max_frame_size + 1024))
    except ConnectionClosed:
        pass
    await closed_by_relay(ws)
    out["oversized_before_auth_closed"] = True

    # Tokens: expired, bound to another challenge (replayed), another audience, forged signature, revoked device.
    bad_tokens = {
        "expired": lambda nonce: attacker.token(nonce, now=int(time.time()) - 7200),
        "replayed": lambda nonce: attacker.token(os.urandom(32)),
        "wrong_audience": lambda nonce: attacker.token(nonce, audience="relay.elsewhere"),
        "forged": lambda nonce: attacker.token(nonce, key=SoftwareSigner.generate(KeyAlgorithm.ED25519)),
        "revoked": lambda nonce: revoked.token(nonce),
    }
    refused: dict[str, str] = {}
    for name, make in bad_tokens.items():
        ws, nonce = await attacker.open()
        await ws.send(encode_frame(Auth(make(nonce))))
        frames = await closed_by_relay(ws)
        assert frames and isinstance(frames[0], AuthFail), (name, frames)
        refused[name] = frames[0].code.name
    out["tokens_refused"] = refused

    # Idle WebSocket connections that never authenticate: cut off after the auth timeout (3 s here).
    idle = [await attacker.open() for _ in range(IDLE_WS)]
    t0 = time.monotonic()
    results = await asyncio.gather(*(closed_by_relay(ws, 20) for ws, _ in idle), return_exceptions=True)
    out["idle_ws"] = IDLE_WS
    out["idle_ws_cut_off"] = sum(1 for r in results if not isinstance(r, BaseException))
    out["idle_ws_cut_off_after_s"] = round(time.monotonic() - t0, 1)

    # A flood from an authenticated device: frames full of envelopes, as fast as TLS goes.
    ws, nonce = await attacker.open()
    await ws.send(encode_frame(Auth(attacker.token(nonce))))
    first = decode_frame(bytes(await ws.recv()), LIMITS)  # type: ignore[arg-type]
    assert isinstance(first, AuthOk), first
    rate_limited = 0
    sent_envelopes = 0
    flood_closed = False

    async def reader() -> None:
        nonlocal rate_limited, flood_closed
        try:
            while True:
                f = decode_frame(bytes(await ws.recv()), LIMITS)  # type: ignore[arg-type]
                if isinstance(f, Undeliverable) and f.reason is UndeliverableReason.RATE_LIMITED:
                    rate_limited += len(f.envelope_ids)
                elif isinstance(f, Error):
                    rate_limited += 1
        except ConnectionClosed:
            flood_closed = True

    rtask = asyncio.create_task(reader())
    batch = tuple(Envelope(EnvelopeKind.PAIRWISE, os.urandom(16), attacker.device_id, "dev-b", os.urandom(200))
                  for _ in range(100))
    try:
        for _ in range(FLOOD_FRAMES):
            await ws.send(encode_frame(Envelopes(batch)))
            sent_envelopes += len(batch)
    except ConnectionClosed:
        pass
    await asyncio.sleep(1.0)
    # An oversized frame after authentication ends the connection too.
    try:
        await ws.send(b"\x01\x10" + os.urandom(LIMITS.max_frame_size + 1024))
        await asyncio.wait_for(rtask, 15)
    except ConnectionClosed:
        pass
    flood_closed = flood_closed or ws.close_code is not None
    rtask.cancel()
    out.update(flood_envelopes=sent_envelopes, flood_refused=rate_limited, flood_connection_closed=flood_closed)
    return out


def test_relay_abuse_while_legitimate_traffic_flows(bed: Testbed) -> None:
    attacker = Attacker(bed, "mallory")
    revoked = Attacker(bed, "revoked-dev")
    bed.revoke("revoked-dev")
    time.sleep(2.5)  # the relay re-reads the CRL every second

    baseline_n, baseline_s, baseline = _stream(bed, b"baseline|", STREAM)

    # Half-open TCP connections that never send a TLS ClientHello, held by a child process (paho's select()
    # cannot watch descriptors above 1024, so thousands of sockets cannot live in this process).
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SOCKETS, str(bed.relay_port), str(HALF_OPEN)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == str(HALF_OPEN)

    done = threading.Event()
    abuse_result: dict[str, object] = {}
    errors: list[BaseException] = []

    def abuse() -> None:
        try:
            abuse_result.update(asyncio.run(_abuse(bed, attacker, revoked)))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    th = threading.Thread(target=abuse)
    th.start()
    under_n, under_s, under = _stream(bed, b"under-abuse|", 100, until=done)
    th.join(300)
    holder.communicate("", timeout=30)
    base_rate, under_rate = baseline_n / baseline_s, under_n / under_s
    ratio = under_rate / base_rate
    record("relay.abuse", baseline_msgs=baseline_n, baseline_rate=round(base_rate, 1), under_abuse_msgs=under_n,
           under_abuse_seconds=round(under_s, 1), under_abuse_rate=round(under_rate, 1), rate_ratio=round(ratio, 2),
           half_open=HALF_OPEN, legit_under_abuse=under, **abuse_result)
    assert not errors, errors
    assert not th.is_alive()
    for t, n in ((baseline, baseline_n), (under, under_n)):
        assert (t["lost"], t["duplicated"], t["foreign"], t["same_id_redeliveries"]) == (0, 0, 0, 0), t
        assert t["delivered"] == t["sent"] == n
    assert set(abuse_result["tokens_refused"]) == {"expired", "replayed", "wrong_audience", "forged", "revoked"}  # type: ignore[arg-type]
    assert abuse_result["idle_ws_cut_off"] == IDLE_WS
    assert abuse_result["flood_refused"] or abuse_result["flood_connection_closed"]
    assert ratio >= 0.1, f"legitimate traffic slowed {1 / ratio:.1f}x under abuse"
    # The attacker's garbage envelopes that got through the rate limit reached dev-b, which refused them all.
    for gw in bed.gateways.values():
        gw.wait_ready(30)
        assert "Traceback" not in gw.log_text()
    relay_log = Path(bed.relay_log).read_text(errors="replace")
    assert "Traceback" not in relay_log, relay_log[-3000:]
