"""AGNTCY SLIM on loopback through its Python bindings (slim-bindings 3.3.x), run with the interpreter of the
separate venv bench/.slim-venv (never the project's). Three processes: a SLIM node, a receiver, a sender with a
point-to-point session, MLS on, reliable delivery (per-message ACK and retransmission, the default).

    <slim-venv>/bin/python bench/slim_driver.py all --port P --n 20000 --rtt 1000 --sizes 256 1024
prints `RESULT <json>`. The first payload byte says what a message is: S<n> start a run, D data, P ping, Q quit.
Every loop is bounded by a count and a deadline.
"""
# This file runs outside the project venv and imports nothing from the project.

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

SECRET = "bench-only-shared-secret-0123456789abcdef"
RECV, SEND = "agntcy/bench/recv", "agntcy/bench/send"
SEC = datetime.timedelta


def _sb() -> Any:
    import slim_bindings  # type: ignore[import-not-found]  # only present in the SLIM venv

    return slim_bindings


def init_service() -> Any:
    sb = _sb()
    tc = sb.new_tracing_config()
    tc.log_level = "warn"
    sb.initialize_with_configs(tracing_config=tc, runtime_config=sb.new_runtime_config(),
                               service_config=[sb.new_service_config()])
    return sb.get_global_service()


async def make_app(svc: Any, name: str, port: int) -> tuple[Any, Any]:
    sb = _sb()
    conn = await svc.connect_async(sb.new_insecure_client_config(f"http://127.0.0.1:{port}"))
    nm = sb.Name.from_string(name)
    app = svc.create_app_with_secret(nm, SECRET)
    await app.subscribe_async(nm, conn)
    return app, conn


async def run_server(a: argparse.Namespace) -> None:
    svc = init_service()
    await svc.run_server_async(_sb().new_insecure_server_config(f"127.0.0.1:{a.port}"))
    print(f"server listening on 127.0.0.1:{a.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=a.max_time)
    except TimeoutError:
        pass
    await svc.shutdown_async()


async def run_recv(a: argparse.Namespace) -> None:
    svc = init_service()
    app, _ = await make_app(svc, RECV, a.port)
    print("recv ready", flush=True)
    deadline = time.monotonic() + a.max_time
    sess = await app.listen_for_session_async(SEC(seconds=60))
    expected = count = nbytes = 0
    t_first = t_last = 0.0
    ctx = None
    while time.monotonic() < deadline:
        try:
            m = await sess.get_message_async(timeout=SEC(seconds=10))
        except Exception as e:
            if expected and count and ctx is not None:
                await sess.publish_to_async(ctx, b"R" + json.dumps(dict(
                    count=count, t_first=t_first, t_last=t_last, bytes=nbytes, partial=True)).encode(), None, None)
                expected = 0
            if "closed" in str(e).lower():
                break
            continue
        p = m.payload
        kind = p[:1]
        if kind == b"D":
            now = time.time()
            if count == 0:
                t_first = now
            count += 1
            nbytes += len(p)
            t_last = now
            ctx = m.context
            if count == expected:
                await sess.publish_to_async(m.context, b"R" + json.dumps(dict(
                    count=count, t_first=t_first, t_last=t_last, bytes=nbytes)).encode(), None, None)
                expected = 0
        elif kind == b"P":
            await sess.publish_to_async(m.context, p, None, None)
        elif kind == b"S":
            expected, count, nbytes, t_first, t_last = int(p[1:]), 0, 0, 0.0, 0.0
            ctx = m.context
            await sess.publish_to_async(m.context, b"A", None, None)
        elif kind == b"Q":
            break
    await asyncio.sleep(0.5)
    await svc.shutdown_async()


async def expect(sess: Any, prefix: bytes, timeout: float) -> bytes:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = await sess.get_message_async(timeout=SEC(seconds=max(0.1, end - time.monotonic())))
        if m.payload[:1] == prefix:
            return bytes(m.payload)
    raise TimeoutError(f"no {prefix!r} within {timeout}s")


async def run_send(a: argparse.Namespace) -> None:
    sb = _sb()
    svc = init_service()
    app, conn = await make_app(svc, SEND, a.port)
    remote = sb.Name.from_string(RECV)
    await app.set_route_async(remote, conn)
    cfg = sb.SessionConfig(session_type=sb.SessionType.POINT_TO_POINT, max_retries=5, interval=SEC(seconds=1),
                           metadata={}, mls_settings=sb.MlsSettings(header_integrity_validation_percent=100,
                                                                    max_seen_control_message_ids_size=None))
    t = time.perf_counter()
    sc = await app.create_session_async(cfg, remote)
    await sc.completion.wait_async()
    sess = sc.session
    res: dict[str, Any] = dict(mls=True, mode="reliable", session_setup_ms=round((time.perf_counter() - t) * 1e3, 2),
                               throughput=[], rtt=[])
    for _ in range(20):  # warm-up
        await sess.publish_async(b"P", None, None)
        await expect(sess, b"P", 10)
    for size in a.sizes:
        payload = b"D" + os.urandom(size - 1)
        await sess.publish_async(b"S%d" % a.n, None, None)
        await expect(sess, b"A", 10)
        t0 = time.time()
        deadline = time.monotonic() + a.max_time / 3
        sent = 0
        for _ in range(a.n):
            await sess.publish_async(payload, None, None)
            sent += 1
            if time.monotonic() > deadline:
                break
        r = json.loads((await expect(sess, b"R", 120))[1:])
        res["throughput"].append(dict(size=size, sent=sent, received=r["count"], lost=a.n - r["count"],
                                      msg_s=round(r["count"] / (r["t_last"] - t0))))
    payload = b"P" + os.urandom(255)
    lat: list[float] = []
    deadline = time.monotonic() + a.max_time / 3
    for _ in range(a.rtt):
        t = time.perf_counter()
        await sess.publish_async(payload, None, None)
        await expect(sess, b"P", 10)
        lat.append((time.perf_counter() - t) * 1e3)
        if time.monotonic() > deadline:
            break
    lat.sort()
    if lat:
        def q(f: float) -> float:
            return round(lat[min(len(lat) - 1, int(f * len(lat)))], 3)
        res["rtt"].append(dict(size=256, n=len(lat), p50_ms=q(0.5), p99_ms=q(0.99),
                               mean_ms=round(statistics.mean(lat), 3)))
    await sess.publish_async(b"Q", None, None)
    await asyncio.sleep(0.5)
    print("RESULT " + json.dumps(res), flush=True)
    try:
        h = await app.delete_session_async(sess)
        await asyncio.wait_for(h.wait_async(), 5)
    except Exception:
        pass
    await svc.shutdown_async()


def run_all(a: argparse.Namespace) -> int:
    me = [sys.executable, os.path.abspath(__file__)]
    common = ["--port", str(a.port)]
    srv = subprocess.Popen([*me, "server", "--max-time", str(a.max_time + 60), *common],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert srv.stdout is not None
        srv.stdout.readline()
        rcv = subprocess.Popen([*me, "recv", "--max-time", str(a.max_time), *common],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert rcv.stdout is not None
        rcv.stdout.readline()
        send = [*me, "send", "--n", str(a.n), "--rtt", str(a.rtt), "--max-time", str(a.max_time), "--sizes",
                *map(str, a.sizes), *common]
        out = subprocess.run(send,
                             capture_output=True, text=True, timeout=a.max_time + 60)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        try:
            rcv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rcv.kill()
        if not lines:
            print("RESULT " + json.dumps({"error": (out.stdout + out.stderr)[-800:]}), flush=True)
            return 1
        print(lines[0], flush=True)
        return 0
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["all", "server", "recv", "send"])
    ap.add_argument("--port", type=int, default=46400)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rtt", type=int, default=1000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--max-time", type=float, default=240)
    a = ap.parse_args()
    if a.role == "all":
        return run_all(a)
    asyncio.run({"server": run_server, "recv": run_recv, "send": run_send}[a.role](a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
