"""The receiver handles a frame from the relay in slices (`Receiving._on_delivered`, RECEIVE_SLICE): at most
RECEIVE_SLICE data messages are admitted, stored and handed to the broker at once, in the frame's order, each
message exactly once, with the publish backlog checked again before every slice but the first (the caller checks
it before the frame). A frame may carry the sender's whole window (512 messages per peer), so before this all of
it was decoded, stored and handed to paho at once: the receiver's peak memory (docs/performance.md, branch mem7).
ACKs and REJECTs among the messages are handled when their envelope is opened, in that slice's decrypt
transaction."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import receiving
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.message import InnerMessage, Kind, new_message_id
from gateway.receiving import PUBLISH_BACKLOG, RECEIVE_SLICE, Receiving
from gateway.sending import SEND_WINDOW


def _data(n: int) -> InnerMessage:
    return InnerMessage(kind=Kind.DATA, message_id=n.to_bytes(16, "big"), sender_agent="alice",
                        recipient_agent="bob", created_at_ms=1, expires_at_ms=10**13, payload=b"p")


def _ack(ids: tuple[bytes, ...]) -> InnerMessage:
    return InnerMessage(kind=Kind.ACK, message_id=new_message_id(), sender_agent="gateway",
                        recipient_agent="gateway", created_at_ms=1, expires_at_ms=10**13, ids=ids)


def _receiver(opened: dict[int, list[InnerMessage]]) -> Any:
    """A receiver whose envelopes open to the given messages (by envelope id) and whose slice handler records
    each slice, the transactions and waits around it, and how many messages are handed over at once."""
    log: list[tuple[str, Any]] = []

    @contextmanager
    def transaction(*, durable: bool = True):  # type: ignore[no-untyped-def]
        log.append(("transaction", None))
        yield
        log.append(("commit", None))

    async def on_slice(data: list[tuple[str, InnerMessage, bytes]]) -> None:
        log.append(("slice", [int.from_bytes(inner.message_id, "big") for _, inner, _ in data]))
        r.held += len(data)
        r.max_held = max(r.max_held, r.held)

    async def wait_room() -> None:
        log.append(("wait", r.held))
        r.held = 0  # (the broker caught up)

    r = SimpleNamespace(
        store=SimpleNamespace(delivered=SimpleNamespace(fold_due=False), transaction=transaction,
                              outbox=SimpleNamespace(delete_many=lambda ids: len(ids))),
        book=SimpleNamespace(flush=lambda: log.append(("flush", None))),
        counters=SimpleNamespace(acked=0), _fold_after=0.0,
        _open=lambda env: [(m, m.encode()) for m in opened[int.from_bytes(env.envelope_id, "big")]],
        _settled=lambda peer, ids: log.append(("acked", len(ids))),
        _handover=SimpleNamespace(remove=lambda peer, ids: None),
        _on_slice=on_slice, _wait_publish_room=wait_room, log=log, held=0, max_held=0)
    r._open_slice = lambda *a: Receiving._open_slice(r, *a)  # type: ignore[arg-type]
    return r


def _envelopes(sizes: list[int]) -> tuple[tuple[Envelope, ...], dict[int, list[InnerMessage]]]:
    opened: dict[int, list[InnerMessage]] = {}
    n = 0
    envs = []
    for i, size in enumerate(sizes):
        opened[i] = [_data(n + k) for k in range(size)]
        n += size
        envs.append(Envelope(EnvelopeKind.PAIRWISE_BATCH, i.to_bytes(16, "big"), "dev-a", "dev-b", b"w"))
    return tuple(envs), opened


@pytest.mark.parametrize("sizes", [
    [RECEIVE_SLICE, RECEIVE_SLICE],  # the sender's window: two full batches
    [200, 200, 100],  # a slice takes the next envelope's first messages, the rest go into the next slice
    [3 * RECEIVE_SLICE + 17],  # one large batch (another sender's): opened once, handled in four slices
    [1] * 600,  # many single-message envelopes
    [5],
    [],
])
async def test_a_frame_is_handled_in_order_in_slices_of_at_most_receive_slice(sizes: list[int]) -> None:
    envs, opened = _envelopes(sizes)
    rx = _receiver(opened)
    await Receiving._on_delivered(rx, envs)
    slices = [ids for what, ids in rx.log if what == "slice"]
    total = sum(sizes)
    assert [i for s in slices for i in s] == list(range(total))  # every message once, in order
    assert all(len(s) <= RECEIVE_SLICE for s in slices)
    assert len(slices) == max(1, -(-total // RECEIVE_SLICE))  # no slice smaller than needed but the last
    # The backlog is checked before every slice but the first, never after the last.
    kinds = [what for what, _ in rx.log if what in ("slice", "wait")]
    assert kinds == ["slice"] + ["wait", "slice"] * (len(slices) - 1)
    assert rx.max_held <= RECEIVE_SLICE
    # Each decrypt transaction flushes the sessions before its commit, and comes before the slice it opened.
    for k, (what, _) in enumerate(rx.log):
        if what == "commit":
            assert rx.log[k - 1][0] == "flush"


async def test_the_senders_window_no_longer_reaches_the_broker_at_once() -> None:
    """The bound the receiver's memory follows: what a frame adds past PUBLISH_BACKLOG (the e2e test
    tests/e2e/test_publish_backlog.py checks it with real processes)."""
    assert RECEIVE_SLICE < SEND_WINDOW
    envs, opened = _envelopes([SEND_WINDOW // 2, SEND_WINDOW // 2])
    rx = _receiver(opened)
    await Receiving._on_delivered(rx, envs)
    assert rx.max_held <= RECEIVE_SLICE < SEND_WINDOW
    assert PUBLISH_BACKLOG + RECEIVE_SLICE < PUBLISH_BACKLOG + SEND_WINDOW


async def test_acks_in_a_frame_are_handled_when_their_envelope_is_opened() -> None:
    envs, opened = _envelopes([RECEIVE_SLICE, 1, RECEIVE_SLICE])
    opened[1] = [_ack((b"x" * 16, b"y" * 16))]  # an ACK from the peer between two batches
    rx = _receiver(opened)
    await Receiving._on_delivered(rx, envs)
    what = [w for w, _ in rx.log if w in ("slice", "acked", "transaction")]
    # Slice 1 is the first batch alone; the ACK is handled in the second slice's decrypt transaction.
    assert what == ["transaction", "slice", "transaction", "acked", "slice"]
    assert rx.counters.acked == 2


class _Rx(Receiving):
    """The receiving half over stub stores and a stub broker: what `_on_delivered` hands to the inbox and to the
    broker at once, and the ACKs it sends. The broker completes every exchange on the next turn of the loop."""

    def __init__(self, opened: dict[int, list[InnerMessage]]) -> None:
        self.opened = opened
        self.stored: list[list[bytes]] = []  # message ids per inbox commit
        self.handed: list[int] = []  # entries handed to the broker per call
        self.most_held = 0  # the most entries handed over and not complete at once
        self.acked: list[bytes] = []
        self._seq = 0
        self._fold_after = 0.0
        self._publishing: set[str] = set()
        self._finished: list[Any] = []
        self._publish_room = asyncio.Event()
        self.counters = SimpleNamespace(acked=0, duplicates=0)
        self.cfg = SimpleNamespace(store=SimpleNamespace(durability="power-loss"))
        self.book = SimpleNamespace(flush=lambda: None)
        self.pubrec_marks = SimpleNamespace(write=lambda **kw: None, forget=lambda: None)

        @contextmanager
        def transaction(*, durable: bool = True):  # type: ignore[no-untyped-def]
            yield

        delivered = SimpleNamespace(fold_due=False, keys=lambda ids: list(ids),
                                    seen_many=lambda ids, keys: set(),
                                    mark_many=lambda ids, t, keys: None)
        inbox = SimpleNamespace(put_many=lambda rows: self.stored.append(
            [bytes.fromhex(name.split("/")[1]) for name, _ in rows]))
        self.store = SimpleNamespace(delivered=delivered, transaction=transaction, inbox=inbox)

    def _open(self, env: Envelope) -> list[tuple[InnerMessage, bytes]]:
        return [(m, m.encode()) for m in self.opened[int.from_bytes(env.envelope_id, "big")]]

    def _admit(self, peer_device: str, inner: InnerMessage, settled: Any = None, seen: Any = None) -> Any:
        return receiving.PUBLISH

    def _give_packet_id(self, e: Any) -> bool:
        return True

    def _start_publishes(self, entries: list[Any], *, claimed: bool = False) -> Any:
        self.handed.append(len(entries))
        self.most_held = max(self.most_held, len(self._publishing))

        def complete() -> None:
            self._publishing.difference_update(e.name for e in entries)
            self._publish_room.set()

        asyncio.get_running_loop().call_soon(complete)
        return SimpleNamespace(under_way=set())

    def _in_background(self, coro: Any) -> None:
        coro.close()

    async def _send_acks(self, acks: dict[str, list[bytes]]) -> None:
        for ids in acks.values():
            self.acked.extend(ids)


async def test_a_full_window_frame_reaches_the_inbox_and_the_broker_a_slice_at_a_time() -> None:
    """The sender's whole window in one frame (two batches of 256): before slicing, one inbox commit of 512 and
    512 exchanges started at once; now at most RECEIVE_SLICE each, every message stored, handed and ACKed once,
    in order."""
    envs, opened = _envelopes([SEND_WINDOW // 2, SEND_WINDOW // 2])
    rx = _Rx(opened)
    await rx._on_delivered(envs)
    ids = [n.to_bytes(16, "big") for n in range(SEND_WINDOW)]
    assert [i for batch in rx.stored for i in batch] == ids
    assert rx.acked == ids
    assert max(len(batch) for batch in rx.stored) <= RECEIVE_SLICE < SEND_WINDOW
    assert max(rx.handed) <= RECEIVE_SLICE
    assert rx.most_held <= RECEIVE_SLICE  # (the earlier slice completed before the next was taken)


class _ConsentRx(_Rx):
    """`_Rx` with the real `_admit`'s consent caching: a (agent, peer) pair's answer is read from `self.consent` once
    per `settled` dict, and the duplicate check of the real `_admit` (`seen`)."""

    def __init__(self, opened: dict[int, list[InnerMessage]]) -> None:
        super().__init__(opened)
        self.consent = "allowed"
        self.refused: list[bytes] = []

    def _admit(self, peer_device: str, inner: InnerMessage, settled: Any = None, seen: Any = None) -> Any:
        if seen is not None and inner.message_id in seen:
            return receiving.ACK
        key = (inner.recipient_agent, peer_device, inner.sender_agent)
        if key not in settled:
            settled[key] = self.consent
        if settled[key] == "denied":
            self.refused.append(inner.message_id)
            return receiving.Verdict(False, None)
        return receiving.PUBLISH

    def _start_publishes(self, entries: list[Any], *, claimed: bool = False) -> Any:
        self.consent = "denied"  # the operator denies the peer while the first slice is with the broker
        return super()._start_publishes(entries, claimed=claimed)


async def test_a_consent_change_while_a_frame_waits_between_slices_holds_for_the_next_slice() -> None:
    """Review finding of 2026-12-07 (eleventh session): the allowed/denied answers were cached for the whole frame,
    and a frame may wait between two slices for as long as the broker is stalled; a denial made meanwhile was
    ignored for the rest of the frame. They are cached per slice now."""
    envs, opened = _envelopes([SEND_WINDOW // 2, SEND_WINDOW // 2])
    rx = _ConsentRx(opened)
    await rx._on_delivered(envs)
    ids = [n.to_bytes(16, "big") for n in range(SEND_WINDOW)]
    assert [i for batch in rx.stored for i in batch] == ids[:RECEIVE_SLICE]  # the first slice, allowed
    assert rx.refused == ids[RECEIVE_SLICE:]  # the second, after the denial


async def test_copies_of_an_id_within_and_across_slices_are_stored_once(tmp_path: Any) -> None:
    """With the real delivered ids (a store on disk): a frame of three slices carrying second copies of ids within
    the first slice, from the first into the second and from the second into the third stores each id once and
    acknowledges every copy; the same frame again stores nothing."""
    from gateway.store import Store
    from tests.store.conftest import SoftStorageKey

    sizes = [RECEIVE_SLICE, RECEIVE_SLICE, 10]
    envs, opened = _envelopes(sizes)
    opened[0][10] = _data(3)  # a copy within slice 1
    opened[1][5] = _data(100)  # slice 1 -> slice 2
    opened[2][0] = _data(RECEIVE_SLICE + 7)  # slice 2 -> slice 3
    unique = {m.message_id for ms in opened.values() for m in ms}
    assert len(unique) == sum(sizes) - 3
    with Store.open(tmp_path / "agw.db", SoftStorageKey()) as store:
        rx = _ConsentRx(opened)
        rx._start_publishes = super(_ConsentRx, rx)._start_publishes  # type: ignore[method-assign]  # (no denial)
        rx.store = SimpleNamespace(delivered=store.delivered, transaction=store.transaction, inbox=rx.store.inbox)
        await rx._on_delivered(envs)
        stored = [i for batch in rx.stored for i in batch]
        assert len(stored) == len(set(stored)) == len(unique)
        assert len(rx.acked) == sum(sizes)  # every copy acknowledged (the sender may have missed an ACK)
        rx.stored.clear()
        await rx._on_delivered(envs)  # the sender's retry of the whole frame
        assert rx.stored in ([], [[]])
        assert store.delivered.count() == len(unique)
