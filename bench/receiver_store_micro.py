"""Micro-benchmark: the receiving gateway's store work per relay frame, in one process (CPU time per message).

Per frame of `--frame` 256 B messages, as `gateway/receiving.py` does it: look the ids up in the delivered ids
(`seen_many`), then one transaction marks them delivered and stores the inbox entries (`mark_many`, `put_many`),
then one deletes the entries (their PUBCOMP came), and (schema version 5 on) the recent delivered ids are folded
into the main table when due, as the receiver does between frames (`fold_us`, in `total_us`). `--rows` delivered
ids are stored first (a gateway keeps ids for `store.delivered_retention_days`, 30 by default), so the growth of
that table shows. Transactions are `durable=False` (no fsync: this measures CPU, not the disk) unless `--durable`
(the mark-and-put commit fsync'd, as the receiver's inbox commit is). Run it against two checkouts with
`PYTHONPATH`.

    python bench/receiver_store_micro.py [--rows 0 100000 1000000] [--frames 200] [--frame 200] [--durable]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.store_micro import _SoftKey
from gateway.store import Store


def run(rows: int, frames: int, frame: int, d: Path, durable: bool = False) -> dict[str, float]:
    path = d / f"rx-{rows}.db"
    with Store.open(path, _SoftKey()) as s:  # type: ignore[arg-type]
        for i in range(0, rows, 10_000):
            with s.transaction(durable=False):
                s.delivered.mark_many([os.urandom(16) for _ in range(min(10_000, rows - i))], 1)
        s.checkpoint()
        record = os.urandom(256 + 40)
        t_seen = t_store = t_drop = t_fold = 0.0
        folds = 0
        for _ in range(frames):
            ids = [os.urandom(16) for _ in range(frame)]
            names = [f"dev-a/{m.hex()}" for m in ids]
            t0 = time.process_time()
            assert not s.delivered.seen_many(ids)
            t1 = time.process_time()
            with s.transaction(durable=durable):
                s.delivered.mark_many(ids, 2)
                s.inbox.put_many([(n, record) for n in names])
            t2 = time.process_time()
            with s.transaction(durable=False):
                s.inbox.delete_many(names)
            t3 = time.process_time()
            if getattr(s.delivered, "fold_due", False):  # (not before schema version 5)
                s.delivered.fold()
                folds += 1
            t4 = time.process_time()
            t_seen, t_store, t_drop, t_fold = t_seen + t1 - t0, t_store + t2 - t1, t_drop + t3 - t2, t_fold + t4 - t3
        n = frames * frame
        total = t_seen + t_store + t_drop + t_fold
        return {"rows": rows, "seen_us": round(1e6 * t_seen / n, 2), "mark_and_put_us": round(1e6 * t_store / n, 2),
                "delete_us": round(1e6 * t_drop / n, 2), "fold_us": round(1e6 * t_fold / n, 2), "folds": folds,
                "total_us": round(1e6 * total / n, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[0, 100_000])
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--frame", type=int, default=200)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--durable", action="store_true", help="fsync the mark-and-put commit, as the receiver does")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agw-rx-store-", dir=a.dir) as d:
        for rows in a.rows:
            print(json.dumps(run(rows, a.frames, a.frame, Path(d), a.durable)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
