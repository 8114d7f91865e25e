"""`agw-relay` as a real process: starts from flags, routes between two gateways, logs JSON, exits on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from gateway.link import RelayLink, RelayLinkConfig
from gateway.protocol.link import Delivered
from tests.relay.conftest import AUDIENCE, Fleet, TlsFiles, envelope, next_event


async def test_relay_process(tls: TlsFiles, fleet: Fleet, tmp_path: Path) -> None:
    ca = tmp_path / "fleet-ca.pem"
    ca.write_bytes(fleet.ca_pem)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.cli", "--host", "127.0.0.1", "--port", "0", "--audience", AUDIENCE,
        "--cert", str(tls.cert_file), "--key", str(tls.key_file), "--ca", str(ca), "--crl", str(tmp_path / "crl.pem"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert line.startswith("agw-relay listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        a, b = fleet.device("cli-a"), fleet.device("cli-b")
        cfg = RelayLinkConfig(url=f"wss://localhost:{port}/", ca_file=tls.ca_file)
        async with RelayLink(cfg, a.token_provider) as la, RelayLink(cfg, b.token_provider) as lb:
            await la.wait_ready(5)
            await lb.wait_ready(5)
            e = envelope("cli-a", "cli-b", b"via a real process")
            await la.send([e])
            assert (await next_event(lb, Delivered)).envelopes == (e,)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        logs = [json.loads(x) for x in (await proc.stderr.read()).decode().splitlines() if x.strip()]
        events = {entry.get("event") for entry in logs}
        assert {"listening", "auth_ok", "stopped"} <= events
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_relay_refuses_to_start_without_tls(tmp_path: Path, fleet: Fleet) -> None:
    ca = tmp_path / "fleet-ca.pem"
    ca.write_bytes(fleet.ca_pem)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.cli", "--port", "0", "--ca", str(ca),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 2
    assert b"never serves without TLS" in out
