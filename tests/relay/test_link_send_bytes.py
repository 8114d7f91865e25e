"""The relay link's send queue is bounded in bytes as well as in envelopes (16 KiB messages must not multiply the
gateway's memory): `send` waits while the queued envelopes' bytes would pass `send_queue_bytes`, and everything
queued still reaches the peer, in order, through a real relay."""

from __future__ import annotations

import asyncio

from websockets.protocol import State

from gateway.link import INLINE_WRITE_MAX, RelayLink, RelayLinkConfig
from gateway.protocol.link import Delivered
from tests.relay.conftest import RelayEnv, envelope, eventually, next_event

KIB = 1024


async def test_send_waits_while_the_queue_is_full_in_bytes(env: RelayEnv) -> None:
    # Nothing listens on port 1: the link never becomes ready, so nothing leaves the queue.
    cfg = RelayLinkConfig(url="wss://localhost:1/", ca_file=env.tls.ca_file, backoff_initial=0.1, backoff_max=0.5,
                          send_queue_bytes=64 * KIB)
    link = RelayLink(cfg, env.fleet.device("dev-a").token_provider)
    link.start()
    env.links.append(link)
    first, second = envelope("dev-a", "dev-b", b"x" * 40 * KIB), envelope("dev-a", "dev-b", b"y" * 40 * KIB)
    task = asyncio.create_task(link.send([first, second]))
    await eventually(lambda: link.queued == 1, what="the first envelope queued")
    await asyncio.sleep(0.3)
    assert not task.done() and link.queued == 1  # 80 KiB would pass the 64 KiB bound: the second waits
    task.cancel()


async def test_everything_queued_under_a_byte_bound_is_delivered_in_order(env: RelayEnv) -> None:
    await env.start()
    a, b = env.fleet.device("dev-a"), env.fleet.device("dev-b")
    la, lb = await env.link(a, send_queue_bytes=64 * KIB), await env.link(b)
    # One envelope larger than the bound still goes (alone) through an empty queue.
    sent = [envelope("dev-a", "dev-b", bytes([i]) * (40 * KIB)) for i in range(20)]
    sent.append(envelope("dev-a", "dev-b", b"z" * 100 * KIB))
    await asyncio.wait_for(la.send(sent), 20)
    got: list[object] = []
    while len(got) < len(sent):
        got.extend((await next_event(lb, Delivered, timeout=10)).envelopes)
    assert got == sent


async def test_send_on_an_idle_link_writes_before_it_returns(env: RelayEnv) -> None:
    """A lone send on an idle, authenticated link is written from the caller's task before `send` returns (the
    round trip: no wait for the writer task's turn of the loop); with the writer busy it is queued for the writer
    as before, and so is a second send in the same turn of the loop, or more than INLINE_WRITE_MAX bytes.
    Everything arrives once, in order."""
    await env.start()
    a, b = env.fleet.device("dev-a"), env.fleet.device("dev-b")
    la, lb = await env.link(a), await env.link(b)
    writes = _counting_writes(la)
    first = envelope("dev-a", "dev-b", b"first")
    await la.send([first])
    assert len(writes) == 1 and la.queued == 0  # written inline, before send returned
    async with la._write_lock:  # the writer (or another inline write) is busy: queued, not written here
        second, third = envelope("dev-a", "dev-b", b"second"), envelope("dev-a", "dev-b", b"third")
        await la.send([second])
        await la.send([third])
        assert len(writes) == 1 and la.queued == 2
    await eventually(lambda: la.queued == 0, what="the writer task sent the queued envelopes")
    # In one turn of the loop only the first send is written inline; the next waits for the writer (a burst of
    # small sends still leaves in few frames). Past INLINE_WRITE_MAX bytes queued, the writer writes.
    n = len(writes)
    fourth, fifth = envelope("dev-a", "dev-b", b"fourth"), envelope("dev-a", "dev-b", b"fifth")
    await la.send([fourth])
    await la.send([fifth])
    assert len(writes) == n + 1 and la.queued == 1
    await eventually(lambda: la.queued == 0, what="the writer task sent the fifth")
    await asyncio.sleep(0)
    large = envelope("dev-a", "dev-b", b"L" * (INLINE_WRITE_MAX + 1))
    n = len(writes)
    await la.send([large])
    assert len(writes) == n and la.queued == 1
    got: list[object] = []
    while len(got) < 6:
        got.extend((await next_event(lb, Delivered, timeout=10)).envelopes)
    assert got == [first, second, third, fourth, fifth, large]


def _counting_writes(link: RelayLink) -> list[bytes]:
    """The frames `link` writes to its connection, recorded (and written)."""
    assert link._ws is not None
    writes: list[bytes] = []
    real_send = link._ws.send

    async def counting(msg: bytes) -> None:
        writes.append(msg)
        await real_send(msg)

    link._ws.send = counting  # type: ignore[method-assign]
    return writes


async def test_a_send_on_a_closing_connection_is_not_written_by_the_caller(env: RelayEnv) -> None:
    """A connection that is closing (a keepalive timeout: the link still reads READY) is not written from the
    caller's task: `ws.send` would wait out the close handshake (10 s for a relay that went silent), and the agent
    loop, which sends after each stored batch, with it. The envelope waits for the writer."""
    await env.start()
    a, b = env.fleet.device("dev-a"), env.fleet.device("dev-b")
    la, lb = await env.link(a), await env.link(b)
    writes = _counting_writes(la)
    assert la._ws is not None
    la._ws.protocol.state = State.CLOSING  # (as `fail()` leaves it until the close handshake ends)
    held = envelope("dev-a", "dev-b", b"while closing")
    async with asyncio.timeout(1):
        await la.send([held])
    assert writes == [] and la.queued == 1
    la._ws.protocol.state = State.OPEN  # (not closed after all: the writer sends it)
    la._wake.set()
    assert list((await next_event(lb, Delivered, timeout=10)).envelopes) == [held]


async def test_a_send_behind_pending_requests_is_left_to_the_writer(env: RelayEnv) -> None:
    """Frames already pending in the protocol (requests such as a group send, up to 1 MiB) are the writer's to
    write: a send behind them is not written from the caller's task, which would then write them too."""
    await env.start()
    a, b = env.fleet.device("dev-a"), env.fleet.device("dev-b")
    la, lb = await env.link(a), await env.link(b)
    writes = _counting_writes(la)
    assert la._link is not None
    async with la._write_lock:  # (the writer cannot collect it meanwhile)
        pending = envelope("dev-a", "dev-b", b"P" * (200 * KIB))
        la._link.send_envelopes([pending])  # a frame pending in the protocol, not in the link's queue
    small = envelope("dev-a", "dev-b", b"small")
    await la.send([small])
    assert writes == [] and la.queued == 1
    got: list[object] = []
    while len(got) < 2:
        got.extend((await next_event(lb, Delivered, timeout=10)).envelopes)
    assert got == [pending, small]
