"""Gateway footprint: resident memory (VmRSS from /proc, psutil is not a dependency) idle and under load, and
cold start to ready (process spawn until the daemon reports its relay link ready), with SoftHSM keys."""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.paths import rss_kib
from gateway import control
from gateway.testbed import Gateway


class RssSampler:
    """Samples the VmRSS of some processes every `interval` seconds in a thread; keeps the peak of each."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.pids = pids
        self.interval = interval
        self.peak: dict[str, int] = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                try:
                    self.peak[name] = max(self.peak[name], rss_kib(pid))
                except (OSError, RuntimeError):
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system) of a process, split into its main thread and all other threads.

    For a gateway the main thread runs the asyncio loop; the others are paho's network thread and to_thread
    workers. Read from /proc/<pid>/task/*/stat (fields 14 and 15, in clock ticks)."""
    tick = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        t = (int(fields[11]) + int(fields[12])) / tick
        if task.name == str(pid):
            main += t
        else:
            other += t
    return {"main": main, "other": other}


class CpuMeter:
    """CPU seconds used by named processes between enter and exit, per process and per thread group."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.used: dict[str, dict[str, float]] = {}

    def __enter__(self) -> CpuMeter:
        self._start = {n: cpu_seconds(p) for n, p in self.pids.items()}
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self._t0
        for n, p in self.pids.items():
            try:
                end = cpu_seconds(p)
            except OSError:
                continue
            self.used[n] = {k: round(end[k] - self._start[n][k], 2) for k in end}


def _link_ready(gw: Gateway, pid: int) -> bool:
    try:
        st = control.request(gw.root / "state" / "control.sock", {"cmd": "status"}, timeout=2)
    except (OSError, ValueError, control.ControlError):
        return False
    return bool(st.get("pid") == pid and st["link"]["state"] == "ready" and st["mqtt"]["connected"])


def cold_start(gw: Gateway, runs: int = 3, timeout: float = 30.0) -> dict[str, Any]:
    """Stop the gateway, then time `agw run` from spawn to link ready (polled on the control socket every 10 ms).

    Includes interpreter start and imports, opening the SoftHSM token, loading the identity and delegated keys,
    unwrapping the store key, TLS + token authentication with the relay and the MQTT connection."""
    samples = []
    for _ in range(runs):
        gw.stop()
        time.sleep(0.3)
        t0 = time.monotonic()
        gw.start()
        assert gw.proc is not None
        while not _link_ready(gw, gw.proc.pid):
            if gw.proc.poll() is not None:
                raise RuntimeError(f"gateway exited during cold start:\n{gw.log_text()}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"gateway not ready after {timeout} s")
            time.sleep(0.01)
        samples.append(time.monotonic() - t0)
    imports = _python_startup()
    return {"runs": runs, "cold_start_s": round(statistics.median(samples), 3),
            "samples_s": [round(s, 3) for s in samples], "python_imports_s": imports}


def _python_startup() -> float:
    """Time to start the interpreter and import the daemon's modules only (the floor under cold start)."""
    from gateway.testbed import PY

    t = time.monotonic()
    subprocess.run([PY, "-c", "import gateway.daemon, gateway.cli"], check=True, capture_output=True)
    return round(time.monotonic() - t, 3)


def memory_detail(pid: int) -> dict[str, int]:
    """Where a process's resident memory is, in KiB: anonymous (heap, arenas, stacks) vs file-backed (shared
    libraries, mostly), and its thread count (each thread reserves a stack and may get a malloc arena)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            out[key] = int(val.split()[0])
    return out


def load_footprint(sizes: list[tuple[int, int]], limit: float = 600.0, extra_env: dict[str, str] | None = None,
                   cold_runs: int = 0) -> dict[str, Any]:
    """The gateway footprint alone: both gateways of `OurPath` idle, then one throughput run per size with their
    RSS sampled every 100 ms. "Under load" is the peak VmRSS of either gateway during a run."""
    import functools
    import tempfile

    from bench.__main__ import load
    from bench.paths import DEV_A, OurPath

    out: dict[str, Any] = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="agw-footprint-") as tmp:
        ours = OurPath(Path(tmp) / "ours", extra_env=extra_env or {})
        try:
            ours.start()
            assert ours.bed is not None
            pids = {name: gw.proc.pid for name, gw in ours.bed.gateways.items() if gw.proc}
            time.sleep(1.0)
            out["idle"] = {name: memory_detail(pid) for name, pid in pids.items()}
            for size, n in sizes:
                spec = {**ours.tput_spec(), "n": n, "size": size}
                with RssSampler(pids) as sampler:
                    row = functools.partial(load, "tput", spec, limit)()
                out["runs"].append({"size": size, "n": n, "msg_s": row["msg_s"], "lost": row["lost"],
                                    "rss_peak_kib": dict(sampler.peak),
                                    "after": {name: memory_detail(pid) for name, pid in pids.items()}})
            if cold_runs:
                out["cold_start"] = cold_start(ours.gateway(DEV_A), runs=cold_runs)
        finally:
            ours.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.footprint`: the gateway footprint without the rest of the bench."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.footprint", description=main.__doc__)
    p.add_argument("--messages", type=int, default=5000, help="messages per run at 256 B and 1 KiB")
    p.add_argument("--messages-16k", type=int, default=5000)
    p.add_argument("--sizes", default="256,1024,16384")
    p.add_argument("--cold-runs", type=int, default=0)
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the gateways' environment")
    a = p.parse_args(argv)
    sizes = [(int(s), a.messages_16k if int(s) >= 16384 else a.messages) for s in a.sizes.split(",")]
    env = dict(e.split("=", 1) for e in a.env)
    r = load_footprint(sizes, extra_env=env, cold_runs=a.cold_runs)
    for name, d in r["idle"].items():
        print(f"idle {name}: {d}")
    for run in r["runs"]:
        print(f"{run['size']:>6} B x {run['n']}: {run['msg_s']:,} msg/s lost {run['lost']}, peak RSS "
              f"{ {k: round(v / 1024, 1) for k, v in run['rss_peak_kib'].items()} } MB, after {run['after']}")
    if "cold_start" in r:
        print(f"cold start {r['cold_start']}")
    print("RESULT " + json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
