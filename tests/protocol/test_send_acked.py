"""The outbox rows of messages the peer acknowledged (gateway/sending.py, ACKED_WAIT_MAX): deleted in the next
ingest commit, not in a transaction of their own at the ACK; without ingest, at most ACKED_WAIT_MAX later in one
of their own; at once past ACKED_PENDING_MAX ids; at shutdown. Meanwhile they are not sent again, not audited as
expired, and a rolled-back ingest leaves them waiting (deleted later, counted once). On a real store, the relay
link and the pairwise sessions faked as in test_send_handover.py; the ACK goes through `_on_delivered`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway import sending
from gateway.protocol.envelope import EnvelopeKind
from gateway.protocol.message import InnerMessage, Kind
from gateway.receiving import Receiving
from gateway.sending import ACKED_PENDING_MAX, ACKED_WAIT_MAX
from gateway.store import Store, StoreError
from tests.protocol.test_send_handover import T0, Sender
from tests.protocol.test_send_ingest import publish
from tests.store.conftest import SoftStorageKey


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    now = [T0]
    monkeypatch.setattr(sending, "now_ms", lambda: now[0])
    return now


class AckedSender(Sender, Receiving):
    """The sender over a real store, and the receiving half's `_on_delivered` for the peer's ACKs (decryption
    faked: each envelope is the ACK given)."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.statements: list[str] = []
        store._db._live().set_trace_callback(self.statements.append)

    def _open(self, env: object) -> list[tuple[InnerMessage, bytes]]:
        return [(env.ack, b"")]  # type: ignore[attr-defined]

    async def ack(self, ids: list[bytes]) -> None:
        """One frame of ACKs naming `ids` (1,024 per ACK)."""
        await self._on_delivered(tuple(  # type: ignore[arg-type]
            SimpleNamespace(kind=EnvelopeKind.PAIRWISE_BATCH, sender="dev-b", ack=InnerMessage(
                Kind.ACK, bytes(16), "gateway", "gateway", 1, 2, ids=tuple(ids[i:i + 1024])))
            for i in range(0, len(ids), 1024)))

    def outbox_deletes(self) -> int:
        return sum(s.startswith("DELETE FROM outbox") for s in self.statements)


async def _sent(s: AckedSender, n: int) -> list[bytes]:
    """Store `n` messages and let the sender send them; their ids."""
    await s.feed(*(publish(i, f"m{i}".encode()) for i in range(1, n + 1)))
    await s.pass_()
    ids = list(s._inflight["dev-b"])
    assert len(ids) == n and s.store.outbox.depth() == n
    return ids


async def test_the_acknowledged_rows_go_in_the_next_ingest_commit(tmp_path: Path, clock: list[int]) -> None:
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        s = AckedSender(store)
        loop = asyncio.create_task(s._sender_loop())
        try:
            s.link.state.value = "ready"
            ids = await _sent(s, 5)
            s.statements.clear()
            await s.ack(ids[:4])
            assert s.outbox_deletes() == 0 and store.outbox.depth() == 5  # not in the ACK's transaction
            assert list(s._acked) == ids[:4] and s._acked_due is not None and not s._inflight["dev-b"].keys() & {
                *ids[:4]}
            s.statements.clear()
            await s.feed(publish(100, b"next"))
            # One transaction: BEGIN, the deletes, the new row, COMMIT (no transaction of their own).
            commits = [i for i, st in enumerate(s.statements) if st == "COMMIT"]
            deletes = [i for i, st in enumerate(s.statements) if st.startswith("DELETE FROM outbox")]
            inserts = [i for i, st in enumerate(s.statements) if st.startswith("INSERT OR IGNORE INTO outbox")]
            assert len(deletes) == 1 and len(inserts) == 1 and deletes[0] < inserts[0] < commits[0]
            assert store.outbox.depth() == 2 and s.counters.acked == 4
            assert not s._acked and s._acked_due is None
            assert {e.msg_id for e in store.outbox.entries()} >= {ids[4]}
        finally:
            loop.cancel()


async def test_without_ingest_they_go_within_the_bound_in_a_transaction_of_their_own(
        tmp_path: Path, clock: list[int]) -> None:
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        s = AckedSender(store)
        loop = asyncio.create_task(s._sender_loop())
        try:
            s.link.state.value = "ready"
            ids = await _sent(s, 5)
            await s.ack(ids)
            await s.ack(ids[:2])  # (a second ACK of the same ids: counted once)
            assert store.outbox.depth() == 5
            await asyncio.sleep(ACKED_WAIT_MAX / 2)
            assert store.outbox.depth() == 5
            await asyncio.sleep(ACKED_WAIT_MAX)
            assert store.outbox.depth() == 0 and s.counters.acked == 5
            assert not s._acked and s._acked_due is None
        finally:
            loop.cancel()


async def test_past_the_bound_they_go_at_once(tmp_path: Path, clock: list[int]) -> None:
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        s = AckedSender(store)
        loop = asyncio.create_task(s._sender_loop())
        try:
            s.link.state.value = "ready"
            ids = await _sent(s, 3)
            await s.ack(ids[:1])
            others = [i.to_bytes(16, "big") for i in range(ACKED_PENDING_MAX - 3)]
            await s.ack([*ids[1:], *others[:1000]])
            await s.ack(others[1000:-1])
            assert store.outbox.depth() == 3 and len(s._acked) == ACKED_PENDING_MAX - 1  # under the bound: waiting
            await s.ack(others[-1:])
            assert store.outbox.depth() == 3  # (not inside the ACK's own transaction ...)
            for _ in range(3):
                await asyncio.sleep(0)
            assert store.outbox.depth() == 0 and not s._acked  # (... but at the next turn of the loop)
            assert s.counters.acked == 3 and s._acked_due is None
        finally:
            loop.cancel()


async def test_meanwhile_they_are_not_sent_again_nor_audited_as_expired(
        tmp_path: Path, clock: list[int]) -> None:
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        s = AckedSender(store)
        loop = asyncio.create_task(s._sender_loop())
        try:
            s.link.state.value = "ready"
            ids = await _sent(s, 4)
            await s.ack(ids[:2])
            store.outbox.reschedule_peer("dev-b", clock[0])  # every row due now (e.g. the peer came back)
            s._inflight.clear()
            records = {e.msg_id: e.record for e in store.outbox.entries()}
            sent = await s.pass_()
            assert sent == [ids[2]]  # one batch: only the two not acknowledged
            assert s.link.sent[-1].ciphertext == records[ids[2]] + records[ids[3]]
            s._acked_due.cancel()  # type: ignore[union-attr]
            s._acked_due = None  # (the rows stay until their expiry ...)
            clock[0] += 3_600_000 + 1
            await s.pass_()
            assert store.outbox.depth() == 0
            expired = [e.event for e in store.audit.entries() if e.event.get("type") == "message.expired"]
            assert len(expired) == 2  # (... which audits the two not acknowledged only)
        finally:
            loop.cancel()


async def test_a_rolled_back_ingest_leaves_them_waiting(tmp_path: Path, clock: list[int],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        s = AckedSender(store)
        loop = asyncio.create_task(s._sender_loop())
        try:
            s.link.state.value = "ready"
            ids = await _sent(s, 3)
            monkeypatch.setattr(sending, "ACKED_WAIT_MAX", 30.0)  # (only the ingest may take them)
            await s.ack(ids)
            put_many, failures = store.outbox.put_many, []

            def failing(*args: object, **kwargs: object) -> int:
                if not failures:
                    failures.append(1)
                    raise StoreError("disk I/O error")
                return put_many(*args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(store.outbox, "put_many", failing)
            await s.feed(publish(100, b"next"))  # (fails once, stored at the retry a second later)
            assert failures == [1] and store.outbox.depth() == 1 and s.counters.acked == 3
            assert not s._acked and s._acked_due is None
        finally:
            loop.cancel()


async def test_at_shutdown_they_go_before_the_store_closes(tmp_path: Path, clock: list[int]) -> None:
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        s = AckedSender(store)
        loop = asyncio.create_task(s._sender_loop())
        try:
            s.link.state.value = "ready"
            ids = await _sent(s, 3)
            await s.ack(ids[1:])
            s._close_sending()
            assert store.outbox.depth() == 1 and s.counters.acked == 2 and s._acked_due is None
        finally:
            loop.cancel()
