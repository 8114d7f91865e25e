"""The round trip's floor on this machine: what the parts a message must cross cost alone, with no gateway work.

A request and its reply each go agent -> Mosquitto -> gateway -> relay -> gateway -> Mosquitto -> agent, and each
direction commits twice with fsync (the sender's outbox before the broker's PUBACK, the receiver's inbox before its
ACK), so one round trip is at least:

- four passes through a Mosquitto broker: measured as two request/reply exchanges between two paho clients
  through one broker (the same clients and broker settings as the throughput runs; QoS 1, where our gateways
  publish QoS 2, so this is lower than what they pay);
- four fsync'd store commits: measured as our store's outbox commit of one 256 B record
  (`Store.transaction(durable=True)`, WAL with synchronous=FULL), on the file system of the temp dir;
- one relay round trip (two relay hops): `bench/relay_micro.py`'s ping-pong through the relay over TLS, which the
  report takes from the relay section of the same run.

`make bench` puts the sum beside the round-trip target: a target under the floor cannot be met without removing
a part (a broker, a durable commit) from the path.

    python -m bench.rtt_floor [--exchanges 1000] [--commits 500]   (prints RESULT <json>)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.paths import COMMON, _run_as_self
from bench.store_micro import _SoftKey
from gateway.store import Store
from gateway.testbed import MOSQUITTO, free_port, wait_port

RECORD = 256


def quantiles(samples_ms: list[float]) -> dict[str, float]:
    """p50 / p99 / mean of a list of milliseconds."""
    s = sorted(samples_ms)
    return {"p50_ms": round(s[len(s) // 2], 3), "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))], 3),
            "mean_ms": round(statistics.mean(s), 3), "n": len(s)}


def commit_latency(directory: Path, commits: int) -> dict[str, float]:
    """Our store's durable commit of one outbox record (the per-direction commit a lone message waits for)."""
    lat: list[float] = []
    with Store.open(directory / "floor.db", _SoftKey()) as store:  # type: ignore[arg-type]
        for i in range(commits + 20):
            item = [(os.urandom(16), "floor-peer", os.urandom(RECORD), 10**13)]
            t = time.perf_counter()
            with store.transaction(durable=True):
                store.outbox.put_many(item)
            if i >= 20:  # (the first commits grow the WAL file)
                lat.append((time.perf_counter() - t) * 1e3)
    return quantiles(lat)


def broker_exchange(directory: Path, exchanges: int) -> dict[str, Any]:
    """Request/reply between two paho clients through one Mosquitto: two broker passes per exchange."""
    port = free_port()
    conf = directory / "floor-broker.conf"
    conf.write_text(COMMON.format(log=directory / "floor-broker.log") + f"listener {port} 127.0.0.1\n"
                    + _run_as_self())
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        spec = {"ping": {"port": port, "pub_topic": "floor/ping", "sub_topic": "floor/pong"},
                "echo": {"port": port, "pub_topic": "floor/pong", "sub_topic": "floor/ping"},
                "n": exchanges, "warmup": 50, "limit_s": 120, "settle_s": 0.2}
        out = subprocess.run([sys.executable, "-m", "bench.mqtt_load", "rtt", json.dumps(spec)],
                             capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"bench.mqtt_load rtt failed ({out.returncode}): {(out.stdout + out.stderr)[-800:]}")
        return json.loads(lines[-1][7:])  # type: ignore[no-any-return]
    finally:
        proc.terminate()
        proc.wait(10)


def floor_ms(parts: dict[str, Any], relay_rtt_ms: float | None) -> float | None:
    """The round trip's floor (p50): 2 broker exchanges + 4 durable commits + 1 relay round trip."""
    if relay_rtt_ms is None or "p50_ms" not in parts.get("broker_exchange", {}) or "p50_ms" not in parts.get(
            "durable_commit", {}):
        return None
    return round(2 * parts["broker_exchange"]["p50_ms"] + 4 * parts["durable_commit"]["p50_ms"] + relay_rtt_ms, 3)


def measure(exchanges: int, commits: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="agw-floor-") as tmp:
        d = Path(tmp)
        return {"durable_commit": commit_latency(d, commits), "broker_exchange": broker_exchange(d, exchanges)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--exchanges", type=int, default=1000, help="request/reply exchanges through one broker")
    ap.add_argument("--commits", type=int, default=500, help="durable store commits")
    a = ap.parse_args(argv)
    print("RESULT " + json.dumps(measure(a.exchanges, a.commits)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
