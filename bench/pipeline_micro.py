"""Micro-benchmark: per-message CPU of the store and codec steps of the pipeline, in one process (no MQTT, no
relay, no fsync: `durability: crash` transactions), 256-byte payloads in ingest batches of 256.

Two access patterns on the current code, so the effect of the pattern alone is visible:
- `per-message`: the pattern before the in-memory hand-over: outbox insert plus one sealed broker-redelivery
  mark per message, then the sender reads the batch back and unseals it (`Outbox.due`), marks the attempt,
  deletes on the ACK; the receiver decodes, checks delivered ids, marks each id and stores each inbox entry
  with its own statement.
- `batched`: the outbox rows are stored due later and the sender keeps the batch in memory (no read-back), marks
  in buckets of 64 packet ids (`RedeliveryMarks`), delivered marks and inbox puts in one statement each per
  frame; the first send's attempt is marked with an UPDATE (the pattern of 2026-11-22).
- `folded`: the current pattern: as `batched`, but the first attempt is counted in the outbox insert (a first
  send from memory needs no UPDATE).
CPU time (`time.process_time`) per message, best of `--rounds`.

    python -m bench.pipeline_micro [--messages 20480] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from bench.store_micro import _SoftKey
from gateway.protocol.message import InnerMessage, Kind, new_message_id
from gateway.store import Store
from gateway.store.marks import RedeliveryMarks

BATCH = 256


def _digest(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest()[:16]


def run(pattern: str, n: int) -> tuple[float, float]:
    """(sender us/msg, receiver us/msg) for one pass."""
    with tempfile.TemporaryDirectory(prefix="agw-pipeline-micro-") as d:
        s = Store.open(Path(d) / "agw.db", _SoftKey())  # type: ignore[arg-type]
        try:
            marks = RedeliveryMarks(s.secrets, "mqtt-in/")
            msgs = [InnerMessage(kind=Kind.DATA, message_id=new_message_id(), sender_agent="alice",
                                 recipient_agent="bob", created_at_ms=1, expires_at_ms=10**13,
                                 payload=os.urandom(256)) for _ in range(n)]
            wires = [m.encode() for m in msgs]
            t0 = time.process_time()
            for i in range(0, n, BATCH):
                chunk = zip(msgs[i:i + BATCH], wires[i:i + BATCH], strict=True)
                items = [(m.message_id, "dev-b", w, m.expires_at_ms) for m, w in chunk]
                ingested = [((i + j) % 65536, _digest(i + j)) for j in range(len(items))]
                with s.transaction(durable=False):
                    if pattern == "per-message":
                        s.outbox.put_many(items)
                        s.secrets.put_many([(f"mqtt-in/{p}", dg) for p, dg in ingested])
                    else:
                        s.outbox.put_many(items, due_at_ms=10**12, attempts=int(pattern == "folded"))
                        marks.put(ingested)
                if pattern == "per-message":
                    ids = [e.msg_id for e in s.outbox.due(10**6, limit=512)]
                else:
                    ids = [it[0] for it in items]
                if pattern != "folded":
                    with s.transaction(durable=False):
                        s.outbox.mark_attempts(ids, 10**6 + 5000)
                with s.transaction(durable=False):
                    s.outbox.delete_many(ids)
            t1 = time.process_time()
            for i in range(0, n, BATCH):
                frame = wires[i:i + BATCH]
                got = [InnerMessage.decode(w) for w in frame]
                s.delivered.seen_many([m.message_id for m in got])
                with s.transaction(durable=False):
                    if pattern == "per-message":
                        for m, w in zip(got, frame, strict=True):
                            s.delivered.mark(m.message_id, 1)
                            s.inbox.put(m.message_id.hex(), w)
                    else:
                        s.delivered.mark_many([m.message_id for m in got], 1)
                        s.inbox.put_many([(m.message_id.hex(), w) for m, w in zip(got, frame, strict=True)])
            t2 = time.process_time()
        finally:
            s.close()
    return 1e6 * (t1 - t0) / n, 1e6 * (t2 - t1) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline_micro", description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=20480)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    best: dict[str, tuple[float, float]] = {}
    for _ in range(a.rounds):
        for pattern in ("per-message", "batched", "folded"):
            got = run(pattern, a.messages)
            old = best.get(pattern)
            best[pattern] = got if old is None else (min(old[0], got[0]), min(old[1], got[1]))
    for pattern, (snd, rcv) in best.items():
        print(f"{pattern:12s} sender store path {snd:6.1f} us/msg   receiver decode + store {rcv:6.1f} us/msg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
