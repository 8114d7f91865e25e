"""Link lifecycle over real WSS: relay restart and reconnect, token refresh, revocation within seconds,
transport settings (TCP_NODELAY, no compression), metrics and logs without payload bytes."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
import urllib.request

import pytest
from websockets.asyncio.client import connect

from gateway.link import AuthRejectedError, LinkReady, LinkStatus, RelayClosedError
from gateway.protocol.link import AuthFailCode, Delivered, ErrorCode
from relay.logs import JsonFormatter
from tests.relay.conftest import RelayEnv, envelope, eventually, next_event


async def test_reconnect_after_relay_restart(env: RelayEnv) -> None:
    relay = await env.start()
    port = relay.port
    la = await env.link(env.fleet.device("dev-a"))
    lb = await env.link(env.fleet.device("dev-b"))
    await relay.stop()
    await eventually(lambda: la.state in (LinkStatus.BACKOFF, LinkStatus.CONNECTING), what="link noticing")
    assert la.last_error is not None
    await asyncio.sleep(0.5)  # a few failed attempts while the relay is down
    assert la.state is not LinkStatus.FAILED
    await env.start(port=port)
    await la.wait_ready(10)
    await lb.wait_ready(10)
    assert la.connects == 2 and lb.connects == 2
    ready = [await next_event(la, LinkReady), await next_event(la, LinkReady)]
    assert [r.device_id for r in ready] == ["dev-a", "dev-a"]
    e = envelope("dev-a", "dev-b")
    await la.send([e])
    assert (await next_event(lb, Delivered)).envelopes == (e,)


async def test_token_refresh_on_live_connection(env: RelayEnv) -> None:
    relay = await env.start()
    dev = env.fleet.device("dev-refresh")
    dev.lifetime = 3  # refresh due after 80% of 3 s
    link = await env.link(dev)
    peer = await env.link(env.fleet.device("dev-peer"))
    (conn,) = [c for c in relay.connections if c.link.device_id == "dev-refresh"]
    first_expiry = conn.link.expires_at
    await eventually(lambda: dev.tokens_minted >= 2, timeout=6, what="a refreshed token")
    await eventually(lambda: conn.link.expires_at > first_expiry, what="relay accepting the new token")
    assert link.connects == 1 and link.state is LinkStatus.READY
    e = envelope("dev-refresh", "dev-peer")
    await link.send([e])
    assert (await next_event(peer, Delivered)).envelopes == (e,)


async def test_revocation_disconnects_within_seconds(env: RelayEnv) -> None:
    relay = await env.start()
    bad, good = env.fleet.device("dev-stolen"), env.fleet.device("dev-good")
    lbad, lgood = await env.link(bad), await env.link(good)
    env.fleet.revoked = [bad.cert.serial_number]
    t0 = time.monotonic()
    env.crl_file.write_bytes(env.fleet.crl_pem())
    await eventually(lambda: lbad.state is LinkStatus.FAILED, timeout=5, what="revoked device cut off")
    assert time.monotonic() - t0 < 3
    assert isinstance(lbad.fatal_error, RelayClosedError) and lbad.fatal_error.code is ErrorCode.REVOKED
    assert lgood.state is LinkStatus.READY
    assert relay.metrics.crl_reloads.labels("ok")._value.get() == 1
    # And it cannot come back: authentication is refused as revoked, which the client treats as fatal.
    again = await env.link(bad, wait=False)
    await eventually(lambda: again.state is LinkStatus.FAILED, what="revoked device refused")
    assert isinstance(again.fatal_error, AuthRejectedError) and again.fatal_error.code is AuthFailCode.REVOKED


async def test_bad_crl_is_ignored_and_old_list_kept(env: RelayEnv) -> None:
    from tests.relay.conftest import make_fleet

    relay = await env.start()
    link = await env.link(env.fleet.device("dev-a"))
    impostor = make_fleet()  # a CRL signed by another CA must not be accepted
    env.crl_file.write_bytes(impostor.crl_pem())
    await eventually(lambda: relay.metrics.crl_reloads.labels("failed")._value.get() == 1, what="CRL rejected")
    assert link.state is LinkStatus.READY


async def test_tcp_nodelay_and_no_compression(env: RelayEnv) -> None:
    relay = await env.start()
    link = await env.link(env.fleet.device("dev-a"))
    (conn,) = relay.connections
    server_sock = conn.ws.transport.get_extra_info("socket")
    assert server_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert link._ws is not None
    client_sock = link._ws.transport.get_extra_info("socket")
    assert client_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert conn.ws.protocol.extensions == [] and link._ws.protocol.extensions == []
    # Even a client that offers permessage-deflate gets no compression from the relay.
    ws = await connect(env.url, ssl=ssl.create_default_context(cafile=str(env.tls.ca_file)), proxy=None,
                       compression="deflate")
    assert "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")
    assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
    assert ws.protocol.extensions == []
    assert ws.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
    await ws.close()


async def test_metrics_and_logs_carry_no_payload(env: RelayEnv, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    relay = await env.start(metrics_port=0)
    assert relay.metrics_port is not None
    la = await env.link(env.fleet.device("dev-a"))
    lb = await env.link(env.fleet.device("dev-b"))
    marker = b"SECRET-PAYLOAD-MARKER-0123456789"
    e = envelope("dev-a", "dev-b", marker)
    await la.send([e, envelope("dev-a", "dev-offline", marker)])
    await next_event(lb, Delivered)
    url = f"http://127.0.0.1:{relay.metrics_port}/metrics"
    body = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    assert "agw_relay_envelopes_routed_total 1.0" in body
    assert 'agw_relay_envelopes_undeliverable_total{reason="offline"} 1.0' in body
    assert "agw_relay_connections 2.0" in body
    assert "agw_relay_received_bytes_total" in body and "agw_relay_auth_failures_total" in body
    assert "dev-a" not in body  # no per-device labels
    fmt = JsonFormatter()
    lines = [fmt.format(r) for r in caplog.records]
    assert any(json.loads(line).get("event") == "auth_ok" for line in lines)
    for line in lines:
        assert "SECRET-PAYLOAD" not in line and marker.hex() not in line


async def test_expired_token_without_refresh_is_closed(env: RelayEnv) -> None:
    relay = await env.start(expiry_grace=0.0)
    dev = env.fleet.device("dev-lazy")
    dev.lifetime = 1
    link = await env.link(dev, refresh_fraction=100.0)  # never refreshes in time
    await eventually(lambda: relay.metrics.closed.labels("token_expired")._value.get() == 1, timeout=5,
                     what="relay closing the expired connection")
    await eventually(lambda: link.connects >= 2 and link.state is LinkStatus.READY, what="client reconnecting")
    assert link.status()["state"] == "ready" and link.status()["device_id"] == "dev-lazy"


async def test_same_device_reconnecting_replaces_old_connection(env: RelayEnv) -> None:
    relay = await env.start()
    dev = env.fleet.device("dev-twice")
    old = await env.raw(dev)
    peer = await env.link(env.fleet.device("dev-peer"))
    new = await env.link(dev)
    (ev,) = await old.recv_events()
    assert ev.code is ErrorCode.REPLACED
    await eventually(lambda: len(relay.connections) == 2, what="old connection gone")
    e = envelope("dev-peer", "dev-twice")
    await peer.send([e])
    assert (await next_event(new, Delivered)).envelopes == (e,)


async def test_callback_api_and_queueing_while_relay_is_down(env: RelayEnv) -> None:
    """With `on_event`, events arrive by callback (LinkReady, Delivered, LinkLost); envelopes sent while the
    relay is down wait in the link's queue and go out after the reconnect."""
    from gateway.link import LinkEvent, LinkLost, RelayLink

    relay = await env.start()
    port = relay.port
    got: list[LinkEvent] = []

    async def on_event(ev: LinkEvent) -> None:
        got.append(ev)

    a = env.fleet.device("dev-a")
    la = RelayLink(env.link_config(), a.token_provider, on_event=on_event)
    la.start()
    env.links.append(la)
    await la.wait_ready(5)
    await relay.stop()
    await eventually(lambda: any(isinstance(e, LinkLost) for e in got), what="LinkLost by callback")
    # Addressed to itself, so the recipient is certainly online when the queue flushes after the reconnect.
    queued = [envelope("dev-a", "dev-a", b"sent while down")]
    await la.send(queued)
    assert la.queued == 1
    await env.start(port=port)
    await eventually(lambda: any(isinstance(e, Delivered) for e in got), timeout=10, what="delivery after restart")
    delivered = [e for e in got if isinstance(e, Delivered)]
    assert delivered[0].envelopes == tuple(queued) and la.queued == 0
    assert [type(e).__name__ for e in got if not isinstance(e, Delivered)] == ["LinkReady", "LinkLost", "LinkReady"]
