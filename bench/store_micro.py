"""Micro-benchmark: outbox put_many + delete throughput, 256-byte records, batches of 1 and 64.

Runs side by side, in one process and on the same file system:
- `agw-store`: the real encrypted store (AES-GCM per record, blind indexes, usage triggers, WAL, synchronous=FULL);
- `plain-sqlite`: the same access pattern on an unencrypted table with the same pragmas, as the baseline.
Each cycle stores a batch in one transaction (group commit, one fsync) and later deletes it in one transaction,
the way the gateway acknowledges the broker and then processes end-to-end acks. Reports messages per second and
the ratios encrypted/plain and batch-64/batch-1.

    python bench/store_micro.py [--messages 2000] [--dir /path/on/target/disk] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

from gateway.store import Store

RECORD = 256


class _SoftKey:
    """Software AES-KW storage key: the hardware is only used at open, so it does not affect these numbers."""

    uri = "soft:bench"

    def __init__(self) -> None:
        self._kek = os.urandom(32)

    def wrap(self, key: bytes) -> bytes:
        return aes_key_wrap(self._kek, key)

    def unwrap(self, blob: bytes) -> bytes:
        return aes_key_unwrap(self._kek, blob)

    def info(self) -> object:
        return None


Cycle = Callable[[list[tuple[bytes, str, bytes, int]]], object]


def _run(put: Cycle, delete: Callable[[list[bytes]], object], messages: int, batch: int) -> dict[str, float]:
    batches = [[(os.urandom(16), f"dev{i % 4}", os.urandom(RECORD), 10**13) for i in range(batch)]
               for _ in range(max(1, messages // batch))]
    t0 = time.perf_counter()
    for b in batches:
        put(b)
    t1 = time.perf_counter()
    for b in batches:
        delete([m for m, _, _, _ in b])
    t2 = time.perf_counter()
    n = len(batches) * batch
    return {"messages": n, "put_per_s": n / (t1 - t0), "delete_per_s": n / (t2 - t1), "cycle_per_s": n / (t2 - t0)}


def bench_store(directory: Path, messages: int, batch: int) -> dict[str, float]:
    with Store.open(directory / f"agw-{batch}.db", _SoftKey()) as store:  # type: ignore[arg-type]
        return _run(store.outbox.put_many, store.outbox.delete_many, messages, batch)


def bench_plain(directory: Path, messages: int, batch: int) -> dict[str, float]:
    conn = sqlite3.connect(directory / f"plain-{batch}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, k BLOB UNIQUE, peer TEXT, exp INTEGER, v BLOB)")

    def put(b: list[tuple[bytes, str, bytes, int]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT OR IGNORE INTO outbox (k, peer, v, exp) VALUES (?, ?, ?, ?)", b)
        conn.execute("COMMIT")

    def delete(ids: list[bytes]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("DELETE FROM outbox WHERE k = ?", [(m,) for m in ids])
        conn.execute("COMMIT")

    try:
        return _run(put, delete, messages, batch)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=2000, help="messages per run with batch 64 (batch 1: a quarter)")
    ap.add_argument("--dir", type=Path, default=None, help="directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        for batch in (1, 64):
            n = args.messages if batch > 1 else max(1, args.messages // 4)
            results[f"agw-store/batch{batch}"] = bench_store(d, n, batch)
            results[f"plain-sqlite/batch{batch}"] = bench_plain(d, n, batch)
    rate = {name: r["cycle_per_s"] for name, r in results.items()}
    ratios = {f"agw/plain batch{b}": rate[f"agw-store/batch{b}"] / rate[f"plain-sqlite/batch{b}"] for b in (1, 64)}
    ratios["agw batch64/batch1"] = rate["agw-store/batch64"] / rate["agw-store/batch1"]
    if args.json:
        print(json.dumps({"record_bytes": RECORD, "results": results, "ratios": ratios}, indent=2))
        return 0
    print(f"outbox put_many + delete_many, {RECORD} B records, WAL + synchronous=FULL, dir={args.dir or 'tmp'}")
    print(f"{'run':<22}{'msgs':>7}{'put/s':>11}{'delete/s':>11}{'cycle/s':>11}")
    for name, r in results.items():
        print(f"{name:<22}{int(r['messages']):>7}{r['put_per_s']:>11.0f}{r['delete_per_s']:>11.0f}{r['cycle_per_s']:>11.0f}")
    for name, v in ratios.items():
        print(f"ratio {name}: {v:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
