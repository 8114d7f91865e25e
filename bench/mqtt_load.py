"""MQTT load with paho-mqtt clients, the same for every path measured (ours and the Mosquitto bridge).

Run as a child process so that the harness's own work never shares a GIL with the clients:
    python -m bench.mqtt_load tput '<json spec>'   one publisher (this process) and one subscriber (a child)
    python -m bench.mqtt_load rtt  '<json spec>'   a pinger (this process) and an echoer (a child)
Each prints one line `RESULT <json>`. Every wait is bounded; a message that never arrives counts as lost.
The spec names, per side, port, username, password and topics, so that the caller decides the path.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

HOST = "127.0.0.1"
WARMUP = 20
WARM_FLAG = 1 << 63  # sequence numbers with this bit are warm-up messages, not counted


@dataclass(frozen=True)
class Side:
    """One client's broker and credentials."""

    port: int
    username: str | None = None
    password: str | None = None


def _side(d: dict[str, Any]) -> Side:
    return Side(int(d["port"]), d.get("username"), d.get("password"))


def _client(cid: str, side: Side, inflight: int) -> mqtt.Client:
    """A paho client with TCP_NODELAY on its socket (paho does not set it)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(inflight)
    c.max_queued_messages_set(0)
    if side.username:
        c.username_pw_set(side.username, side.password)
    c.on_socket_open = lambda cl, u, sock: sock.setsockopt(  # type: ignore[attr-defined]
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _connect(c: mqtt.Client, side: Side) -> None:
    ok = threading.Event()
    c.on_connect = lambda cl, u, flags, rc, props: ok.set() if not rc.is_failure else None
    c.connect(HOST, side.port, keepalive=60)
    c.loop_start()
    if not ok.wait(10):
        raise RuntimeError(f"MQTT connect to {side.port} as {side.username} failed")


# -- throughput ----------------------------------------------------------------------------------------------
def _subscriber(spec: dict[str, Any], ready: Any, warmed: Any, out: Any) -> None:
    side, n, limit = _side(spec["sub"]), int(spec["n"]), float(spec["limit_s"])
    seen: set[int] = set()
    dups = warm = 0
    first = last = 0.0
    done = threading.Event()

    def on_message(cl: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        nonlocal dups, warm, first, last
        seq = struct.unpack_from(">Q", m.payload)[0]
        if seq & WARM_FLAG:
            warm += 1
            warmed.set()
            return
        now = time.monotonic()
        if not seen:
            first = now
        last = now
        if seq in seen:
            dups += 1
        seen.add(seq)
        if len(seen) >= n:
            done.set()

    subbed = threading.Event()
    c = _client(f"bench-sub-{os.getpid()}", side, 1000)
    c.on_message = on_message
    c.on_subscribe = lambda *a: subbed.set()
    _connect(c, side)
    c.subscribe(spec["sub"]["topic"], 1)
    subbed.wait(10)
    ready.set()
    warmed.wait(60)
    cpu0 = time.process_time()  # (this process, paho's network thread included)
    deadline, idle_since, prev = time.monotonic() + limit, time.monotonic(), 0
    while not done.is_set() and time.monotonic() < deadline:
        done.wait(0.25)
        if len(seen) != prev:
            prev, idle_since = len(seen), time.monotonic()
        elif time.monotonic() - idle_since > spec.get("idle_s", 15):
            break
    cpu = time.process_time() - cpu0
    c.loop_stop()
    c.disconnect()
    out.put({"received": len(seen), "duplicates": dups, "warmup_received": warm, "t_first": first, "t_last": last,
             "cpu_s": cpu})


# paho numbers queued QoS 1 messages with packet ids 1..65,535 and keys its queue by them: past 65,535 messages
# published and not yet acknowledged, a new one takes the id of a queued one and replaces it, which is lost without
# an error (measured 2026-12-07: 120,000 published in one burst to a lone Mosquitto, 65,996 acknowledged, none left
# queued). The publisher waits below this many outstanding, so runs of any length measure the path, not paho.
PAHO_QUEUE_MAX = 60_000


def tput(spec: dict[str, Any]) -> dict[str, Any]:
    """Publish n QoS 1 messages of `size` bytes as fast as the in-flight window allows; count what arrives."""
    n, size, limit = int(spec["n"]), int(spec["size"]), float(spec["limit_s"])
    ctx = mp.get_context("fork")
    ready, warmed, out = ctx.Event(), ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_subscriber, args=(spec, ready, warmed, out))
    p.start()
    if not ready.wait(20):
        p.kill()
        raise RuntimeError("subscriber not ready")
    side = _side(spec["pub"])
    acked = 0
    all_acked = threading.Event()
    target = [WARMUP]

    def on_publish(cl: mqtt.Client, u: object, mid: int, rc: object, props: object) -> None:
        nonlocal acked
        acked += 1
        if acked >= target[0]:
            all_acked.set()

    c = _client(f"bench-pub-{os.getpid()}", side, int(spec.get("inflight", 100)))
    c.on_publish = on_publish
    _connect(c, side)
    topic = spec["pub"]["topic"]
    pad = os.urandom(size - 8)
    for i in range(WARMUP):  # first contact: pairwise session setup, bridge subscriptions, caches
        c.publish(topic, struct.pack(">Q", WARM_FLAG | i) + pad, qos=1)
        if i == 0:
            warmed.wait(60)
    all_acked.wait(30)
    time.sleep(float(spec.get("settle_s", 1.0)))
    all_acked.clear()
    target[0] = WARMUP + n
    t0, cpu0 = time.monotonic(), time.process_time()
    for i in range(n):
        while i + WARMUP - acked >= PAHO_QUEUE_MAX:  # (paho's queue: see PAHO_QUEUE_MAX)
            time.sleep(0.001)
        c.publish(topic, struct.pack(">Q", i) + pad, qos=1)
    all_acked.wait(limit)
    t_pub, pub_cpu = time.monotonic() - t0, time.process_time() - cpu0
    res = out.get(timeout=limit + 30)
    p.join(10)
    c.loop_stop()
    c.disconnect()
    got = res["received"]
    e2e = got / (res["t_last"] - t0) if got and res["t_last"] > t0 else 0.0
    return {"n": n, "size": size, "received": got, "lost": n - got, "duplicates": res["duplicates"],
            "acked": acked - WARMUP, "publish_msg_s": round(n / t_pub), "msg_s": round(e2e),
            "MB_s": round(e2e * size / 1e6, 2), "seconds": round(res["t_last"] - t0, 3) if got else None,
            # CPU seconds of the load clients themselves while measuring (the same clients on both paths)
            "client_cpu_s": {"publisher": round(pub_cpu, 3), "subscriber": round(res["cpu_s"], 3)}}


# -- round trip ----------------------------------------------------------------------------------------------
def _echoer(spec: dict[str, Any], ready: Any, stop: Any) -> None:
    side = _side(spec["echo"])
    c = _client(f"bench-echo-{os.getpid()}", side, 100)
    reply = spec["echo"]["pub_topic"]
    times: list[tuple[int, int]] = []  # (received, replied) in time_ns, when spec["trace"] names a directory

    def on_message(cl: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        t = time.time_ns()
        cl.publish(reply, m.payload, qos=1)
        times.append((t, time.time_ns()))

    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    _connect(c, side)
    c.subscribe(spec["echo"]["sub_topic"], 1)
    stop.wait(float(spec["limit_s"]) + 60)
    c.loop_stop()
    c.disconnect()
    if spec.get("trace"):
        (Path(spec["trace"]) / "echo.json").write_text(json.dumps(times))


def rtt(spec: dict[str, Any]) -> dict[str, Any]:
    """n sequential request/reply exchanges of 256 B at QoS 1 after a warm-up; p50/p99 in milliseconds."""
    n, warm, limit = int(spec["n"]), int(spec.get("warmup", 50)), float(spec["limit_s"])
    ctx = mp.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_echoer, args=(spec, ready, stop))
    p.start()
    if not ready.wait(20):
        p.kill()
        raise RuntimeError("echoer not ready")
    side = _side(spec["ping"])
    got, subbed = threading.Event(), threading.Event()
    want = [b""]

    def on_message(cl: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        if m.payload == want[0]:
            got.set()

    c = _client(f"bench-ping-{os.getpid()}", side, 100)
    c.on_message = on_message
    c.on_subscribe = lambda *a: subbed.set()
    _connect(c, side)
    c.subscribe(spec["ping"]["sub_topic"], 1)
    subbed.wait(10)
    time.sleep(0.3)
    lat: list[float] = []
    ping_times: list[tuple[int, int]] = []  # (published, reply received) in time_ns, measured exchanges only
    lost = 0
    deadline = time.monotonic() + limit
    topic = spec["ping"]["pub_topic"]
    for i in range(n + warm):
        if time.monotonic() > deadline:
            lost += n + warm - i
            break
        want[0] = struct.pack(">Q", i) + b"x" * 248
        got.clear()
        t = time.perf_counter()
        t_ns = time.time_ns()
        c.publish(topic, want[0], qos=1)
        if not got.wait(30 if i == 0 else 5):
            lost += i >= warm
            continue
        if i >= warm:
            lat.append((time.perf_counter() - t) * 1e3)
            ping_times.append((t_ns, time.time_ns()))
    stop.set()
    p.join(10)
    c.loop_stop()
    c.disconnect()
    if spec.get("trace"):
        (Path(spec["trace"]) / "ping.json").write_text(json.dumps(ping_times))
    lat.sort()
    if not lat:
        return {"n": 0, "lost": lost}

    def q(f: float) -> float:
        return round(lat[min(len(lat) - 1, int(f * len(lat)))], 3)

    return {"n": len(lat), "lost": lost, "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99),
            "max_ms": round(lat[-1], 3), "mean_ms": round(statistics.mean(lat), 3)}


def main(argv: list[str]) -> int:
    mode, spec = argv[0], json.loads(argv[1])
    result = tput(spec) if mode == "tput" else rtt(spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
