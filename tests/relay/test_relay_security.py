"""Bad input closes only the offending connection, with a reason; authentication is enforced."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.link import AuthRejectedError, LinkStatus
from gateway.protocol.link import (
    AuthFailCode,
    AuthRejected,
    Delivered,
    ErrorCode,
    LinkState,
    RemoteError,
)
from tests.relay.conftest import RawClient, RelayEnv, envelope, eventually, make_fleet, next_event


async def expect_closed_with(raw: RawClient, code: ErrorCode, ws_code: int = 1008) -> RemoteError:
    """The relay sends ERROR(code) and then closes the WebSocket with `ws_code`."""
    events = await raw.recv_events()
    assert len(events) == 1 and isinstance(events[0], RemoteError), events
    assert events[0].code is code
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(raw.ws.recv(), 5)
    assert raw.ws.close_code == ws_code
    return events[0]


async def others_unaffected(env: RelayEnv) -> None:
    """Two well-behaved gateways still route through the relay."""
    la = await env.link(env.fleet.device("ok-a"))
    lb = await env.link(env.fleet.device("ok-b"))
    e = envelope("ok-a", "ok-b")
    await la.send([e])
    assert (await next_event(lb, Delivered)).envelopes == (e,)


async def test_sender_spoofing_rejected(env: RelayEnv) -> None:
    await env.start()
    victim_link = await env.link(env.fleet.device("dev-victim"))
    raw = await env.raw(env.fleet.device("dev-mallory"))
    raw.link.state = LinkState.READY
    # Build the frame by hand: ClientLink itself would happily send it; the relay must refuse.
    forged = envelope("dev-victim", "ok-b")
    raw.link.send_envelopes([forged])
    await raw.flush()
    err = await expect_closed_with(raw, ErrorCode.SPOOFED_SENDER)
    assert "dev-victim" in err.reason
    assert victim_link.state is LinkStatus.READY
    await others_unaffected(env)


async def test_garbage_before_auth(env: RelayEnv) -> None:
    await env.start()
    raw = await env.raw()
    await raw.recv_events()  # the CHALLENGE
    await raw.ws.send(b"\x00garbage that is not a frame")
    err = await expect_closed_with(raw, ErrorCode.PROTOCOL)
    assert "version" in err.reason
    await others_unaffected(env)


async def test_envelopes_before_auth_rejected(env: RelayEnv) -> None:
    await env.start()
    raw = await env.raw()
    await raw.recv_events()
    raw.link.state = LinkState.READY  # skip authentication on purpose
    raw.link.send_envelopes([envelope("dev-a", "dev-b")])
    await raw.flush()
    err = await expect_closed_with(raw, ErrorCode.PROTOCOL)
    assert "unexpected Envelopes" in err.reason


async def test_text_message_rejected(env: RelayEnv) -> None:
    await env.start()
    raw = await env.raw(env.fleet.device("dev-a"))
    await raw.ws.send("hello")
    await expect_closed_with(raw, ErrorCode.PROTOCOL)


async def test_oversized_frame_closes_only_that_connection(env: RelayEnv) -> None:
    await env.start()
    bystander = await env.link(env.fleet.device("dev-bystander"))
    raw = await env.raw(env.fleet.device("dev-big"), max_size=None)
    await raw.ws.send(b"\x01\x10" + b"\x00" * (1024 * 1024 + 10))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(raw.ws.recv(), 5)
    assert raw.ws.close_code == 1009  # message too big
    assert bystander.state is LinkStatus.READY
    await others_unaffected(env)


async def test_auth_timeout(env: RelayEnv) -> None:
    await env.start(auth_timeout=0.5)
    raw = await env.raw()
    await raw.recv_events()  # CHALLENGE, then silence
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await expect_closed_with(raw, ErrorCode.AUTH_TIMEOUT)
    assert loop.time() - t0 < 3


async def test_idle_timeout_and_keepalive(env: RelayEnv) -> None:
    await env.start(idle_timeout=3.0)
    link = await env.link(env.fleet.device("dev-keepalive"))  # told to send at least every 1 s: it pings
    raw = await env.raw(env.fleet.device("dev-silent"))
    await expect_closed_with(raw, ErrorCode.IDLE)
    await asyncio.sleep(1.0)
    assert link.state is LinkStatus.READY and link.connects == 1


async def test_untrusted_certificate_is_fatal(env: RelayEnv) -> None:
    await env.start()
    stranger = make_fleet().device("dev-a")  # same name, another fleet's CA
    link = await env.link(stranger, wait=False)
    await eventually(lambda: link.state is LinkStatus.FAILED, what="fatal failure")
    assert isinstance(link.fatal_error, AuthRejectedError)
    assert link.fatal_error.code is AuthFailCode.UNTRUSTED
    assert link.connects == 1  # not retried


async def test_token_for_another_challenge_rejected(env: RelayEnv) -> None:
    await env.start()
    dev = env.fleet.device("dev-replay")
    raw = await env.raw()
    (challenge,) = await raw.recv_events()
    raw.link.authenticate(dev.token_provider(b"\x00" * 32, challenge.audience))
    await raw.flush()
    (ev,) = await raw.recv_events()
    assert isinstance(ev, AuthRejected) and ev.code is AuthFailCode.INVALID_TOKEN
    assert "challenge" in ev.reason
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(raw.ws.recv(), 5)


async def test_wrong_audience_rejected(env: RelayEnv) -> None:
    await env.start()
    dev = env.fleet.device("dev-aud")
    raw = await env.raw()
    (challenge,) = await raw.recv_events()
    raw.link.authenticate(dev.token_provider(challenge.nonce, "some-other-relay"))
    await raw.flush()
    (ev,) = await raw.recv_events()
    assert isinstance(ev, AuthRejected) and "audience" in ev.reason


async def test_tls12_client_refused(env: RelayEnv) -> None:
    await env.start()
    ctx = ssl.create_default_context(cafile=str(env.tls.ca_file))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(OSError):  # ssl.SSLError (protocol version) or a reset during the handshake
        await connect(env.url, ssl=ctx, proxy=None)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3  # control: the same context with TLS 1.3 allowed connects
    ws = await connect(env.url, ssl=ctx, proxy=None)
    assert ws.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
    await ws.close()


async def test_wrong_server_ca_is_fatal(env: RelayEnv, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.relay.conftest import _make_tls

    await env.start()
    other = _make_tls(tmp_path)
    link = await env.link(env.fleet.device("dev-a"), wait=False, ca_file=other.ca_file)
    await eventually(lambda: link.state is LinkStatus.FAILED, what="TLS verification failure")
    assert isinstance(link.fatal_error, ssl.SSLCertVerificationError)


async def test_connection_cap(env: RelayEnv) -> None:
    await env.start(max_connections=1)
    await env.link(env.fleet.device("dev-a"))
    with pytest.raises(InvalidStatus) as info:
        await env.raw()
    assert info.value.response.status_code == 503


async def test_server_name_is_checked(env: RelayEnv) -> None:
    await env.start()
    link = await env.link(env.fleet.device("dev-a"), wait=False, server_name="not-the-relay.example")
    await eventually(lambda: link.state is LinkStatus.FAILED, what="server name mismatch")
    assert isinstance(link.fatal_error, ssl.SSLCertVerificationError)
    assert "not-the-relay.example" in str(link.fatal_error)
