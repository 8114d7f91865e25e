"""Does the round trip depend on what the gateways carried before? (issue 7: the full bench measures its round trip
on gateways that have just carried the throughput runs.)

    python -m bench.rtt_state [--rtt 500] [--phases fresh,burst,after,restart,after] [--burst 256:20000,...]
                              [--trace] [--out DIR]

One set of processes (relay, two brokers, two gateways: `bench.paths.OurPath`), then the phases in order:
    fresh / after (any name but the ones below)  a round trip of `--rtt` exchanges (`bench.mqtt_load rtt`)
    burst     the throughput runs of `--burst` (default: the full bench's, 3 x 20,000 x 256 B, 20,000 x 1 KiB,
              5,000 x 16 KiB), one after the other
    restart   stop and start both gateways (same stores, brokers and relay)
    idle      ten seconds of nothing
With `--trace` the gateways write their stage marks and each round-trip phase is analysed as `bench.stages` does.
Prints one line per phase and the store files' sizes after each; the JSON goes to DIR/rtt_state.json.
Found on 2026-12-07 (docs/performance.md, `rtt8`): no effect of the full bench's burst beyond the run-to-run spread.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import stages
from bench.__main__ import load
from bench.paths import DEV_A, DEV_B, OurPath, rss_kib

BENCH_BURST = "256:20000,256:20000,256:20000,1024:20000,16384:5000"


def _files(ours: OurPath) -> dict[str, int]:
    assert ours.bed is not None
    return {f"{name}:{p.name}": p.stat().st_size for name, gw in ours.bed.gateways.items()
            for p in sorted(gw.root.rglob("*.db*"))}


def _rss(ours: OurPath) -> dict[str, int]:
    assert ours.bed is not None
    return {name: rss_kib(gw.proc.pid) for name, gw in ours.bed.gateways.items() if gw.proc is not None}


def _round_trip(ours: OurPath, n: int, trace: Path | None, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {**ours.rtt_spec(), "n": n, "warmup": 50}
    d = None
    if trace is not None:
        d = trace.parent / f"phase-{name}-{time.monotonic_ns()}"
        d.mkdir()
        spec["trace"] = str(d)
    row: dict[str, Any] = {"rtt": load("rtt", spec, 300), "load_average": os.getloadavg()[0]}
    if trace is not None and d is not None:
        for dev in (DEV_A, DEV_B):  # the gateways' traces hold every phase; the pinger's windows pick this one's
            (d / f"{dev}.trace").symlink_to(trace / f"{dev}.trace")
        row["segments"] = stages.analyse(d)["segments"]
    return row


def run(a: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    trace = root / "trace" if a.trace else None
    ours = OurPath(root / "ours", stage_dir=trace)
    out: list[dict[str, Any]] = []
    try:
        ours.start()
        time.sleep(1.0)
        print(f"started; gateway RSS {_rss(ours)} KiB", flush=True)
        for phase in a.phases.split(","):
            t0 = time.monotonic()
            row: dict[str, Any] = {"phase": phase}
            if phase == "burst":
                row["runs"] = []
                for item in a.burst.split(","):
                    size, n = (int(x) for x in item.split(":"))
                    got = load("tput", {**ours.tput_spec(), "n": n, "size": size}, 600)
                    row["runs"].append(got)
                    print(f"  burst {size} B x {n}: {got['msg_s']:,} msg/s, lost {got['lost']}", flush=True)
            elif phase == "restart":
                assert ours.bed is not None
                for gw in ours.bed.gateways.values():
                    gw.stop()
                for gw in ours.bed.gateways.values():
                    gw.start()
                for gw in ours.bed.gateways.values():
                    gw.wait_ready(60)
                time.sleep(1.0)
            elif phase == "idle":
                time.sleep(10.0)
            else:
                row.update(_round_trip(ours, a.rtt, trace, phase))
                rt = row["rtt"]
                print(f"{phase}: p50 {rt.get('p50_ms')} p90 {rt.get('p90_ms')} p99 {rt.get('p99_ms')} ms, "
                      f"lost {rt.get('lost')}, load {row['load_average']:.2f}", flush=True)
                for s in row.get("segments", []):
                    print(f"    {s['segment']:<40} p50 {s['p50_ms']:7.3f}  p90 {s['p90_ms']:7.3f} ms", flush=True)
            row.update(files=_files(ours), rss_kib=_rss(ours), seconds=round(time.monotonic() - t0, 1))
            print(f"  after {phase}: files {row['files']}, gateway RSS {row['rss_kib']} KiB", flush=True)
            out.append(row)
    finally:
        ours.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rtt_state", description=__doc__.split("\n")[0] if __doc__
                                else None)
    p.add_argument("--rtt", type=int, default=500, help="exchanges per round-trip phase")
    p.add_argument("--phases", default="fresh,burst,after,restart,after-restart")
    p.add_argument("--burst", default=BENCH_BURST, help="size:count,... throughput runs of the burst phase")
    p.add_argument("--trace", action="store_true", help="stage marks, analysed per round-trip phase")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agw-rtt-state-") as tmp:
        rows = run(a, Path(tmp))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "rtt_state.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
