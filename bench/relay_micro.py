"""Routed envelopes per second through one `agw-relay` process with two local gateways (RelayLink clients).

Runs, in one go and side by side:
  batched     RelayLink: everything queued goes out in as few ENVELOPES frames as fit (our design)
  unbatched   the same relay and link protocol, one envelope per frame (what a naive client would do)
  rtt         ping-pong round trips gateway A -> relay -> B -> relay -> A (TCP_NODELAY on every hop)
and prints the ratios. The relay is a real subprocess (`python -m relay.cli`) on loopback with TLS 1.3 and real
fleet certificates made in a temporary directory.

    .venv/bin/python bench/relay_micro.py [--count 100000] [--size 256] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.asyncio.client import connect

from gateway.link import RelayLink, RelayLinkConfig
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.link import ClientLink, Delivered, LinkState, NotDelivered
from tests.relay.conftest import AUDIENCE, Device, _make_tls, make_fleet


def envelopes(sender: str, recipient: str, count: int, size: int) -> list[Envelope]:
    payload = os.urandom(size)
    return [Envelope(EnvelopeKind.PAIRWISE, os.urandom(16), sender, recipient, payload) for _ in range(count)]


class Tally:
    """Envelopes accounted for: delivered to B, or refused back to A (UNDELIVERABLE)."""

    def __init__(self, count: int) -> None:
        self.count, self.delivered, self.refused = count, 0, 0
        self.done = asyncio.Event()

    def add(self, delivered: int = 0, refused: int = 0) -> None:
        self.delivered += delivered
        self.refused += refused
        if self.delivered + self.refused >= self.count:
            self.done.set()


async def tally_events(link: RelayLink, tally: Tally) -> None:
    async for ev in link.events():
        if isinstance(ev, Delivered):
            tally.add(delivered=len(ev.envelopes))
        elif isinstance(ev, NotDelivered):
            tally.add(refused=len(ev.envelope_ids))


async def measure(tally: Tally, *links: RelayLink) -> float:
    tasks = [asyncio.create_task(tally_events(link, tally)) for link in links]
    try:
        await asyncio.wait_for(tally.done.wait(), 120)
    finally:
        for t in tasks:
            t.cancel()
    if tally.refused:
        print(f"  note: {tally.refused} of {tally.count} envelopes refused by the relay", file=sys.stderr)
    return time.perf_counter()


async def batched(cfg: RelayLinkConfig, a: Device, b: Device, count: int, size: int) -> float:
    async with RelayLink(cfg, a.token_provider) as la, RelayLink(cfg, b.token_provider) as lb:
        await la.wait_ready(10)
        await lb.wait_ready(10)
        batch = envelopes(a.device_id, b.device_id, count, size)
        tally = Tally(count)
        rx = asyncio.create_task(measure(tally, la, lb))
        t0 = time.perf_counter()
        await la.send(batch)
        t1 = await rx
    return tally.delivered / (t1 - t0)


async def raw_client(url: str, ca: Path, dev: Device):  # type: ignore[no-untyped-def]
    ws = await connect(url, ssl=ssl.create_default_context(cafile=str(ca)), compression=None, proxy=None)
    link = ClientLink()
    while link.state is not LinkState.READY:
        msg = await ws.recv()
        link.receive_data(msg)  # type: ignore[arg-type]
        for ev in link.events_received():
            if hasattr(ev, "nonce"):
                link.authenticate(dev.token_provider(ev.nonce, ev.audience))
        for out in link.data_to_send():
            await ws.send(out)
    return ws, link


async def unbatched(cfg: RelayLinkConfig, ca: Path, a: Device, b: Device, count: int, size: int) -> float:
    ws, link = await raw_client(cfg.url, ca, a)
    async with RelayLink(cfg, b.token_provider) as lb:
        await lb.wait_ready(10)
        batch = envelopes(a.device_id, b.device_id, count, size)
        tally = Tally(count)
        rx = asyncio.create_task(measure(tally, lb))
        t0 = time.perf_counter()
        for env in batch:
            link.send_envelopes([env])
            for out in link.data_to_send():
                await ws.send(out)
        t1 = await rx
    await ws.close()
    return tally.delivered / (t1 - t0)


async def rtt(cfg: RelayLinkConfig, a: Device, b: Device, rounds: int, size: int) -> list[float]:
    async with RelayLink(cfg, a.token_provider) as la, RelayLink(cfg, b.token_provider) as lb:
        await la.wait_ready(10)
        await lb.wait_ready(10)

        async def echo() -> None:
            async for ev in lb.events():
                if isinstance(ev, Delivered):
                    await lb.send(envelopes(b.device_id, a.device_id, len(ev.envelopes), size))

        echo_task = asyncio.create_task(echo())
        samples = []
        events = la.events()
        for _ in range(rounds):
            t0 = time.perf_counter()
            await la.send(envelopes(a.device_id, b.device_id, 1, size))
            while not isinstance(await anext(events), Delivered):
                pass
            samples.append((time.perf_counter() - t0) * 1000)
        echo_task.cancel()
    return samples


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat), to show whether the relay was the bound."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=100000, help="envelopes in the batched run (~1.5 s: a sustained rate; "
                   "a run of 20,000 lasts ~0.3 s and reads 20-25%% lower, mostly its start)")
    p.add_argument("--size", type=int, default=256, help="ciphertext bytes per envelope")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tls = _make_tls(d)
        fleet = make_fleet()
        (d / "ca.pem").write_bytes(fleet.ca_pem)
        # Rate limits and queues sized for a benchmark, not for a fleet: we measure the routing path.
        (d / "relay.toml").write_text(
            "[relay]\nrate_envelopes = 1e9\nburst_envelopes = 1e9\nrate_bytes = 1e12\nburst_bytes = 1e12\n"
            "send_queue_envelopes = 1000000\nsend_queue_bytes = 1000000000\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay.cli", "--port", "0", "--audience", AUDIENCE, "--cert", str(tls.cert_file),
            "--key", str(tls.key_file), "--ca", str(d / "ca.pem"), "--log-level", "warning",
            "--config", str(d / "relay.toml"),
            stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[1],
        )
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
            port = int(line.rsplit(":", 1)[1])
            cfg = RelayLinkConfig(url=f"wss://localhost:{port}/", ca_file=tls.ca_file)
            a, b = fleet.device("bench-a"), fleet.device("bench-b")
            cpu_before = _cpu_seconds(proc.pid)
            fast = await batched(cfg, a, b, args.count, args.size)
            relay_cpu = _cpu_seconds(proc.pid) - cpu_before  # (link set-up included: a little over the burst's)
            slow = await unbatched(cfg, tls.ca_file, a, b, min(args.count, 5000), args.size)
            samples = await rtt(cfg, a, b, args.rounds, args.size)
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    result = {
        "envelope_bytes": args.size,
        "batched_envelopes_per_s": round(fast),
        "unbatched_envelopes_per_s": round(slow),
        "batched_over_unbatched": round(fast / slow, 2),
        "relay_cpu_s_batched": round(relay_cpu, 2),
        "envelopes_per_relay_cpu_s": round(args.count / relay_cpu) if relay_cpu else None,
        "rtt_ms_median": round(statistics.median(samples), 3),
        "rtt_ms_p99": round(sorted(samples)[int(len(samples) * 0.99) - 1], 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"relay micro-benchmark, {args.size}-byte envelopes, relay in its own process, TLS 1.3, loopback")
        print(f"  batched (RelayLink):     {result['batched_envelopes_per_s']:>9} envelopes/s")
        print(f"  relay CPU (batched run): {result['relay_cpu_s_batched']:>9} s, "
              f"{result['envelopes_per_relay_cpu_s']} envelopes per CPU-second")
        print(f"  unbatched (1 per frame): {result['unbatched_envelopes_per_s']:>9} envelopes/s")
        print(f"  ratio batched/unbatched: {result['batched_over_unbatched']:>9}x")
        print(f"  round trip A->B->A:      {result['rtt_ms_median']:>9} ms median, {result['rtt_ms_p99']} ms p99")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
