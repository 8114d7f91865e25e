"""Relay over real WSS/TLS 1.3 on loopback with real RelayLink clients: routing, UNDELIVERABLE, directory."""

from __future__ import annotations

import asyncio

from gateway.link import LinkReady, LinkStatus
from gateway.protocol.link import Delivered, DirectoryKind, NotDelivered, UndeliverableReason
from tests.relay.conftest import RelayEnv, envelope, next_event


async def test_routing_between_two_clients(env: RelayEnv) -> None:
    await env.start()
    a, b = env.fleet.device("dev-a"), env.fleet.device("dev-b")
    la, lb = await env.link(a), await env.link(b)
    assert la.state is LinkStatus.READY and la.device_id == "dev-a"
    await next_event(la, LinkReady)
    await next_event(lb, LinkReady)
    sent = [envelope("dev-a", "dev-b", f"msg {i}".encode()) for i in range(50)]
    await la.send(sent)
    got = []
    while len(got) < 50:
        ev = await next_event(lb, Delivered)
        got.extend(ev.envelopes)
    assert got == sent  # in order, intact
    back = envelope("dev-b", "dev-a", b"reply")
    await lb.send([back])
    assert (await next_event(la, Delivered)).envelopes == (back,)
    assert env.relay is not None
    assert env.relay.metrics.envelopes_routed._value.get() == 51


async def test_offline_recipient_is_undeliverable(env: RelayEnv) -> None:
    await env.start()
    la = await env.link(env.fleet.device("dev-a"))
    env_off = envelope("dev-a", "dev-nobody")
    await la.send([env_off])
    ev = await next_event(la, NotDelivered)
    assert ev == NotDelivered(UndeliverableReason.OFFLINE, (env_off.envelope_id,))


async def test_too_big_envelope_is_undeliverable_not_fatal(env: RelayEnv) -> None:
    await env.start(max_envelope_size=1000)
    a, b = env.fleet.device("dev-a"), env.fleet.device("dev-b")
    la, lb = await env.link(a), await env.link(b)
    big, small = envelope("dev-a", "dev-b", b"x" * 2000), envelope("dev-a", "dev-b", b"ok")
    await la.send([big, small])
    assert await next_event(la, NotDelivered) == NotDelivered(UndeliverableReason.TOO_BIG, (big.envelope_id,))
    assert (await next_event(lb, Delivered)).envelopes == (small,)
    assert la.state is LinkStatus.READY


async def test_directory_pops_one_time_prekeys_exactly_once(env: RelayEnv) -> None:
    await env.start()
    a, b, c = (env.fleet.device(n) for n in ("dev-a", "dev-b", "dev-c"))
    la, lb, lc = await env.link(a), await env.link(b), await env.link(c)
    keys = [f"otk-{i}".encode() for i in range(10)]
    assert await la.publish_prekeys(b"bundle-a", keys) == 10
    assert await la.publish_prekeys(b"mls-kp", [b"kp1"], kind=DirectoryKind.KEY_PACKAGES) == 1
    # Two peers fetch concurrently, 12 times in all: each one-time key is handed out once, then none.
    results = await asyncio.gather(*(
        (lb if i % 2 else lc).fetch_prekeys("dev-a", timeout=5) for i in range(12)
    ))
    assert all(r.bundle == b"bundle-a" and r.device_id == "dev-a" for r in results)
    popped = [r.one_time for r in results if r.one_time is not None]
    assert sorted(popped) == sorted(keys)
    assert sum(r.one_time is None for r in results) == 2
    kp = await lb.fetch_prekeys("dev-a", kind=DirectoryKind.KEY_PACKAGES)
    assert (kp.bundle, kp.one_time) == (b"mls-kp", b"kp1")
    nothing = await lb.fetch_prekeys("dev-unknown")
    assert (nothing.bundle, nothing.one_time) == (None, None)
