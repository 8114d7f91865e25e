"""Where a request/reply round trip spends its time, stage by stage (issue 7: the round-trip target).

    python -m bench.stages [--rtt 300] [--durability power-loss|crash] [--out DIR]

Runs our path (relay, two gateways, two brokers) with `AGW_STAGE_TRACE` set, so each gateway writes wall-clock
timestamps of each DATA message at its stages (`gateway/stages.py`), and the round-trip load of
`bench.mqtt_load` with its pinger and echoer recording theirs. Exchanges are sequential, so every stage event
falls inside exactly one exchange's [publish, reply] window. Prints, per segment, the median and p90 over the
measured exchanges; the JSON goes to DIR/stages.json.

Segments (A = the pinger's gateway, B = the echoer's; the same stages then run the other way for the reply):
    client publish -> A a.dequeued   Mosquitto A, paho's network thread, hand-off to the event loop, queue wait
    a.dequeued -> a.stored           the outbox commit (fsync with store.durability power-loss)
    a.stored -> a.due                PUBACKs to the broker, sender loop wake-up, expiry, reading the due entries
    a.due -> a.sent                  encrypt + sign, attempt marks and session state in one commit
    a.sent -> B b.frame              link writer, TLS + WebSocket, relay, B's link reader, hand-off to the loop
    b.frame -> b.opened              verify + decrypt (one transaction)
    b.opened -> b.admitted           duplicate and consent checks
    b.admitted -> client receive     inbox commit, MQTT publish to Mosquitto B, delivery to the client
Finer stages, shown when the gateways write them: a.acked (PUBACKs written), a.written (the link writer sent the
frame), b.read (B's link reader got it), b.stored (inbox commit done), b.publish (QoS 2 PUBLISH written),
b.pubrec (Mosquitto's PUBREC read; the PUBREL follows once it is recorded).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.__main__ import load
from bench.paths import DEV_A, DEV_B, OurPath

STAGES = ["a.dequeued", "a.stored", "a.due", "a.sent", "b.frame", "b.opened", "b.admitted"]
# Finer stages, in time order with the above; each used when the trace has it (older gateways write fewer).
ALL_STAGES = ["a.dequeued", "a.stored", "a.acked", "a.due", "a.sent", "a.written", "b.read", "b.frame", "b.opened",
              "b.admitted", "b.stored", "b.publish", "b.pubrec"]


def _trace(path: Path) -> dict[str, dict[str, int]]:
    """message id -> stage -> first time_ns."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    if path.exists():
        for line in path.read_text().splitlines():
            t, stage, mid = line.split()
            out[mid].setdefault(stage, int(t))
    return out


def _leg(sender: dict[str, dict[str, int]], receiver: dict[str, dict[str, int]], start: int,
         end: int, stages: list[str]) -> dict[str, int] | None:
    """The stage times of the one DATA message whose a.dequeued lies in [start, end] at `sender`."""
    ids = [m for m, st in sender.items() if start <= st.get("a.dequeued", -1) <= end]
    if len(ids) != 1:
        return None
    times = {s: t for s, t in sender[ids[0]].items() if s.startswith("a.")}
    times.update({s: t for s, t in receiver.get(ids[0], {}).items() if s.startswith("b.")})
    return times if all(s in times for s in stages) else None


def analyse(d: Path) -> dict[str, Any]:
    ping = json.loads((d / "ping.json").read_text())
    echo = json.loads((d / "echo.json").read_text())
    a, b = _trace(d / f"{DEV_A}.trace"), _trace(d / f"{DEV_B}.trace")
    written = {s for trace in (a, b) for times in trace.values() for s in times}
    stages = [s for s in ALL_STAGES if s in written or s in STAGES]
    segs: dict[str, list[float]] = defaultdict(list)
    used = 0
    for p0, p1 in ping:
        e = [x for x in echo if p0 <= x[0] <= p1]
        req, rep = _leg(a, b, p0, p1, stages), _leg(b, a, p0, p1, stages)
        if len(e) != 1 or req is None or rep is None:
            continue
        used += 1
        e_recv, e_reply = e[0]
        points = [("client publish", p0)] + [(f"A {s}" if s.startswith("a.") else f"B {s}", req[s]) for s in stages]
        points += [("echo receive", e_recv), ("echo publish", e_reply)]
        points += [(f"B {s}" if s.startswith("a.") else f"A {s}", rep[s]) for s in stages]
        points += [("client receive", p1)]
        for (n0, t0), (n1, t1) in itertools.pairwise(points):
            segs[f"{n0} -> {n1}"].append((t1 - t0) / 1e6)
        segs["total"].append((p1 - p0) / 1e6)

    def q(v: list[float], f: float) -> float:
        v = sorted(v)
        return round(v[min(len(v) - 1, int(f * len(v)))], 3)

    rows = [{"segment": k, "p50_ms": q(v, 0.5), "p90_ms": q(v, 0.9), "mean_ms": round(statistics.mean(v), 3)}
            for k, v in segs.items()]
    return {"exchanges": len(ping), "analysed": used, "segments": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.split("\n")[0])
    p.add_argument("--rtt", type=int, default=300)
    p.add_argument("--durability", choices=["power-loss", "crash"], default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agw-stages-") as tmp:
        root = Path(tmp)
        trace = root / "trace"
        ours = OurPath(root / "ours", durability=a.durability, stage_dir=trace)
        try:
            ours.start()
            rtt = load("rtt", {**ours.rtt_spec(), "n": a.rtt, "trace": str(trace)}, 300)
        finally:
            ours.close()
        result = {"rtt": rtt, "durability": a.durability or "power-loss (default)", **analyse(trace)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "stages.json").write_text(json.dumps(result, indent=1))
    print(f"round trip p50 {rtt.get('p50_ms')} ms, p99 {rtt.get('p99_ms')} ms; {result['analysed']} of "
          f"{result['exchanges']} exchanges analysed")
    for row in result["segments"]:
        print(f"  {row['segment']:<40} p50 {row['p50_ms']:>7.3f} ms  p90 {row['p90_ms']:>7.3f} ms  "
              f"mean {row['mean_ms']:>7.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
