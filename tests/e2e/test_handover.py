"""The sender hands freshly stored messages to its sender loop in memory (gateway/sending.py `Handover`); the
outbox row, stored due only later, stays the durable copy. Killed before those messages went out, the gateway
sends each of them once after the restart, without waiting for the later due time."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time

import pytest

from gateway.client import AgentClient
from gateway.sending import HANDOVER_DUE_MS
from gateway.testbed import Testbed

PW = "agent-secret"


def _outbox_rows(db: str) -> list[tuple[int, int]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [(int(r[0]), int(r[1])) for r in conn.execute("SELECT due_at_ms, attempts FROM outbox")]


def _wait_link(gw: object, ready: bool, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (gw.status()["link"]["state"] == "ready") == ready:  # type: ignore[attr-defined]
            return
        time.sleep(0.2)
    raise AssertionError(f"link never became {'ready' if ready else 'not ready'}")


async def test_handed_over_messages_go_out_once_after_a_kill(tmp_path_factory: pytest.TempPathFactory) -> None:
    tb = Testbed(tmp_path_factory.mktemp("handover"))
    try:
        a, b = tb.start_alice_and_bob()
        n = 20
        async with AgentClient("bob", port=b.broker.port, password=PW) as bob:
            async with AgentClient("alice", port=a.broker.port, password=PW) as alice:
                await alice.send("dev-b/bob", b"warm-up")  # opens the pairwise session
                assert (await bob.receive(timeout=30)).payload == b"warm-up"
                # and its end-to-end ACK reached dev-a (it may trail the delivery to bob): the outbox is empty
                db = str(a.root / "state" / "agw.db")
                deadline = time.monotonic() + 20
                while _outbox_rows(db) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert not _outbox_rows(db)
                tb.stop_relay()
                await asyncio.to_thread(_wait_link, a, False)
                for i in range(n):
                    await alice.send("dev-b/bob", f"m{i}".encode())  # PUBACKed: stored by dev-a
            deadline = time.monotonic() + 20
            while len(rows := _outbox_rows(db)) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            stored_at = int(time.time() * 1000)
            # Handed over: stored due only later (not read back by `due`) with the first attempt counted, though
            # never sent (the relay is down).
            later = stored_at + HANDOVER_DUE_MS // 2
            assert len(rows) == n and all(att == 1 and due > later for due, att in rows), rows
            a.stop(signal.SIGKILL)  # the copies in memory are gone
            tb.start_relay()
            a.start()
            await asyncio.to_thread(a.wait_ready, 60)
            got: list[bytes] = []
            # Well before the rows' own due time: the restart made them due at once.
            deadline = time.monotonic() + HANDOVER_DUE_MS / 2000
            while len(got) < n and time.monotonic() < deadline:
                try:
                    got.append((await bob.receive(timeout=max(0.1, deadline - time.monotonic()))).payload)
                except TimeoutError:
                    break
            await asyncio.sleep(2.0)  # a second copy, if any, would arrive now
            while True:
                try:
                    got.append((await bob.receive(timeout=0.5)).payload)
                except TimeoutError:
                    break
        assert sorted(got) == sorted(f"m{i}".encode() for i in range(n)), got
        assert _outbox_rows(db) == []  # acknowledged end to end
    finally:
        tb.close()
