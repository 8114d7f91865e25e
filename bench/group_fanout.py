"""Group fan-out (the groups issue): K gateways with M agents each, one MLS group of all K*M agents, one agent
sends a burst of N messages; every other member must receive every message exactly once.

Real processes as in `bench.paths.OurPath` (testbed relay, SoftHSM tokens, Mosquitto, `agw run`). The group is
made with `agw group create` and one `agw group add` commit for all other members; the members' paho clients run
in one process per gateway. Run as a child process:
    python -m bench.group_fanout --gateways 5 --agents 10 --messages 2000
prints `RESULT <json>`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.paths import relay_config, start_profiled
from gateway.testbed import Testbed

GROUP = "bench"
IDLE_S = 60.0  # a member process stops waiting after this long without a new delivery


def _agent_client(name: str, password: str, port: int) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{name}", protocol=mqtt.MQTTv5)
    c.username_pw_set(name, password)
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port)
    return c


def _members(spec: dict[str, Any], out: Any, joined: Any) -> None:
    """One gateway's member agents: report when all joined, then count the burst per agent."""
    n, names = int(spec["n"]), list(spec["agents"])
    seen: dict[str, set[int]] = {a: set() for a in names}
    dups = {a: 0 for a in names}
    last = [0.0]
    got_join: set[str] = set()
    lock = threading.Lock()
    clients = []
    for a in names:
        c = _agent_client(a, spec["password"], spec["port"])

        def on_message(cl: mqtt.Client, u: object, m: mqtt.MQTTMessage, a: str = a) -> None:
            with lock:
                if m.topic.endswith("/events"):
                    if json.loads(m.payload).get("op") == "joined":
                        got_join.add(a)
                        if len(got_join) == len(names):
                            joined.put(spec["gateway"])
                    return
                seq = struct.unpack_from(">Q", m.payload)[0]
                if seq in seen[a]:
                    dups[a] += 1
                seen[a].add(seq)
                last[0] = time.time()

        c.on_message = on_message
        c.subscribe(f"agw/{a}/group/+/in", qos=1)
        c.subscribe(f"agw/{a}/group/+/events", qos=1)
        c.loop_start()
        clients.append(c)
    deadline, idle_since, prev = time.monotonic() + spec["limit_s"], time.monotonic(), -1
    while time.monotonic() < deadline:
        time.sleep(0.25)
        with lock:
            total = sum(len(s) for s in seen.values())
        if total >= n * len(names):
            break
        if total != prev:
            prev, idle_since = total, time.monotonic()
        elif total and time.monotonic() - idle_since > IDLE_S:
            break
    for c in clients:
        c.loop_stop()
        c.disconnect()
    with lock:
        out.put({"gateway": spec["gateway"], "received": {a: len(s) for a, s in seen.items()},
                 "duplicates": sum(dups.values()), "t_last": last[0]})


def run(gateways: int, agents: int, n: int, limit: float = 480) -> dict[str, Any]:
    keep = os.environ.get("AGW_BENCH_KEEP")  # a directory to keep the fleet's logs in, for a post-mortem
    with tempfile.TemporaryDirectory(prefix="agw-bench-groups-") as tmp:
        bed = Testbed(Path(keep) if keep else Path(tmp))
        procs: list[mp.process.BaseProcess] = []
        try:
            bed.relay_extra = ["--config", str(relay_config(bed.root)), "--log-level", "warning"]
            bed.start_relay()
            devs = [f"g{i}" for i in range(1, gateways + 1)]
            everyone = [f"{d}/*" for d in devs]
            names = {d: [f"{d}a{j}" for j in range(agents)] for d in devs}
            t = time.monotonic()
            for d in devs:
                bed.add_gateway(d, agents={a: everyone for a in names[d]})
            profile = os.environ.get("AGW_BENCH_PROFILE")  # a directory: the sender and one member under cProfile
            for gw in bed.gateways.values():
                if profile and gw.name in (devs[0], devs[-1]):
                    start_profiled(gw, Path(profile) / f"{gw.name}.prof")
                else:
                    gw.start()
            for gw in bed.gateways.values():
                gw.wait_ready(60)
            setup_s = time.monotonic() - t
            sender, sender_dev = names[devs[0]][0], devs[0]
            ctx = mp.get_context("fork")
            out, joined = ctx.Queue(), ctx.Queue()
            for d in devs:
                local = [a for a in names[d] if a != sender]
                spec = {"gateway": d, "agents": local, "n": n, "port": bed.gateways[d].broker.port,
                        "password": bed.agent_password, "limit_s": limit}
                p = ctx.Process(target=_members, args=(spec, out, joined))
                p.start()
                procs.append(p)
            time.sleep(1.0)
            gw0 = bed.gateways[sender_dev]
            gw0.agw("group", "create", "--agent", sender, "--group", GROUP)
            others = [f"{d}/{a}" for d in devs for a in names[d] if a != sender]
            add = ["group", "add", "--agent", sender, "--group", GROUP]
            for m in others:
                add += ["--member", m]
            t = time.monotonic()
            for _ in range(60):  # gateways publish their agents' KeyPackages shortly after the link is up
                res = gw0.agw(*add, check=False)
                if res.returncode == 0 or "no KeyPackage" not in res.stderr + res.stdout:
                    break
                time.sleep(0.5)
                t = time.monotonic()
            if res.returncode != 0:
                raise RuntimeError(f"agw group add failed: {res.stderr or res.stdout}")
            add_s = time.monotonic() - t
            ready: set[str] = set()
            deadline = time.monotonic() + 120
            while len(ready) < len(devs) and time.monotonic() < deadline:
                try:
                    ready.add(joined.get(timeout=max(0.1, deadline - time.monotonic())))
                except queue.Empty:
                    break
            if len(ready) < len(devs):
                raise RuntimeError(f"only {sorted(ready)} of {devs} saw all their agents join")
            joined_s = time.monotonic() - t
            time.sleep(1.0)
            c = _agent_client(sender, bed.agent_password, gw0.broker.port)
            acked = threading.Event()
            count = [0]

            def on_publish(cl: mqtt.Client, u: object, mid: int, rc: object, props: object) -> None:
                count[0] += 1
                if count[0] >= n:
                    acked.set()

            c.on_publish = on_publish
            c.loop_start()
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            pad = b"g" * 248
            t0 = time.time()
            for i in range(n):
                c.publish(f"agw/{sender}/group/{GROUP}/out", struct.pack(">Q", i) + pad, qos=1, properties=props)
            acked.wait(limit)
            results = [out.get(timeout=limit + 60) for _ in devs]
            c.loop_stop()
            c.disconnect()
        finally:
            for proc in procs:
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
            bed.close()
    expected = n * len(others)
    received = sum(sum(r["received"].values()) for r in results)
    t_last = max(r["t_last"] for r in results)
    span = t_last - t0 if received else 0.0
    worst = min(v for r in results for v in r["received"].values())
    return {"gateways": gateways, "members": len(others) + 1, "messages": n, "deliveries_expected": expected,
            "deliveries": received, "lost": expected - received, "duplicates": sum(r["duplicates"] for r in results),
            "setup_s": round(setup_s, 1), "add_commit_s": round(add_s, 2), "all_joined_s": round(joined_s, 2),
            "idle_s": IDLE_S, "group_msg_s": round(worst / span) if span else 0,
            "deliveries_s": round(received / span) if span else 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--gateways", type=int, default=5)
    p.add_argument("--agents", type=int, default=10, help="agents per gateway")
    p.add_argument("--messages", type=int, default=2000)
    a = p.parse_args(argv)
    print("RESULT " + json.dumps(run(a.gateways, a.agents, a.messages)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
