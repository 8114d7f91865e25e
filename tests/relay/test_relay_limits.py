"""Rate limits and backpressure: the relay refuses with UNDELIVERABLE instead of queueing without bound."""

from __future__ import annotations

import socket

from gateway.protocol.link import Delivered, NotDelivered, UndeliverableReason
from relay.server import RelayServer
from tests.relay.conftest import RelayEnv, envelope, eventually, next_event


def undeliverable(relay: RelayServer, reason: str) -> float:
    return relay.metrics.undeliverable.labels(reason)._value.get()


async def test_rate_limit_per_device(env: RelayEnv) -> None:
    relay = await env.start(rate_envelopes=1.0, burst_envelopes=5.0)
    la = await env.link(env.fleet.device("dev-a"))
    lb = await env.link(env.fleet.device("dev-b"))
    sent = [envelope("dev-a", "dev-b") for _ in range(30)]
    await la.send(sent)
    limited: list[bytes] = []
    while len(limited) < 20:
        ev = await next_event(la, NotDelivered)
        assert ev.reason is UndeliverableReason.RATE_LIMITED
        limited.extend(ev.envelope_ids)
    delivered: list[bytes] = []
    await eventually(lambda: relay.metrics.envelopes_routed._value.get() + undeliverable(relay, "rate_limited") == 30)
    while len(delivered) < relay.metrics.envelopes_routed._value.get():
        delivered.extend(e.envelope_id for e in (await next_event(lb, Delivered)).envelopes)
    assert 5 <= len(delivered) <= 8  # the burst, plus what refilled at 1/s while sending
    assert sorted(delivered + limited) == sorted(e.envelope_id for e in sent)
    assert relay.metrics.rate_limited._value.get() == len(limited)


async def test_directory_request_flood_closes_connection(env: RelayEnv) -> None:
    await env.start(rate_requests=0.1, burst_requests=3.0)
    raw = await env.raw(env.fleet.device("dev-flood"))
    for _ in range(5):
        raw.link.fetch_prekeys(1, "dev-x")  # type: ignore[arg-type]
    await raw.flush()
    codes = []
    for _ in range(4):
        codes.extend(type(e).__name__ for e in await raw.recv_events())
    assert codes == ["PrekeysReceived"] * 3 + ["RemoteError"]
    assert raw.link.state.value == "closed"


async def test_backpressure_slow_receiver(env: RelayEnv) -> None:
    limit = 256 * 1024
    relay = await env.start(send_queue_bytes=limit, send_queue_envelopes=100)
    sender = await env.link(env.fleet.device("dev-fast"))
    # A receiver that authenticates and then stops reading: its socket buffers fill and the relay's writer
    # for it blocks, so envelopes pile up in the relay's bounded queue for that connection.
    slow = await env.raw(env.fleet.device("dev-slow"), max_queue=1)
    slow.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    n, size = 400, 50_000
    await sender.send([envelope("dev-fast", "dev-slow", bytes(size)) for _ in range(n)])
    await eventually(
        lambda: relay.metrics.envelopes_routed._value.get() + undeliverable(relay, "congested") == n,
        timeout=20, what="all envelopes routed or refused",
    )
    congested = undeliverable(relay, "congested")
    assert congested > 0
    (conn,) = [c for c in relay.connections if c.link.device_id == "dev-slow"]
    assert conn.pending_bytes <= limit and len(conn.pending) <= 100
    seen = 0
    while seen < congested:
        ev = await next_event(sender, NotDelivered)
        assert ev.reason is UndeliverableReason.CONGESTED
        seen += len(ev.envelope_ids)
    assert seen == congested
    assert sender.state.value == "ready"


async def test_gateway_that_does_not_read_is_not_buffered_for(env: RelayEnv) -> None:
    """A gateway that floods the relay but never reads its answers (UNDELIVERABLE) makes the relay stop
    reading from it, instead of queueing answers without bound."""
    import asyncio

    from relay.server import MAX_PENDING_FRAMES

    relay = await env.start(rate_envelopes=1e9, burst_envelopes=1e9, rate_bytes=1e12, burst_bytes=1e12)
    raw = await env.raw(env.fleet.device("dev-deaf"), max_queue=1)
    raw.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    (conn,) = relay.connections
    conn.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    batch = [envelope("dev-deaf", "dev-offline") for _ in range(1000)]  # each frame earns a 16 KB answer

    async def flood() -> None:
        for _ in range(300):
            raw.link.send_envelopes(batch)
            await raw.flush()

    task = asyncio.create_task(flood())
    worst = 0
    for _ in range(150):
        await asyncio.sleep(0.01)
        worst = max(worst, conn.link.pending_output)
    assert not task.done()  # our sends block: the relay stopped reading from us
    assert worst <= MAX_PENDING_FRAMES + 1
    assert undeliverable(relay, "offline") < 300 * 1000
    task.cancel()
