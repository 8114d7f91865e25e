"""Per-gateway CPU per message of our path alone (relay, two brokers, two SoftHSM tokens, two gateways; no
bridge, no SLIM): repeated 256 B throughput runs on one set-up, CPU of each gateway read from /proc. Shorter and
steadier than `python -m bench` for A/B comparisons of a gateway change: run it against two checkouts in turn,
inside the bench lock (run as a file, `PYTHONPATH` picks the checkout whose `gateway` and `bench` are measured):

    flock /work/bench.lock python -m bench.gateway_cpu [--messages 20000] [--rounds 2]
    PYTHONPATH=/other/checkout flock /work/bench.lock python bench/gateway_cpu.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import gateway
from bench import footprint
from bench.__main__ import load
from bench.paths import DEV_A, DEV_B, OurPath


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    a = p.parse_args(argv)
    print(f"code: {Path(gateway.__file__).parent}", flush=True)
    with tempfile.TemporaryDirectory(prefix="agw-gateway-cpu-") as d:
        ours = OurPath(Path(d) / "ours")
        try:
            ours.start()
            time.sleep(1.0)
            load("tput", {**ours.tput_spec(), "n": 2000, "size": a.size}, 300)  # warm-up
            pids = ours.pids()
            for _ in range(a.rounds):
                before = os.getloadavg()
                with footprint.CpuMeter(pids) as cpu:
                    row = load("tput", {**ours.tput_spec(), "n": a.messages, "size": a.size}, 600)
                per_msg = {name: round(1e6 * sum(cpu.used[f"gateway {name}"].values()) / a.messages, 1)
                           for name in (DEV_A, DEV_B)}
                print(json.dumps({"msg_s": row.get("msg_s"), "lost": row.get("lost"),
                                  "sender_us_per_msg": per_msg[DEV_A], "receiver_us_per_msg": per_msg[DEV_B],
                                  "load_average": [round(x, 2) for x in (*before, *os.getloadavg())]}), flush=True)
        finally:
            ours.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
