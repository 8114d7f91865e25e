"""RelayLink: the gateway's one outbound WSS link to the relay, a thin asyncio shell around `ClientLink`.

It keeps the link up forever: reconnect is iteration over a jittered exponential backoff generator, and
`is_retryable()` sorts errors into retryable (network, relay restart, protocol hiccup) and fatal (revoked
device, untrusted certificate, TLS verification failure) - after a fatal error the link stops and says why.
TLS is verified against a configured CA file with the server name checked; compression is off (ciphertext does
not compress) and TCP_NODELAY is set. The token is minted by an injected `token_provider(challenge, audience)`
(run in a worker thread because it may sign with hardware) and refreshed before it expires.

Envelopes handed to `send()` wait in a bounded queue; one writer task owns the socket and packs everything
queued into as few ENVELOPES frames as the limits allow, so batches grow exactly when the link is busy.
Envelopes lost with a dropped connection are not retried here: the store's outbox retries until the end-to-end
ack arrives, which is the only delivery guarantee that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.protocol import State

from gateway import stages
from gateway.protocol.envelope import Envelope
from gateway.protocol.errors import ProtocolError
from gateway.protocol.link import (
    AuthAccepted,
    AuthFailCode,
    AuthRejected,
    ChallengeReceived,
    ClientEvent,
    ClientLink,
    Delivered,
    DirectoryKind,
    ErrorCode,
    GroupResultReceived,
    LinkLimits,
    LinkState,
    NotDelivered,
    PrekeysReceived,
    PrekeysStoredEvent,
    RemoteError,
)

log = logging.getLogger("agw.link")

TokenProvider = Callable[[bytes, str], str]
# Envelope bytes `send` writes from the caller's task when the writer is idle (`_write_inline`): well under the
# connection's write buffer limit (websockets' default high-water mark, 32 KiB), so that write never waits for the
# relay to read (the caller, e.g. the agent loop, must not stall on it); more is left to the writer task.
INLINE_WRITE_MAX = 8 * 1024
_LIVE = (LinkState.READY, LinkState.REFRESH_REQUESTED, LinkState.REFRESH_CHALLENGED, LinkState.REFRESH_AUTHENTICATING)


class LinkStatus(enum.Enum):
    """What `agw status` shows."""

    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    BACKOFF = "backoff"
    CLOSED = "closed"
    FAILED = "failed"  # a fatal error: see RelayLink.fatal_error


class RelayLinkError(Exception):
    """Root of the link client's errors."""


class AuthRejectedError(RelayLinkError):
    def __init__(self, code: AuthFailCode, reason: str) -> None:
        super().__init__(f"relay refused authentication ({code.name}): {reason}")
        self.code = code


class RelayClosedError(RelayLinkError):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"relay closed the link ({code.name}): {reason}")
        self.code = code


class TokenProviderError(RelayLinkError):
    """The token provider failed (e.g. the hardware token was busy); retried."""


class LinkDownError(RelayLinkError):
    """The link went down or is closed while a request was waiting."""


@dataclass(frozen=True, slots=True)
class LinkReady:
    """The link (re)authenticated on a new connection: re-publish prekeys, resend the outbox."""

    device_id: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class LinkLost:
    reason: str


LinkEvent = Delivered | NotDelivered | LinkReady | LinkLost


def backoff(initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0) -> Iterator[float]:
    """Jittered exponential delays: each in [d/2, d] with d doubling up to `maximum`, forever."""
    delay = initial
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(maximum, delay * factor)


def is_retryable(exc: BaseException) -> bool:
    """Whether reconnecting can help. Fatal: revoked or untrusted identity, TLS verification, bad URL/status."""
    if isinstance(exc, AuthRejectedError):
        return exc.code not in (AuthFailCode.REVOKED, AuthFailCode.UNTRUSTED)
    if isinstance(exc, RelayClosedError):
        return exc.code is not ErrorCode.REVOKED
    if isinstance(exc, ssl.SSLCertVerificationError | InvalidURI):
        return False
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        return status >= 500 or status == 429
    return isinstance(exc, OSError | TimeoutError | ConnectionClosed | ProtocolError | RelayLinkError)


@dataclass(frozen=True, slots=True)
class RelayLinkConfig:
    url: str  # wss://host:port/
    ca_file: Path  # CA that signed the relay's TLS certificate
    server_name: str | None = None  # TLS name to check, when the URL's host is an address
    limits: LinkLimits = field(default_factory=LinkLimits)
    max_envelope_size: int = 256 * 1024
    open_timeout: float = 10.0
    request_timeout: float = 10.0
    refresh_fraction: float = 0.8  # refresh after this share of the token's remaining life
    send_queue: int = 10_000  # envelopes queued for the relay and not yet written ...
    send_queue_bytes: int = 2 * 1024 * 1024  # ... and their bytes: 10,000 envelopes of 16 KiB would be 160 MB
    event_queue: int = 10_000
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    ping_interval: float | None = 20.0


def client_ssl_context(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


class RelayLink:
    """`async with RelayLink(config, token_provider) as link:` then `send()`, `events()`, prekey calls."""

    def __init__(
        self,
        config: RelayLinkConfig,
        token_provider: TokenProvider,
        *,
        on_event: Callable[[LinkEvent], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.config = config
        self._token_provider = token_provider
        self._on_event = on_event
        self._status = LinkStatus.CLOSED
        self.fatal_error: BaseException | None = None
        self.last_error: str | None = None
        self.device_id: str | None = None
        self.expires_at: int | None = None
        self.connects = 0
        self._outgoing: asyncio.Queue[Envelope] = asyncio.Queue(config.send_queue)
        self._outgoing_bytes = 0  # sum of the queued envelopes' sizes
        self._room = asyncio.Event()  # set when the writer has taken envelopes off the queue
        self._events: asyncio.Queue[LinkEvent | None] = asyncio.Queue(config.event_queue)
        self._pending: dict[int, asyncio.Future[ClientEvent]] = {}
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()  # held while writing to the connection (the writer or `_write_inline`)
        self._wrote_inline = False  # `_write_inline` wrote in this turn of the event loop
        self._link: ClientLink | None = None
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()
        self._keepalive = 0.0  # per connection: from AUTH_OK
        self._refresh_at = float("inf")  # monotonic time to ask for a new challenge
        self._last_sent = 0.0

    @property
    def state(self) -> LinkStatus:
        return self._status

    @property
    def queued(self) -> int:
        return self._outgoing.qsize()

    def room(self) -> tuple[int, int]:
        """The send queue's free bytes and envelopes: what `send` takes now without waiting."""
        return (max(0, self.config.send_queue_bytes - self._outgoing_bytes),
                max(0, self.config.send_queue - self._outgoing.qsize()))

    def status(self) -> dict[str, object]:
        """A JSON-ready summary for `agw status --json`."""
        return {
            "state": self._status.value,
            "url": self.config.url,
            "device_id": self.device_id,
            "token_expires_at": self.expires_at,
            "connects": self.connects,
            "queued_envelopes": self.queued,
            "last_error": self.last_error,
            "fatal_error": None if self.fatal_error is None else str(self.fatal_error),
        }

    async def __aenter__(self) -> RelayLink:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is not None:
            raise RelayLinkError("RelayLink is not re-entrant: already started")
        self._status = LinkStatus.CONNECTING
        self._task = asyncio.create_task(self._run(), name="relay-link")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._status is not LinkStatus.FAILED:
            self._status = LinkStatus.CLOSED
        self._end_events()

    # ------------------------------------------------------------------------------------------ public API

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until the link is authenticated; raises LinkDownError once a fatal error stopped it."""
        async with asyncio.timeout(timeout):
            while not self._ready.is_set():
                if self.fatal_error is not None:
                    raise LinkDownError(f"link failed: {self.fatal_error}") from self.fatal_error
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), 0.2)

    async def send(self, envelopes: Sequence[Envelope]) -> None:
        """Queue envelopes for the relay; waits while the queue is full. Oversized envelopes raise ValueError."""
        for env in envelopes:
            if env.size > self.config.max_envelope_size:
                raise ValueError(f"envelope of {env.size} bytes exceeds the {self.config.max_envelope_size} limit")
        limit = self.config.send_queue_bytes
        for env in envelopes:
            # Bounded in bytes as well as in envelopes; one envelope always fits into an empty queue.
            while self._outgoing_bytes and self._outgoing_bytes + env.size > limit and self.fatal_error is None:
                self._room.clear()
                self._wake.set()
                await self._room.wait()
            if self.fatal_error is not None:
                raise LinkDownError(f"link failed: {self.fatal_error}") from self.fatal_error
            if self._outgoing.full():
                self._wake.set()  # (the writer makes room)
            await self._outgoing.put(env)
            self._outgoing_bytes += env.size
        if envelopes and not await self._write_inline():
            self._wake.set()

    def _next_turn(self) -> None:
        self._wrote_inline = False

    async def _write_inline(self) -> bool:
        """Write what is queued now, from the caller's task, when the writer is idle and the connection's buffer
        is empty: a lone message then leaves without waiting for the writer task's turn of the loop (~40 us).
        False (the writer task is woken instead): not authenticated, the connection not open (closing), the writer
        busy, more than INLINE_WRITE_MAX bytes queued, other frames pending (requests), an inline write already
        made in this turn of the loop, or data still waiting for the socket (the writer, which may wait for it to
        drain, keeps batching then: a burst of small sends still leaves in few frames). A connection that fails
        here is left to the reader and writer tasks, as a failure after the writer took the envelopes is: the
        outbox retries them."""
        ws, link = self._ws, self._link
        if ws is None or link is None or link.state not in _LIVE or self._write_lock.locked():
            return False
        if ws.state is not State.OPEN:
            return False  # closing (e.g. a keepalive timeout): `ws.send` would wait out the close handshake
        if (self._outgoing_bytes > INLINE_WRITE_MAX or self._wrote_inline or link.pending_output
                or ws.transport.get_write_buffer_size()):
            return False  # (pending output: request frames, e.g. a group send of up to 1 MiB, are the writer's)
        self._wrote_inline = True  # the first send of this loop iteration only: the rest are batched by the writer
        asyncio.get_running_loop().call_soon(self._next_turn)
        async with self._write_lock:
            try:
                await self._write_queued(ws, link)
            except (ConnectionClosed, OSError):
                self._wake.set()  # the writer task meets the error too and tears the connection down
        return True

    async def events(self) -> AsyncIterator[LinkEvent]:
        """Incoming DELIVER / UNDELIVERABLE and link up/down events; ends on close(), raises after a fatal error."""
        while True:
            ev = await self._events.get()
            if ev is None:
                self._events.put_nowait(None)  # let other iterators end too
                if self.fatal_error is not None:
                    raise LinkDownError(f"link failed: {self.fatal_error}") from self.fatal_error
                return
            yield ev

    async def publish_prekeys(
        self, bundle: bytes, one_time: Sequence[bytes], *, kind: DirectoryKind = DirectoryKind.PREKEYS,
        timeout: float | None = None,
    ) -> int:
        """Publish a bundle and one-time entries; returns how many one-time entries the relay now holds."""
        ev = await self._request(lambda link: link.publish_prekeys(kind, bundle, one_time), timeout)
        assert isinstance(ev, PrekeysStoredEvent)
        return ev.remaining

    async def fetch_prekeys(
        self, device_id: str, *, kind: DirectoryKind = DirectoryKind.PREKEYS, timeout: float | None = None
    ) -> PrekeysReceived:
        """A device's bundle and at most one one-time entry (removed from the relay's directory)."""
        ev = await self._request(lambda link: link.fetch_prekeys(kind, device_id), timeout)
        assert isinstance(ev, PrekeysReceived)
        return ev

    async def group_send(self, recipients: Sequence[str], envelope_id: bytes, message: bytes, *,
                         resend: bool = False, timeout: float | None = None) -> GroupResultReceived:
        """Hand one MLS message to the relay's Delivery Service for fan-out to `recipients` (device ids)."""
        ev = await self._request(lambda link: link.group_send(recipients, envelope_id, message, resend=resend),
                                 timeout)
        assert isinstance(ev, GroupResultReceived)
        return ev

    async def publish_key_packages(self, agent: str, last_resort: bytes, key_packages: Sequence[bytes], *,
                                   timeout: float | None = None) -> int:
        """Publish an agent's KeyPackages; returns how many one-time ones the relay now holds for it."""
        ev = await self._request(lambda link: link.publish_key_packages(agent, last_resort, key_packages), timeout)
        assert isinstance(ev, PrekeysStoredEvent)
        return ev.remaining

    async def fetch_key_package(self, device_id: str, agent: str, *, timeout: float | None = None
                                ) -> PrekeysReceived:
        """One KeyPackage of device/agent: `one_time` (removed from the relay) or else `bundle` (last resort)."""
        ev = await self._request(lambda link: link.fetch_key_package(device_id, agent), timeout)
        assert isinstance(ev, PrekeysReceived)
        return ev

    async def _request(self, issue: Callable[[ClientLink], int], timeout: float | None) -> ClientEvent:
        timeout = self.config.request_timeout if timeout is None else timeout
        async with asyncio.timeout(timeout):
            await self._ready.wait()
            link = self._link
            if link is None or link.state not in _LIVE:
                raise LinkDownError("the link went down before the request was sent")
            future: asyncio.Future[ClientEvent] = asyncio.get_running_loop().create_future()
            request_id = issue(link)
            self._pending[request_id] = future
            self._wake.set()
            try:
                return await future
            finally:
                self._pending.pop(request_id, None)

    # ------------------------------------------------------------------------------------------ connection loop

    async def _run(self) -> None:
        delays: Iterator[float] | None = None
        while True:
            self._status = LinkStatus.CONNECTING
            try:
                await self._connect_once()
                error: BaseException = LinkDownError("connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
                while isinstance(error, BaseExceptionGroup) and error.exceptions:
                    error = error.exceptions[0]
            was_ready = self._ready.is_set()
            self._teardown(error)
            if not is_retryable(error):
                self.fatal_error = error
                self._status = LinkStatus.FAILED
                self._room.set()  # senders waiting for room see the error
                log.error("relay link failed for good", extra={"event": "link_failed", "reason": str(error)})
                self._end_events()
                return
            if was_ready or delays is None:
                delays = backoff(self.config.backoff_initial, self.config.backoff_max)
            self._status = LinkStatus.BACKOFF
            delay = next(delays)
            # Say why, so an operator can act (a token that went away, a relay that is down, ...).
            level = logging.WARNING if isinstance(error, TokenProviderError) else logging.INFO
            log.log(level, "relay link down (%s: %s); retrying in %.1f s", type(error).__name__, error, delay,
                    extra={"event": "link_retry", "reason": str(error)})
            await asyncio.sleep(delay)

    def _teardown(self, error: BaseException) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        if self._ready.is_set():
            self._emit_nowait(LinkLost(self.last_error))
        self._ready.clear()
        self._link = self._ws = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(LinkDownError(f"link went down: {error}"))
        self._pending.clear()

    async def _connect_once(self) -> None:
        cfg = self.config
        async with connect(
            cfg.url,
            ssl=client_ssl_context(cfg.ca_file),
            server_hostname=cfg.server_name,
            compression=None,
            max_size=cfg.limits.max_frame_size,
            open_timeout=cfg.open_timeout,
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_interval,
            proxy=None,
            user_agent_header=None,
        ) as ws:
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connects += 1
            self._ws, self._link = ws, ClientLink(cfg.limits)
            self._status = LinkStatus.AUTHENTICATING
            self._keepalive = 0.0
            self._refresh_at = float("inf")
            self._last_sent = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._writer(ws, self._link), name="relay-link-writer")
                timer = tg.create_task(self._timer(self._link), name="relay-link-timer")
                try:
                    await self._reader(ws, self._link)
                finally:
                    writer.cancel()
                    timer.cancel()

    async def _reader(self, ws: ClientConnection, link: ClientLink) -> None:
        async for message in ws:
            if isinstance(message, str):
                raise RelayClosedError(ErrorCode.PROTOCOL, "relay sent a text message")
            read_ns = time.time_ns() if stages.enabled else 0
            link.receive_data(message)
            events = link.events_received()
            if stages.enabled:
                for ev in events:
                    if isinstance(ev, Delivered):
                        stages.mark("b.read", (e.envelope_id for e in ev.envelopes), read_ns)
            for ev in events:
                await self._on_link_event(link, ev)
            self._wake.set()

    async def _on_link_event(self, link: ClientLink, ev: ClientEvent) -> None:
        match ev:
            case ChallengeReceived(nonce, audience, _):
                try:
                    token = await asyncio.to_thread(self._token_provider, nonce, audience)
                except Exception as exc:
                    raise TokenProviderError(f"token provider failed: {type(exc).__name__}: {exc}") from exc
                link.authenticate(token)
            case AuthAccepted(device_id, expires_at, keepalive):
                first = not self._ready.is_set()
                self.device_id, self.expires_at = device_id, expires_at
                self._keepalive = float(keepalive)
                left = max(0.0, expires_at - time.time())
                self._refresh_at = time.monotonic() + max(1.0, left * self.config.refresh_fraction)
                self._status = LinkStatus.READY
                if first:
                    self._ready.set()
                    log.info("relay link ready", extra={"event": "link_ready", "device": device_id})
                    await self._emit(LinkReady(device_id, expires_at))
            case AuthRejected(code, reason):
                raise AuthRejectedError(code, reason)
            case RemoteError(code, reason):
                raise RelayClosedError(code, reason)
            case Delivered() | NotDelivered():
                await self._emit(ev)
            case PrekeysStoredEvent(request_id, _) | PrekeysReceived(request_id, _, _, _, _) | \
                    GroupResultReceived(request_id, _, _, _):
                fut = self._pending.get(request_id)
                if fut is not None and not fut.done():
                    fut.set_result(ev)

    async def _writer(self, ws: ClientConnection, link: ClientLink) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            async with self._write_lock:  # (one writer at a time: this task or `_write_inline`)
                await self._write_queued(ws, link)

    async def _write_queued(self, ws: ClientConnection, link: ClientLink) -> None:
        """Pack what is queued (when authenticated) and write everything the protocol has to send."""
        batch: list[Envelope] = []
        if link.state in _LIVE and not self._outgoing.empty():
            while not self._outgoing.empty() and len(batch) < 4 * self.config.limits.max_envelopes_per_frame:
                batch.append(self._outgoing.get_nowait())
            self._outgoing_bytes -= sum(env.size for env in batch)
            self._room.set()
            link.send_envelopes(batch)
            if not self._outgoing.empty():
                self._wake.set()  # more to come after this write
        for msg in link.data_to_send():
            await ws.send(msg)
            self._last_sent = time.monotonic()
        if stages.enabled and batch:
            stages.mark("a.written", (e.envelope_id for e in batch))

    async def _timer(self, link: ClientLink) -> None:
        """Token refresh before expiry and keepalive pings; the protocol core only says when they are due."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if link.state is LinkState.READY and now >= self._refresh_at:
                self._refresh_at = float("inf")
                link.request_refresh()
                self._wake.set()
            elif link.state in _LIVE and self._keepalive and now - self._last_sent >= self._keepalive:
                link.ping()
                self._wake.set()

    async def _emit(self, ev: LinkEvent) -> None:
        if self._on_event is not None:
            await self._on_event(ev)
        else:
            await self._events.put(ev)  # a slow consumer slows reading: backpressure reaches the relay

    def _emit_nowait(self, ev: LinkEvent) -> None:
        if self._on_event is not None:
            task = asyncio.get_running_loop().create_task(self._on_event(ev))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)
        else:
            with contextlib.suppress(asyncio.QueueFull):
                self._events.put_nowait(ev)

    def _end_events(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._events.put_nowait(None)
