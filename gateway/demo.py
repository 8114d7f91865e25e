"""`make demo`: the whole product on loopback, in under a minute, then cleaned up.

A fleet CA; a relay (TLS 1.3) that records what it routes; two Mosquitto brokers with per-agent ACLs; two
gateways, each with its own SoftHSM token (dev-a: Ed25519 identity, dev-b: ECDSA P-256); agents on each side.
It shows the keys' hardware attributes, a consent request being approved, a request/reply exchange, and what
the relay saw: sizes and routing ids, never plaintext.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gateway.client import AgentClient
from gateway.testbed import Testbed

PW = "agent-secret"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def agents(tb: Testbed) -> None:
    a, b = tb.gateways["dev-a"], tb.gateways["dev-b"]
    async with AgentClient("planner", port=a.broker.port, password=PW) as planner, \
            AgentClient("sensor", port=b.broker.port, password=PW) as sensor:
        step("dev-a/planner writes to dev-b/sensor for the first time: the message is held for consent")
        await planner.send("dev-b/sensor", b"hello sensor, may I ask you things?")
        pending: list[dict[str, object]] = []
        for _ in range(100):
            pending = [e for e in json.loads(b.agw("consent", "list", "--json").stdout) if e["state"] == "pending"]
            if pending:
                break
            await asyncio.sleep(0.1)
        print(f"$ agw consent list   (on dev-b)\n  {pending}")
        step("the operator of dev-b approves: the held message is delivered")
        print("$ agw consent allow --agent sensor --peer dev-a/planner")
        b.agw("consent", "allow", "--agent", "sensor", "--peer", "dev-a/planner")
        first = await sensor.receive(timeout=15)
        print(f"  sensor received from {first.sender}: {first.payload.decode()!r}")

        step("request/reply, end to end encrypted: planner asks, sensor answers")

        async def serve() -> None:
            req = await sensor.receive(timeout=15)
            print(f"  sensor got request {req.payload.decode()!r} (correlation {req.correlation_data.hex()[:8]}…)"
                  if req.correlation_data else "")
            await req.reply(b'{"temperature_c": 21.5}')

        server = asyncio.create_task(serve())
        t0 = time.perf_counter()
        reply = await planner.request("dev-b/sensor", b"temperature?", timeout=15)
        await server
        print(f"  planner got reply {reply.payload.decode()!r} from {reply.sender} "
              f"in {(time.perf_counter() - t0) * 1000:.1f} ms")


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="agw-demo-"))
    started = time.monotonic()
    tb = Testbed(root / "fleet", fleet="demo.example")
    try:
        step(f"fleet CA 'demo.example' created in {tb.ca_dir}")
        tap = root / "relay-tap.jsonl"
        tb.relay_extra = ["--tap", str(tap)]
        tb.start_relay()
        print(f"relay listening on wss://127.0.0.1:{tb.relay_port} (TLS 1.3)")
        step("provisioning two devices: keys generated inside SoftHSM tokens, CSR signed by them, CA signs")
        a = tb.add_gateway("dev-a", agents={"planner": ["dev-b/sensor"]}, algorithm="ed25519")
        b = tb.add_gateway("dev-b", agents={"sensor": []}, algorithm="ecdsa-p256")
        for gw in (a, b):
            keys = json.loads(gw.agw("keys", "show", "--json").stdout)
            ident = keys["identity"]
            print(f"{gw.name}: {ident['algorithm']} identity key, attributes read back from the token: "
                  f"{ident['attributes']}")
            print(f"   certificate: {keys['certificate']['subject']}  "
                  f"(spiffe://demo.example/device/{keys['certificate']['device_id']})")
        step("starting both gateways (agw run)")
        for gw in (a, b):
            gw.start()
        for gw in (a, b):
            st = gw.wait_ready()
            print(f"{gw.name}: link {st['link']['state']}, MQTT connected {st['mqtt']['connected']}")
        asyncio.run(agents(tb))
        time.sleep(1.5)  # status.json is rewritten every second
        step("what the relay saw (it routes ciphertext; it cannot read it)")
        seen = [json.loads(line) for line in tap.read_text().splitlines()] if tap.exists() else []
        for e in seen:
            print(f"  {e['kind']:<9} {e['sender']} -> {e['recipient']}  id {e['id'][:12]}…  {e['bytes']} bytes")
        marker_found = any(b"temperature" in bytes.fromhex(e.get("ciphertext_hex", "")) for e in seen)
        print(f"  {len(seen)} envelopes; plaintext 'temperature' present in any of them: {marker_found}")
        step("status and audit")
        for gw in (a, b):
            st = gw.status()
            print(f"{gw.name}: {st['counters']}  outbox {st['queue']['outbox_depth']}")
        print(b.agw("audit", "verify").stdout.strip())
        print(f"\ndemo finished in {time.monotonic() - started:.1f} s")
        return 0 if seen and not marker_found else 1
    finally:
        tb.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
