"""Relay capacity: N concurrent authenticated gateway connections held by one `agw-relay` process, and the
relay's resident memory per connection.

Each connection is a real client: TLS 1.3, WebSocket, the relay's challenge, a token signed by the device key
with its fleet certificate chain, AUTH_OK. Runs in its own process (it holds N sockets):
    python -m bench.relay_capacity --connections 5000
prints `RESULT <json>`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import signal
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from bench.paths import relay_config, rss_kib
from gateway.protocol.identity.signer import SoftwareSigner
from gateway.protocol.identity.tokens import mint_relay_token
from gateway.protocol.identity.x509build import DEVICE, FLEET_CA, issue_certificate
from gateway.protocol.link import ChallengeReceived, ClientLink, LinkState
from gateway.testbed import _tls_ca
from hsm.api import KeyAlgorithm

FLEET = "bench.local"
AUDIENCE = "relay.bench.local"
_serials = itertools.count(100)


@dataclass
class Device:
    device_id: str
    signer: SoftwareSigner
    chain: list[Any]

    def token(self, challenge: bytes, audience: str) -> str:
        return mint_relay_token(self.signer, chain=self.chain, audience=audience, challenge=challenge,
                                now=int(time.time()), lifetime=3600)


def make_fleet(d: Path, count: int) -> list[Device]:
    """A fleet CA (written to d/ca.pem) and `count` device certificates with software keys."""
    from cryptography.hazmat.primitives.serialization import Encoding

    now = dt.datetime.now(dt.UTC)
    ca_key = SoftwareSigner.generate(KeyAlgorithm.ED25519)
    ca = issue_certificate(ca_key, issuer=None, subject_key=ca_key.public_key(), common_name="bench fleet CA",
                           organization=FLEET, san_uri=f"spiffe://{FLEET}", serial=1,
                           not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=2),
                           profile=FLEET_CA)
    (d / "ca.pem").write_bytes(ca.public_bytes(Encoding.PEM))
    devices = []
    for i in range(count):
        key = SoftwareSigner.generate(KeyAlgorithm.ED25519)
        name = f"dev-{i:05d}"
        cert = issue_certificate(ca_key, issuer=ca, subject_key=key.public_key(), common_name=name,
                                 organization=FLEET, san_uri=f"spiffe://{FLEET}/device/{name}", serial=next(_serials),
                                 not_before=now - dt.timedelta(hours=1), not_after=now + dt.timedelta(days=1),
                                 profile=DEVICE)
        devices.append(Device(name, key, [cert]))
    return devices


async def open_authenticated(url: str, ctx: ssl.SSLContext, dev: Device) -> ClientConnection:
    """One gateway connection, authenticated (the same handshake RelayLink does)."""
    ws = await connect(url, ssl=ctx, compression=None, proxy=None, max_queue=4)
    link = ClientLink()
    while link.state is not LinkState.READY:
        msg = await asyncio.wait_for(ws.recv(), 30)
        link.receive_data(msg)  # type: ignore[arg-type]
        for ev in link.events_received():
            if isinstance(ev, ChallengeReceived):
                link.authenticate(dev.token(ev.nonce, ev.audience))
        for out in link.data_to_send():
            await ws.send(out)
        if link.state is LinkState.CLOSED:
            raise RuntimeError(f"relay refused {dev.device_id}")
    return ws


# Experiment only (the relay's code is not changed): asyncio's SSLProtocol allocates a 256 KiB read buffer per
# TLS connection (asyncio/sslproto.py, `max_size`). This launcher sets it before running the unchanged relay CLI.
SSL_BUFFER_LAUNCHER = ("import sys, asyncio.sslproto as s; s.SSLProtocol.max_size = int(sys.argv.pop(1)); "
                       "from relay.cli import main; raise SystemExit(main())")


async def hold(connections: int, parallel: int = 64, ssl_read_buffer: int | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tls_ca, cert, key = _tls_ca(d)
        t = time.monotonic()
        devices = make_fleet(d, connections + 1)
        fleet_s = time.monotonic() - t
        launch = ["-m", "relay.cli"] if ssl_read_buffer is None else ["-c", SSL_BUFFER_LAUNCHER, str(ssl_read_buffer)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *launch, "--config", str(relay_config(d, connections + 100)), "--port", "0",
            "--audience", AUDIENCE, "--cert", str(cert), "--key", str(key), "--ca", str(d / "ca.pem"),
            "--log-level", "warning", stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
        socks: list[ClientConnection] = []
        failed = 0
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
            port = int(line.rsplit(":", 1)[1])
            url = f"wss://localhost:{port}/"
            ctx = ssl.create_default_context(cafile=str(tls_ca))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            socks.append(await open_authenticated(url, ctx, devices[-1]))  # warm the relay's code paths
            await asyncio.sleep(0.5)
            base = rss_kib(proc.pid)
            sem = asyncio.Semaphore(parallel)

            async def one(dev: Device) -> None:
                nonlocal failed
                async with sem:
                    try:
                        socks.append(await open_authenticated(url, ctx, dev))
                    except Exception:
                        failed += 1

            t = time.monotonic()
            await asyncio.gather(*(one(dev) for dev in devices[:connections]))
            connect_s = time.monotonic() - t
            await asyncio.sleep(2.0)
            held = sum(1 for ws in socks[1:] if ws.state.name == "OPEN")
            loaded = rss_kib(proc.pid)
            per_conn = (loaded - base) * 1024 / held if held else None
            return {"connections_target": connections, "ssl_read_buffer": ssl_read_buffer or 256 * 1024,
                    "held": held, "failed": failed,
                    "relay_rss_idle_kib": base, "relay_rss_loaded_kib": loaded,
                    "bytes_per_connection": round(per_conn) if per_conn is not None else None,
                    "connect_s": round(connect_s, 2), "connects_per_s": round(held / connect_s) if held else 0,
                    "fleet_setup_s": round(fleet_s, 2)}
        finally:
            await asyncio.gather(*(ws.close() for ws in socks), return_exceptions=True)
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--connections", type=int, default=5000)
    p.add_argument("--ssl-read-buffer", type=int, help="experiment: asyncio SSLProtocol.max_size in the relay")
    args = p.parse_args(argv)
    result = asyncio.run(hold(args.connections, ssl_read_buffer=args.ssl_read_buffer))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
