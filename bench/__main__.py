"""`make bench`: measure our pipeline side by side with a Mosquitto TLS bridge and AGNTCY SLIM in one run, then
relay capacity, gateway footprint and MLS timings; write bench/results/latest.md and latest.json.

    python -m bench            the full run (issue 7 sizes: 20,000 messages, 1,000 round trips, 5,000 connections)
    python -m bench --quick    a small configuration (smoke test): 200 messages, 256 B only, no SLIM, no profile
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import footprint, profiling, report, rtt_floor, slim_peer
from bench.paths import DEV_A, DEV_B, BridgePath, OurPath, rss_kib

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _child(args: list[str], timeout: float) -> dict[str, Any]:
    """Run a bench child process and return its `RESULT <json>` line."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                         cwd=HERE.parent)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({out.returncode}): {(out.stdout + out.stderr)[-1500:]}")
    return json.loads(lines[-1][7:])  # type: ignore[no-any-return]


SETTLE_S = 1.0  # pause between the warm-up and the measured burst (0.2 s in a quick run)


def load(mode: str, spec: dict[str, Any], limit: float) -> dict[str, Any]:
    spec = {**spec, "limit_s": limit, "settle_s": SETTLE_S}
    return _child(["-m", "bench.mqtt_load", mode, json.dumps(spec)], timeout=limit + 120)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _section(errors: dict[str, str], name: str, fn: Callable[[], Any]) -> Any:
    """Run one part; a failure is recorded in the report (with the reason) instead of ending the run."""
    try:
        return fn()
    except Exception as exc:
        errors[name] = f"{type(exc).__name__}: {str(exc)[-800:]}"
        log(f"{name} failed: {errors[name]}")
        if os.environ.get("AGW_BENCH_DEBUG"):
            traceback.print_exc()
        return None


def run(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    errors: dict[str, str] = {}
    r: dict[str, Any] = {"meta": {"mode": "quick" if a.quick else "full",
                                  "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                                             f"{platform.python_version()}, {_mosquitto_version()}",
                                  "cores": os.cpu_count(),
                                  "config": {k: v for k, v in vars(a).items()},
                                  "load_average_start": os.getloadavg()},
                         "throughput": {"ours": [], "bridge": []}, "rtt": {}, "relay": {}, "gateway": {},
                         "errors": errors}
    sizes = [(256, a.messages), (1024, a.messages), (16384, a.messages_16k)] if not a.quick else [(256, a.messages)]

    # 1-2, 5. The Mosquitto TLS bridge and ours, both up at once: the 256 B run (the target's ratio) is measured in
    # `a.rounds` interleaved rounds (bridge then ours, then ours then bridge, ...), so that the machine's drift
    # during the bench weighs on both sides alike; each ratio is taken within a round and the median is reported.
    bridge, ours = BridgePath(work / "bridge"), OurPath(work / "ours")
    try:
        log("bridge: starting two Mosquitto brokers with a TLS 1.3 bridge")
        bridge.start()
        log("ours: fleet CA, relay, two Mosquitto brokers, two SoftHSM tokens, two gateways")
        ours.start()
        pids = {name: gw.proc.pid for name, gw in ours.bed.gateways.items() if gw.proc}  # type: ignore[union-attr]
        time.sleep(1.0)
        idle = {name: rss_kib(pid) for name, pid in pids.items()}
        peaks: dict[str, int] = {name: 0 for name in pids}

        def bridge_tput(size: int, n: int) -> dict[str, Any] | None:
            spec = {**bridge.tput_spec(), "n": n, "size": size}
            with footprint.CpuMeter(bridge.pids()) as cpu:
                row = _section(errors, f"bridge tput {size}", functools.partial(load, "tput", spec, a.limit))
            if row:
                row["cpu_s"] = cpu.used
                log(f"bridge {size} B: {row['msg_s']:,} msg/s, lost {row['lost']}")
            return row

        def ours_tput(size: int, n: int) -> dict[str, Any] | None:
            nonlocal peaks
            spec = {**ours.tput_spec(), "n": n, "size": size}
            before = ours.counters()
            with footprint.RssSampler(pids) as sampler, footprint.CpuMeter(ours.pids()) as cpu:
                row = _section(errors, f"ours tput {size}", functools.partial(load, "tput", spec, a.limit))
            if row:
                row["cpu_s"] = cpu.used
                after = ours.counters()
                # What the pipeline did to carry the run: retransmissions show up as duplicates at the receiver.
                row["gateway_counters"] = {g: {k: after[g][k] - before[g].get(k, 0) for k in after[g]}
                                           for g in after}
                row["gateway_rss_peak_kib"] = dict(sampler.peak)
                log(f"ours {size} B: {row['msg_s']:,} msg/s, lost {row['lost']}, receiver saw "
                    f"{row['gateway_counters'][DEV_B].get('duplicates', 0)} duplicates")
            peaks = {k: max(v, sampler.peak[k]) for k, v in peaks.items()}
            return row

        size, n = sizes[0]
        rounds: list[dict[str, Any]] = []
        for i in range(a.rounds):
            got: dict[str, dict[str, Any] | None] = {}
            for side in (("bridge", "ours") if i % 2 == 0 else ("ours", "bridge")):
                got[side] = bridge_tput(size, n) if side == "bridge" else ours_tput(size, n)
            rounds.append({"bridge": got["bridge"], "ours": got["ours"]})
        r["throughput"]["rounds_256"] = rounds_summary(rounds)
        for side in ("bridge", "ours"):
            rows = [x[side] for x in rounds if x[side]]
            if rows:
                row = median_row(rows)
                if side == "ours":  # the peak of any round is the one that counts
                    row = {**row, "gateway_rss_peak_kib": {
                        g: max(x["gateway_rss_peak_kib"][g] for x in rows) for g in row["gateway_rss_peak_kib"]}}
                r["throughput"][side].append(row)
        for size, n in sizes[1:]:
            row = bridge_tput(size, n)
            if row:
                r["throughput"]["bridge"].append(row)
        rt = _section(errors, "bridge rtt", lambda: load("rtt", {**bridge.rtt_spec(), "n": a.rtt,
                                                                 "warmup": a.rtt_warmup}, a.limit))
        if rt:
            r["rtt"]["bridge"] = rt
            log(f"bridge rtt: p50 {rt.get('p50_ms')} ms p99 {rt.get('p99_ms')} ms")
        bridge.close()
        for size, n in sizes[1:]:
            row = ours_tput(size, n)
            if row:
                r["throughput"]["ours"].append(row)
        with footprint.RssSampler(pids) as sampler:
            rt = _section(errors, "ours rtt", lambda: load("rtt", {**ours.rtt_spec(), "n": a.rtt,
                                                                   "warmup": a.rtt_warmup}, a.limit))
        peaks = {k: max(v, sampler.peak[k]) for k, v in peaks.items()}
        if rt:
            r["rtt"]["ours"] = rt
            log(f"ours rtt: p50 {rt.get('p50_ms')} ms p99 {rt.get('p99_ms')} ms")
        first = r["throughput"]["ours"][0]["gateway_rss_peak_kib"] if r["throughput"]["ours"] else peaks
        # "Under load" (the issue 7 target) is the peak VmRSS of either gateway during the 256 B throughput runs
        # (every round); the other sizes and the round trips are reported beside it.
        r["gateway"] = {"rss_idle_kib": idle, "rss_peak_kib": peaks,
                        "rss_idle_mb": round(max(idle.values()) / 1024, 1),
                        "rss_load_256_mb": round(max(first.values()) / 1024, 1),
                        "rss_load_by_size_mb": {row["size"]: round(max(row["gateway_rss_peak_kib"].values()) / 1024, 1)
                                                for row in r["throughput"]["ours"]},
                        "rss_load_mb": round(max(peaks.values()) / 1024, 1)}
        cs = _section(errors, "cold start", lambda: footprint.cold_start(ours.gateway(DEV_A), runs=a.cold_runs))
        if cs:
            r["gateway"]["cold_start"] = cs
            log(f"cold start: {cs['cold_start_s']} s")
    finally:
        bridge.close()
        ours.close()

    # 3. SLIM.
    if a.slim:
        log("SLIM: venv bench/.slim-venv and a local node")
        r["slim"] = _section(errors, "slim", lambda: slim_peer.measure(a.messages, a.rtt, [256, 1024])) or {
            "status": f"not available: {errors.get('slim')}"}
        log(f"SLIM: {r['slim'].get('status')}")
    else:
        r["slim"] = {"status": "not measured (--no-slim or --quick)"}

    # 4. Relay capacity.
    log("relay: routed envelopes/s (bench/relay_micro.py)")
    micro = _section(errors, "relay micro", lambda: _relay_micro(a))
    if micro:
        r["relay"]["micro"] = micro
    # 2b. The round trip's floor: the parts it crosses, alone (bench/rtt_floor.py), beside the round-trip target.
    log("round trip floor: one broker's request/reply and one durable store commit, alone")
    floor = _section(errors, "rtt floor", lambda: _child(
        ["-m", "bench.rtt_floor", "--exchanges", str(a.rtt), "--commits", str(max(100, a.rtt // 2))], 600))
    if floor:
        r["rtt_floor"] = {**floor, "floor_p50_ms": rtt_floor.floor_ms(floor, micro.get("rtt_ms_median") if micro
                                                                      else None)}
        log(f"round trip floor p50: {r['rtt_floor']['floor_p50_ms']} ms")
    log(f"relay: {a.connections} authenticated connections")
    conns = _section(errors, "relay connections", lambda: _child(
        ["-m", "bench.relay_capacity", "--connections", str(a.connections)], timeout=1200))
    if conns:
        r["relay"]["connections"] = conns

    # 6b. Group fan-out (the groups issue): 50 agents on 5 gateways, a burst of 2,000 messages.
    if a.groups:
        log(f"groups: {a.group_gateways} gateways x {a.group_agents} agents, burst of {a.group_messages}")
        r["groups"] = _section(errors, "groups", lambda: _child(
            ["-m", "bench.group_fanout", "--gateways", str(a.group_gateways), "--agents", str(a.group_agents),
             "--messages", str(a.group_messages)], 900)) or {"status": f"not measured: {errors.get('groups')}"}
    else:
        r["groups"] = {"status": "not measured (--no-groups or --quick)"}

    # 6. MLS.
    log(f"MLS: group of {a.mls_members}")
    r["mls"] = _section(errors, "mls", lambda: _child(["-m", "bench.mls_timing", str(a.mls_members)], 600)) or {
        "status": f"failed: {errors.get('mls')}"}

    if a.experiments:
        r["experiments"] = _experiments(a, work, errors)

    # Profile: a separate run with both gateways under cProfile (it slows them; figures above are unprofiled).
    if a.profile:
        log("profile: gateways under cProfile")
        r["profile"] = _section(errors, "profile", lambda: _profile(a, work / "profiled"))

    r["meta"]["load_average_end"] = os.getloadavg()
    r["targets"] = [c.as_dict() for c in report.checks(r)]
    return r


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (the lower of the two middle ones for an even count)."""
    ranked = sorted(rows, key=lambda x: x["msg_s"])
    return ranked[(len(ranked) - 1) // 2]


def rounds_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each interleaved round's rates and ratio, and the median ratio (the target's figure)."""
    rows = [{"bridge_msg_s": x["bridge"]["msg_s"], "ours_msg_s": x["ours"]["msg_s"],
             "ratio": round(x["ours"]["msg_s"] / x["bridge"]["msg_s"], 4)}
            for x in rounds if x["bridge"] and x["ours"] and x["bridge"].get("msg_s")]
    ratios = sorted(x["ratio"] for x in rows)
    median = None
    if ratios:
        mid = len(ratios) // 2
        median = ratios[mid] if len(ratios) % 2 else round((ratios[mid - 1] + ratios[mid]) / 2, 4)
    return {"rounds": rows, "median_ratio": median}


def _experiments(a: argparse.Namespace, work: Path, errors: dict[str, str]) -> dict[str, Any]:
    """What-if runs for the owners, with unchanged code: configuration or runtime settings only."""
    out: dict[str, Any] = {}
    log("experiment: ours with store.durability = crash (no fsync before the broker is acknowledged)")
    ours = OurPath(work / "ours-crash", durability="crash")
    try:
        ours.start()
        out["durability_crash"] = {
            "tput_256": _section(errors, "experiment crash tput", functools.partial(
                load, "tput", {**ours.tput_spec(), "n": a.messages, "size": 256}, a.limit)),
            "rtt": _section(errors, "experiment crash rtt", functools.partial(
                load, "rtt", {**ours.rtt_spec(), "n": a.rtt, "warmup": a.rtt_warmup}, a.limit))}
    finally:
        ours.close()
    log("experiment: relay connections with asyncio's SSL read buffer at 17 KiB instead of 256 KiB")
    out["relay_ssl_buffer_17k"] = _section(errors, "experiment ssl buffer", lambda: _child(
        ["-m", "bench.relay_capacity", "--connections", str(a.connections), "--ssl-read-buffer", "17408"], 1200))
    return out


def _relay_micro(a: argparse.Namespace) -> dict[str, Any]:
    count, rounds = (1000, 20) if a.quick else (100000, 300)  # (100,000: ~1.5 s, a sustained rate)
    out = subprocess.run([sys.executable, str(HERE / "relay_micro.py"), "--count", str(count), "--rounds",
                          str(rounds), "--json"], capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    if out.returncode != 0:
        raise RuntimeError(f"relay_micro failed: {(out.stdout + out.stderr)[-1000:]}")
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    res["count"] = count
    return res


def _profile(a: argparse.Namespace, root: Path) -> dict[str, Any]:
    prof_dir = RESULTS / "profile"
    ours = OurPath(root, profile_dir=prof_dir)
    n = min(a.messages, 5000)
    try:
        ours.start()
        row = load("tput", {**ours.tput_spec(), "n": n, "size": 256}, a.limit)
    finally:
        ours.close()
    out: dict[str, Any] = {"run": row, "gateways": {}}
    for name, role in ((DEV_A, "sender"), (DEV_B, "receiver")):
        path = prof_dir / f"gateway-{name}.prof"
        if path.exists():
            out["gateways"][f"{name} ({role})"] = profiling.summarise(path, top=20)
    return out


def _mosquitto_version() -> str:
    try:
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "mosquitto ?"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small configuration for the smoke test")
    p.add_argument("--messages", type=int, help="messages per throughput run at 256 B and 1 KiB (default 20000)")
    p.add_argument("--messages-16k", type=int, default=5000, help="messages for the 16 KiB run")
    p.add_argument("--rounds", type=int, help="interleaved rounds of the 256 B run, ours and the bridge (default 3)")
    p.add_argument("--rtt", type=int, help="request/reply exchanges (default 1000)")
    p.add_argument("--connections", type=int, help="concurrent relay connections to hold (default 5000)")
    p.add_argument("--mls-members", type=int, help="MLS group size (default 1000)")
    p.add_argument("--no-slim", dest="slim", action="store_false", default=None)
    p.add_argument("--no-profile", dest="profile", action="store_false", default=None)
    p.add_argument("--no-groups", dest="groups", action="store_false", default=None)
    p.add_argument("--group-gateways", type=int, default=5)
    p.add_argument("--group-agents", type=int, default=10, help="agents per gateway in the group run")
    p.add_argument("--group-messages", type=int, default=2000)
    p.add_argument("--no-experiments", dest="experiments", action="store_false", default=None,
                   help="skip the what-if runs (store durability crash, relay SSL read buffer)")
    p.add_argument("--limit", type=float, default=600.0, help="wall-clock bound per measurement (s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for latest.md / latest.json")
    a = p.parse_args(argv)
    quick = a.quick
    defaults = {"messages": 200 if quick else 20000, "rtt": 50 if quick else 1000, "rounds": 1 if quick else 3,
                "connections": 20 if quick else 5000, "mls_members": 20 if quick else 1000,
                "slim": not quick, "profile": not quick, "experiments": not quick, "groups": not quick}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.rtt_warmup = 5 if quick else 50
    a.cold_runs = 1 if quick else 3
    if quick:
        a.limit = min(a.limit, 60.0)
        global SETTLE_S
        SETTLE_S = 0.2
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    with tempfile.TemporaryDirectory(prefix="agw-bench-") as tmp:
        r = run(a, Path(tmp))
    r["meta"]["config"]["out"] = str(a.out)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "latest.json").write_text(json.dumps(r, indent=1, default=str))
    md = report.markdown(r)
    (a.out / "latest.md").write_text(md)
    print(md)
    log(f"wrote {a.out / 'latest.md'} and {a.out / 'latest.json'}")
    core = [k for k in r["errors"] if k.startswith(("ours", "bridge"))]
    return 1 if core else 0


if __name__ == "__main__":
    raise SystemExit(main())
