"""Micro-benchmark: the delivered ids' fold on a large store, as the event loop sees it.

A receiver-like workload on an asyncio loop, per frame of `--frame` ids: `seen_many`, one transaction marking
them and storing as many 256 B inbox entries (`--durable`: fsync'd, as the receiver's inbox commit), one deleting
the entries, then `fold()` when `fold_due` (between frames, as `gateway/receiving.py` does), then the loop turns.
A task beside it sleeps 1 ms at a time and records how late it wakes (the loop lag). Reports per message the CPU
(`process_time`) and wall time of the whole frame work, folds included, and the wall time of each fold step and
the loop lag (max, p99, mean); from schema version 6 on the folds of the recent ids and the merge steps
apart.

The store of `--rows` ids is built once (`build`, any schema version from 5 on: the ids go straight into
`delivered` in random order, as years of single inserts and folds leave it) and copied for each run, so two
checkouts (by `PYTHONPATH`) start from the same file; a newer checkout upgrades its copy on open.

    python bench/delivered_fold.py build --rows 1000000 --out /tmp/rx-1m.db
    python bench/delivered_fold.py run --store /tmp/rx-1m.db [--ids 80000] [--frame 85] [--durable]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.store_micro import _SoftKey
from gateway.store import Store


def _key() -> _SoftKey:
    key = _SoftKey()
    key._kek = b"\x22" * 32  # (one key for the build and every run)
    return key


def build(rows: int, out: Path) -> None:
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{out}{suffix}").unlink(missing_ok=True)
    with Store.open(out, _key()) as s:  # type: ignore[arg-type]
        with s._db.read("bench") as conn:
            conn.execute("PRAGMA cache_size=-262144")  # (the build only: random inserts into a large table)
        for i in range(0, rows, 50_000):
            with s.transaction(durable=False), s._db.read("bench") as conn:
                t = int(time.time() * 1000) - 86_400_000  # (a real time: its 6 bytes are in every row)
                conn.executemany("INSERT INTO delivered (k, at_ms) VALUES (?, ?)",
                                 [(os.urandom(16), t + j) for j in range(min(50_000, rows - i))])
        s.checkpoint()


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def _run(s: Store, ids: int, frame: int, durable: bool) -> dict[str, float]:
    lags: list[float] = []
    folds: list[float] = []  # folds of the recent ids
    merges: list[float] = []  # merge steps
    stop = False

    async def monitor() -> None:
        while not stop:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    mon = asyncio.create_task(monitor())
    await asyncio.sleep(0.01)
    record = os.urandom(256 + 40)
    n = 0
    c0, w0 = time.process_time(), time.perf_counter()
    while n < ids:
        msg_ids = [os.urandom(16) for _ in range(frame)]
        names = [f"dev-a/{m.hex()}" for m in msg_ids]
        keys = s.delivered.keys(msg_ids)
        assert not s.delivered.seen_many(msg_ids, keys)
        with s.transaction(durable=durable):
            s.delivered.mark_many(msg_ids, int(time.time() * 1000), keys)
            s.inbox.put_many([(m, record) for m in names])
        with s.transaction(durable=False):
            s.inbox.delete_many(names)
        if s.delivered.fold_due:
            merge = len(s.delivered._recent) < s.delivered.FOLD_AT  # (a merge step, from schema version 6 on)
            t = time.perf_counter()
            s.delivered.fold()
            (merges if merge else folds).append(time.perf_counter() - t)
        n += frame
        await asyncio.sleep(0)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    stop = True
    await mon
    ms = 1e3
    return {"ids": n, "cpu_us": round(1e6 * cpu / n, 2), "wall_us": round(1e6 * wall / n, 2),
            "fold_steps": len(folds), "fold_ms_max": round(ms * max(folds, default=0), 2),
            "fold_ms_p99": round(ms * _pct(folds, 0.99), 2),
            "fold_ms_mean": round(ms * statistics.fmean(folds), 2) if folds else 0.0,
            "fold_ms_sum": round(ms * sum(folds), 1),
            "merge_steps": len(merges), "merge_ms_max": round(ms * max(merges, default=0), 2),
            "merge_ms_p99": round(ms * _pct(merges, 0.99), 2),
            "merge_ms_mean": round(ms * statistics.fmean(merges), 2) if merges else 0.0,
            "merge_ms_sum": round(ms * sum(merges), 1),
            "lag_ms_max": round(ms * max(lags, default=0), 2), "lag_ms_p99": round(ms * _pct(lags, 0.99), 2),
            "lag_ms_mean": round(ms * statistics.fmean(lags), 3) if lags else 0.0}


def run(store: Path, ids: int, frame: int, durable: bool, d: Path) -> dict[str, float | str]:
    path = d / "agw.db"
    shutil.copyfile(store, path)
    with Store.open(path, _key()) as s:  # type: ignore[arg-type]
        rows = s.delivered.count()
        out = asyncio.run(_run(s, ids, frame, durable))
        with s._db.read("bench") as conn:  # (how many wait in delivered_mid at the end, from schema version 6 on)
            mid = conn.execute("SELECT COUNT(*) FROM sqlite_schema WHERE name = 'delivered_mid'").fetchone()[0]
            left = conn.execute("SELECT COUNT(*) FROM delivered_mid").fetchone()[0] if mid else 0
    return {"rows": rows, **out, "mid_at_end": left}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--rows", type=int, required=True)
    b.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--store", type=Path, required=True)
    r.add_argument("--ids", type=int, default=80_000)
    r.add_argument("--frame", type=int, default=85)
    r.add_argument("--durable", action="store_true", help="fsync the mark-and-put commit, as the receiver does")
    r.add_argument("--dir", type=Path, default=None)
    r.add_argument("--set", nargs="*", default=[], metavar="NAME=N",
                   help="DeliveredIds class constants to try (e.g. MID_MAX=65536), where the checkout has them")
    a = p.parse_args(argv)
    if a.cmd == "build":
        build(a.rows, a.out)
        return 0
    from gateway.store.records import DeliveredIds

    for setting in a.set:
        name, value = setting.split("=")
        if hasattr(DeliveredIds, name):
            setattr(DeliveredIds, name, int(value))
    with tempfile.TemporaryDirectory(prefix="agw-fold-", dir=a.dir) as d:
        print(json.dumps(run(a.store, a.ids, a.frame, a.durable, Path(d))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
