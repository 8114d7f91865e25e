"""Stateful property test: the outbox behaves like a simple in-memory model, limits included.

A short run by default; set AGW_STORE_FUZZ=1 for a long one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.store import OutboxFull, OutboxLimits, Store

from .conftest import SoftStorageKey

LIMITS = OutboxLimits(
    max_entries=12, max_bytes=400, max_entries_per_peer=6, max_bytes_per_peer=150, max_record_bytes=60
)
ids = st.integers(0, 30).map(lambda n: n.to_bytes(16, "big"))
peers = st.sampled_from(["devA", "devB", "devC"])
items = st.tuples(ids, peers, st.binary(max_size=70), st.integers(0, 50))


@dataclass
class Row:
    peer: str
    record: bytes
    expires: int
    attempts: int
    due: int
    order: int


class OutboxModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.store = Store.open(self.dir / "m.db", SoftStorageKey(), limits=LIMITS)
        self.model: dict[bytes, Row] = {}
        self.order = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _usage(self, rows: dict[bytes, Row], peer: str | None = None) -> tuple[int, int]:
        sel = [r for r in rows.values() if peer is None or r.peer == peer]
        return len(sel), sum(len(r.record) for r in sel)

    def _fits(self, rows: dict[bytes, Row]) -> bool:
        n, b = self._usage(rows)
        if n > LIMITS.max_entries or b > LIMITS.max_bytes:
            return False
        for p in ("devA", "devB", "devC"):
            n, b = self._usage(rows, p)
            if n > LIMITS.max_entries_per_peer or b > LIMITS.max_bytes_per_peer:
                return False
        return True

    @rule(batch=st.lists(items, max_size=5))
    def put_many(self, batch: list[tuple[bytes, str, bytes, int]]) -> None:
        after = dict(self.model)
        order = self.order
        for m, p, r, x in batch:
            if m not in after:
                order += 1
                after[m] = Row(p, r, x, 0, 0, order)
        too_big = any(len(r) > LIMITS.max_record_bytes for _, _, r, _ in batch)
        try:
            added = self.store.outbox.put_many(batch)
        except OutboxFull:
            # Refused whole: only if the model agrees that some limit is exceeded (the model was not updated).
            assert too_big or not self._fits(after)
            return
        assert not too_big and self._fits(after)
        assert added == len(after) - len(self.model)
        self.model, self.order = after, order

    @rule(chosen=st.lists(ids, max_size=4))
    def delete_many(self, chosen: list[bytes]) -> None:
        expected = len({m for m in chosen if m in self.model})
        assert self.store.outbox.delete_many(chosen) == expected
        for m in chosen:
            self.model.pop(m, None)

    @rule(m=ids, due=st.integers(0, 50))
    def mark_attempt(self, m: bytes, due: int) -> None:
        got = self.store.outbox.mark_attempt(m, due)
        if m not in self.model:
            assert got is None
            return
        row = self.model[m]
        row.attempts += 1
        row.due = due
        assert got == row.attempts

    @rule(now=st.integers(0, 50))
    def expire(self, now: int) -> None:
        gone = sorted((r.order, m) for m, r in self.model.items() if r.expires <= now)
        assert [e.msg_id for e in self.store.outbox.expire(now)] == [m for _, m in gone]
        for _, m in gone:
            del self.model[m]

    @rule(now=st.integers(0, 50), limit=st.integers(1, 40))
    def due(self, now: int, limit: int) -> None:
        want = sorted((r.order, m) for m, r in self.model.items() if r.due <= now < r.expires)
        got = self.store.outbox.due(now, limit)
        assert [e.msg_id for e in got] == [m for _, m in want][:limit]
        for e in got:
            row = self.model[e.msg_id]
            assert (e.peer_device, e.record, e.expires_at_ms, e.attempts) == (row.peer, row.record, row.expires,
                                                                              row.attempts)

    @invariant()
    def usage_matches(self) -> None:
        assert self.store.outbox.usage() == self._usage(self.model)
        assert self.store.outbox.usage("devB") == self._usage(self.model, "devB")


OutboxModel.TestCase.settings = settings(
    max_examples=500 if os.environ.get("AGW_STORE_FUZZ") else 30, stateful_step_count=30, deadline=None
)
TestOutboxModel = OutboxModel.TestCase
