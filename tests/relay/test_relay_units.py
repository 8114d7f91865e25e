"""Relay building blocks on their own: token buckets, the directory, the local router, configuration, and the
client's backoff generator and error classification."""

from __future__ import annotations

import itertools
import os
import ssl
from pathlib import Path

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, InvalidStatus, InvalidURI
from websockets.http11 import Response

from gateway.link import AuthRejectedError, RelayClosedError, TokenProviderError, backoff, is_retryable
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.link import AuthFailCode, DirectoryKind, ErrorCode, FrameError
from relay.config import ConfigError, RelayConfig
from relay.directory import Directory
from relay.limits import DeviceLimiter, TokenBucket
from relay.routing import LocalRouter, RouteResult


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_burst_then_rate() -> None:
    clock = FakeClock()
    b = TokenBucket(rate=2.0, burst=3.0, clock=clock)
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    clock.t = 0.5  # one token back
    assert b.take() and not b.take()
    clock.t = 100.0  # refills only up to the burst
    assert sum(b.take() for _ in range(10)) == 3


def test_device_limiter_counts_and_bytes_and_refund() -> None:
    clock = FakeClock()
    lim = DeviceLimiter(rate_envelopes=1, burst_envelopes=10, rate_bytes=1, burst_bytes=1000, rate_requests=1,
                        burst_requests=1, clock=clock, max_devices=2)
    assert lim.allow_envelope("a", 600)
    assert not lim.allow_envelope("a", 600)  # bytes exhausted; the count token is refunded
    assert sum(lim.allow_envelope("a", 1) for _ in range(20)) == 9  # 10 count tokens - the 1 spent
    assert lim.allow_envelope("b", 1)  # buckets are per device
    assert lim.allow_request("a") and not lim.allow_request("a")


def test_directory_bundle_replace_and_cap() -> None:
    d = Directory(max_devices=2, max_one_time=3)
    assert d.publish(DirectoryKind.PREKEYS, "a", b"b1", (b"1", b"2")) == 2
    assert d.publish(DirectoryKind.PREKEYS, "a", b"b2", (b"3", b"4")) == 3  # oldest dropped beyond the cap
    assert [d.fetch(DirectoryKind.PREKEYS, "a") for _ in range(4)] == [
        (b"b2", b"2"), (b"b2", b"3"), (b"b2", b"4"), (b"b2", None)]
    assert d.fetch(DirectoryKind.KEY_PACKAGES, "a") == (None, None)  # kinds are separate
    d.publish(DirectoryKind.PREKEYS, "b", b"x", ())
    d.publish(DirectoryKind.PREKEYS, "c", b"y", ())  # evicts the least recently published: a
    assert d.fetch(DirectoryKind.PREKEYS, "a") == (None, None)
    assert d.fetch(DirectoryKind.PREKEYS, "c") == (b"y", None)


class Sink:
    def __init__(self, room: int) -> None:
        self.room, self.got = room, []  # type: ignore[var-annotated]

    def offer(self, envelope: Envelope) -> bool:
        if len(self.got) >= self.room:
            return False
        self.got.append(envelope)
        return True


async def test_local_router() -> None:
    r = LocalRouter()
    env = Envelope(EnvelopeKind.PAIRWISE, os.urandom(16), "a", "b", b"")
    assert await r.route(env) is RouteResult.OFFLINE
    s1, s2 = Sink(1), Sink(5)
    assert r.register("b", s1) is None
    assert await r.route(env) is RouteResult.DELIVERED
    assert await r.route(env) is RouteResult.CONGESTED
    assert r.register("b", s2) is s1  # the caller closes the replaced connection
    r.unregister("b", s1)  # a stale unregister does not remove the new connection
    assert r.is_connected("b")
    r.unregister("b", s2)
    assert not r.is_connected("b")


def test_config_from_toml(tmp_path: Path) -> None:
    p = tmp_path / "relay.toml"
    p.write_text('[relay]\nport = 9000\naudience = "wss://relay.example"\nca_file = "/etc/agw/ca.pem"\n'
                 '[relay.link]\nmax_frame_size = 2097152\n')
    cfg = RelayConfig.from_toml(p, port=9100)
    assert cfg.port == 9100 and cfg.audience == "wss://relay.example" and cfg.ca_file == Path("/etc/agw/ca.pem")
    assert cfg.link.max_frame_size == 2097152
    p.write_text("[relay]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        RelayConfig.from_toml(p)
    with pytest.raises(ConfigError, match="max_envelope_size"):
        RelayConfig(max_envelope_size=2 * 1024 * 1024)


def test_backoff_is_jittered_exponential_and_capped() -> None:
    delays = list(itertools.islice(backoff(0.5, 8.0), 12))
    ceilings = [0.5, 1, 2, 4, 8, 8, 8, 8, 8, 8, 8, 8]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len({round(d, 9) for d in delays}) > 6  # jittered, not a fixed ladder


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (OSError("connection refused"), True),
        (TimeoutError(), True),
        (ConnectionClosedError(None, None), True),
        (FrameError("bad"), True),
        (TokenProviderError("busy"), True),
        (AuthRejectedError(AuthFailCode.EXPIRED, "clock"), True),
        (AuthRejectedError(AuthFailCode.REVOKED, "x"), False),
        (AuthRejectedError(AuthFailCode.UNTRUSTED, "x"), False),
        (RelayClosedError(ErrorCode.IDLE, "x"), True),
        (RelayClosedError(ErrorCode.REVOKED, "x"), False),
        (ssl.SSLCertVerificationError("bad cert"), False),
        (InvalidURI("ws:x", "bad"), False),
        (InvalidStatus(Response(503, "busy", Headers())), True),
        (InvalidStatus(Response(404, "no", Headers())), False),
        (TypeError("bug"), False),
    ],
)
def test_error_classification(exc: BaseException, retry: bool) -> None:
    assert is_retryable(exc) is retry
