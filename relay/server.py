"""The relay server: a thin asyncio shell around `ServerLink`, one `_Connection` per gateway.

Each connection has a reader (frames in, events handled, timeouts) and a writer (one task that owns sending:
queued deliveries are batched into DELIVER frames, control frames go out in order). Deliveries sit in a
bounded per-connection queue; when it is full the sender is told CONGESTED instead of the relay buffering
without bound. Bad input closes only the offending connection, with an ERROR frame and a close reason.
Nothing is stored on disk and no payload byte is ever logged.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import itertools
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.link import (
    AuthFailCode,
    AuthRequested,
    EnvelopesReceived,
    ErrorCode,
    FetchRequested,
    GroupSendRequested,
    GroupStatus,
    KeyPackageFetchRequested,
    KeyPackagesPublishRequested,
    LinkError,
    LinkState,
    PublishRequested,
    RefreshRequested,
    RemoteError,
    ServerEvent,
    ServerLink,
    SpoofedSender,
    UndeliverableReason,
)
from relay.auth import AuthFailure, TokenVerifier
from relay.config import ConfigError, RelayConfig
from relay.directory import Directory
from relay.ds import DeliveryService
from relay.limits import DeviceLimiter
from relay.metrics import RelayMetrics
from relay.routing import LocalRouter, Router, RouteResult

log = logging.getLogger("agw.relay")

#: Control frames (UNDELIVERABLE, PREKEYS...) queued for a gateway before the relay stops reading from it.
MAX_PENDING_FRAMES = 64
_LIVE = (LinkState.READY, LinkState.REFRESH_REQUESTED, LinkState.REFRESH_CHALLENGED, LinkState.REFRESH_AUTHENTICATING)
_ROUTE_REASON = {RouteResult.OFFLINE: UndeliverableReason.OFFLINE, RouteResult.CONGESTED: UndeliverableReason.CONGESTED}


def server_ssl_context(config: RelayConfig) -> ssl.SSLContext:
    """TLS 1.3 only, server authentication only (gateways authenticate with tokens inside the channel)."""
    if config.cert_file is None or config.key_file is None:
        raise ConfigError("the relay needs cert_file and key_file: it never serves without TLS")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(config.cert_file, config.key_file)
    return ctx


class RelayServer:
    """Start with `async with RelayServer(config, verifier) as relay:`; `relay.port` is the bound port."""

    def __init__(
        self,
        config: RelayConfig,
        verifier: TokenVerifier,
        *,
        router: Router | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.verifier = verifier
        self.router: Router = router if router is not None else LocalRouter()
        self.directory = Directory(max_devices=config.directory_max_devices, max_one_time=config.directory_max_one_time)
        self.ds = DeliveryService()
        self.metrics = RelayMetrics()
        self.limiter = DeviceLimiter(
            rate_envelopes=config.rate_envelopes,
            burst_envelopes=config.burst_envelopes,
            rate_bytes=config.rate_bytes,
            burst_bytes=config.burst_bytes,
            rate_requests=config.rate_requests,
            burst_requests=config.burst_requests,
            clock=clock,
        )
        self.clock, self.wall_clock = clock, wall_clock
        self.connections: set[_Connection] = set()
        self._server: Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._crl_stamp: tuple[int, int] | None = None
        self._ids = itertools.count(1)
        self.metrics_port: int | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the relay is not started"
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def start(self) -> None:
        cfg = self.config
        # asyncio gives every TLS connection a 256 KiB read buffer; one TLS record (16 KiB + overhead) is enough
        # and brings an idle authenticated connection from ~300 KiB to ~60 KiB (bench/relay_capacity.py).
        asyncio.sslproto.SSLProtocol.max_size = cfg.tls_read_buffer
        self._crl_stamp = self._crl_file_stamp()
        self._server = await serve(
            self._handle,
            cfg.host,
            cfg.port,
            ssl=server_ssl_context(cfg),
            compression=None,
            process_request=self._process_request,
            max_size=cfg.link.max_frame_size,
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_interval,
            open_timeout=cfg.auth_timeout,
            close_timeout=cfg.close_timeout,
            server_header=None,
        )
        self._sweeper = asyncio.create_task(self._sweep(), name="relay-sweeper")
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_host, cfg.metrics_port)
        log.info("relay listening", extra={"event": "listening", "port": self.port})

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            for conn in list(self.connections):
                conn.link.fail(ErrorCode.SHUTDOWN, "relay shutting down")
                await conn.flush_now()
            self._server.close(code=1001, reason="relay shutting down")
            await self._server.wait_closed()
            self._server = None
        self.metrics.stop_http()
        log.info("relay stopped", extra={"event": "stopped"})

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if len(self.connections) >= self.config.max_connections:
            self.metrics.closed.labels("connection-cap").inc()
            return ws.respond(503, "relay at its connection cap, retry later\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Connection(self, ws, next(self._ids))
        self.connections.add(conn)
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.metrics.connections.dec()

    # ------------------------------------------------------------------------------------------ revocation

    def _crl_file_stamp(self) -> tuple[int, int] | None:
        path = self.config.crl_file
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload_crl_if_changed(self) -> bool:
        """Re-read the CRL file when its mtime or size changed; a bad file is logged and the old list kept."""
        stamp = self._crl_file_stamp()
        if stamp is None or stamp == self._crl_stamp or self.config.crl_file is None:
            return False
        self._crl_stamp = stamp
        try:
            self.verifier.reload_crl(self.config.crl_file.read_bytes())
        except Exception as exc:  # any failure keeps the previous list: fail closed on what we knew
            self.metrics.crl_reloads.labels("failed").inc()
            log.error("CRL rejected, keeping the previous one", extra={"event": "crl_failed", "reason": str(exc)})
            return False
        self.metrics.crl_reloads.labels("ok").inc()
        log.info("CRL reloaded", extra={"event": "crl_reloaded", "path": self.config.crl_file})
        return True

    def enforce(self) -> None:
        """Close connections whose device is revoked or whose token expired without a refresh."""
        now = self.wall_clock()
        for conn in list(self.connections):
            if conn.serial is None or conn.closing:
                continue
            if self.verifier.is_revoked(conn.serial):
                conn.close_soon(ErrorCode.REVOKED, "device certificate revoked")
            elif conn.link.expires_at + self.config.expiry_grace < now:
                conn.close_soon(ErrorCode.TOKEN_EXPIRED, "token expired without a refresh")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.crl_poll_interval)
            try:
                self.reload_crl_if_changed()
                self.enforce()
            except Exception:
                log.exception("sweeper error", extra={"event": "sweeper_error"})


class _Connection:
    """One gateway's connection: implements routing's DeliverySink."""

    def __init__(self, relay: RelayServer, ws: ServerConnection, conn_id: int) -> None:
        self.relay = relay
        self.cfg = relay.config
        self.ws = ws
        self.id = conn_id
        self.link = ServerLink(self.cfg.link)
        self.pending: deque[Envelope] = deque()
        self.pending_bytes = 0
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()
        self.serial: int | None = None
        self.registered = False
        self.closing = False
        addr = ws.remote_address
        self.peer = f"{addr[0]}:{addr[1]}" if addr else "?"

    def _log(self, level: int, msg: str, **fields: Any) -> None:
        log.log(level, msg, extra={"conn": self.id, "peer": self.peer, "device": self.link.device_id, **fields})

    # ------------------------------------------------------------------------------------------ delivery sink

    def offer(self, envelope: Envelope) -> bool:
        if self.closing or self.link.state not in _LIVE:
            return False
        if len(self.pending) >= self.cfg.send_queue_envelopes or (
            self.pending_bytes + envelope.size > self.cfg.send_queue_bytes
        ):
            return False
        self.pending.append(envelope)
        self.pending_bytes += envelope.size
        self.wake.set()
        return True

    # ------------------------------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        sock = self.ws.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._log(logging.INFO, "connected", event="connected")
        writer = asyncio.create_task(self._writer(), name=f"relay-writer-{self.id}")
        try:
            self.link.challenge(os.urandom(32), self.cfg.audience)
            self.wake.set()
            await self._reader()
        except ConnectionClosed:
            pass
        finally:
            self.closing = True
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await writer
            if self.registered and self.link.device_id is not None:
                self.relay.router.unregister(self.link.device_id, self)
                self.relay.metrics.authenticated.dec()
            if self.ws.close_code == 1009:
                self.relay.metrics.closed.labels("message-too-big").inc()
            self._log(logging.INFO, "disconnected", event="disconnected", code=self.ws.close_code)

    async def _reader(self) -> None:
        deadline = self.relay.clock() + self.cfg.auth_timeout
        while not self.closing:
            if self.link.device_id is None:
                timeout, code = deadline - self.relay.clock(), ErrorCode.AUTH_TIMEOUT
            else:
                timeout, code = self.cfg.idle_timeout, ErrorCode.IDLE
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    message = await self.ws.recv()
            except TimeoutError:
                await self.close(code, "no authentication in time" if code is ErrorCode.AUTH_TIMEOUT else "idle")
                return
            if isinstance(message, str):
                await self.close(ErrorCode.PROTOCOL, "text messages are not part of the link protocol")
                return
            self.relay.metrics.bytes_in.inc(len(message))
            try:
                self.link.receive_data(message)
            except SpoofedSender as exc:
                await self.close(ErrorCode.SPOOFED_SENDER, str(exc))
                return
            except LinkError as exc:
                await self.close(ErrorCode.PROTOCOL, str(exc))
                return
            for event in self.link.events_received():
                await self._on_event(event)
            if self.link.pending_output > MAX_PENDING_FRAMES:
                await self._wait_drained()
            if self.link.state is LinkState.CLOSED and not self.closing:  # AUTH_FAIL was queued
                await self.close(None, "authentication failed")
                return
            self.wake.set()

    async def _wait_drained(self) -> None:
        """Our answers to this gateway are piling up because it does not read: stop reading from it (TCP
        backpressure) until they are sent, and give up on it after the idle timeout."""
        self.drained.clear()
        self.wake.set()
        drained = asyncio.ensure_future(self.drained.wait())
        closed = asyncio.ensure_future(self.ws.wait_closed())
        try:
            done, _ = await asyncio.wait((drained, closed), timeout=self.cfg.idle_timeout,
                                        return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            closed.cancel()
        if not done:
            self.close_soon(ErrorCode.IDLE, "not reading")

    async def _writer(self) -> None:
        """The only sender (besides close): batches queued deliveries and sends frames in order."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.pending and self.link.state in _LIVE:
                batch = list(self.pending)
                self.pending.clear()
                self.pending_bytes = 0
                self.link.deliver(batch)
            for msg in self.link.data_to_send():
                await self.ws.send(msg)
                self.relay.metrics.bytes_out.inc(len(msg))
            self.drained.set()

    async def flush_now(self) -> None:
        """Send whatever the link has queued (an ERROR or AUTH_FAIL before closing), with a short deadline."""
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(1.0):
                for msg in self.link.data_to_send():
                    await self.ws.send(msg)

    async def close(self, code: ErrorCode | None, reason: str) -> None:
        """Tell the gateway why (ERROR frame unless AUTH_FAIL already said it), then close the WebSocket."""
        if self.closing:
            return
        self.closing = True
        if code is not None:
            self.link.fail(code, reason)
        label = code.name.lower() if code is not None else "auth-failed"
        self.relay.metrics.closed.labels(label).inc()
        self._log(logging.WARNING, "closing connection", event="close", code=label, reason=reason)
        await self.flush_now()
        await self.ws.close(1008 if code not in (None, ErrorCode.SHUTDOWN, ErrorCode.REPLACED) else 1000,
                            reason.encode("utf-8")[:120].decode("utf-8", "ignore"))

    def close_soon(self, code: ErrorCode, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self.close(code, reason))
        _background.add(task)
        task.add_done_callback(_background.discard)

    # ------------------------------------------------------------------------------------------ events

    async def _on_event(self, event: ServerEvent) -> None:
        match event:
            case AuthRequested():
                await self._authenticate(event)
            case EnvelopesReceived(envelopes):
                await self._route(envelopes)
            case RefreshRequested():
                self.link.challenge(os.urandom(32), self.cfg.audience)
            case PublishRequested(request_id, kind, bundle, one_time):
                assert self.link.device_id is not None
                if not self._allow_request():
                    return
                remaining = self.relay.directory.publish(kind, self.link.device_id, bundle, one_time)
                self.link.prekeys_stored(request_id, remaining)
            case FetchRequested(_, kind, device_id):
                if not self._allow_request():
                    return
                found, popped = self.relay.directory.fetch(kind, device_id)
                self.link.prekeys(event, found, popped)
            case GroupSendRequested():
                await self._group_send(event)
            case KeyPackagesPublishRequested(request_id, agent, last_resort, key_packages):
                assert self.link.device_id is not None
                if not self._allow_request():
                    return
                remaining = self.relay.directory.publish_key_packages(self.link.device_id, agent, last_resort,
                                                                      key_packages)
                self.link.prekeys_stored(request_id, remaining)
            case KeyPackageFetchRequested(_, device_id, agent):
                if not self._allow_request():
                    return
                resort, popped = self.relay.directory.fetch_key_package(device_id, agent)
                self.link.key_package(event, resort, popped)
            case RemoteError(code, reason):
                self._log(logging.INFO, "gateway reported an error", event="remote_error", code=code.name,
                          reason=reason)

    def _allow_request(self) -> bool:
        assert self.link.device_id is not None
        if self.relay.limiter.allow_request(self.link.device_id):
            return True
        self.relay.metrics.rate_limited.inc()
        self.close_soon(ErrorCode.RATE_LIMITED, "too many directory requests")
        return False

    async def _authenticate(self, event: AuthRequested) -> None:
        relay = self.relay
        try:
            verified = await asyncio.to_thread(
                relay.verifier.verify, event.token, audience=self.cfg.audience, challenge=event.nonce,
                now=int(relay.wall_clock()),
            )
            if event.refresh and verified.device_id != self.link.device_id:
                raise AuthFailure(AuthFailCode.DEVICE_CHANGED, "a refresh must authenticate the same device")
        except AuthFailure as fail:
            relay.metrics.auth_failures.labels(fail.code.name.lower()).inc()
            self._log(logging.WARNING, "authentication failed", event="auth_failed", code=fail.code.name,
                      reason=fail.reason)
            self.link.reject(fail.code, fail.reason)
            return
        except Exception:
            relay.metrics.auth_failures.labels("unavailable").inc()
            log.exception("token verifier failed", extra={"event": "verifier_error", "conn": self.id})
            self.link.reject(AuthFailCode.UNAVAILABLE, "the relay could not check the token")
            return
        self.link.accept(verified.device_id, verified.expires_at, self.cfg.keepalive)
        self.serial = verified.serial
        if not event.refresh:
            old = relay.router.register(verified.device_id, self)
            self.registered = True
            relay.metrics.authenticated.inc()
            if isinstance(old, _Connection):
                old.close_soon(ErrorCode.REPLACED, "the same device connected again")
        self._log(logging.INFO, "authenticated", event="auth_ok", serial=verified.serial)

    async def _route(self, envelopes: tuple[Envelope, ...]) -> None:
        relay, device = self.relay, self.link.device_id
        assert device is not None
        refused: dict[UndeliverableReason, list[bytes]] = {}
        routed = 0
        for env in envelopes:
            if env.size > self.cfg.max_envelope_size:
                reason: UndeliverableReason | None = UndeliverableReason.TOO_BIG
            elif not relay.limiter.allow_envelope(device, env.size):
                relay.metrics.rate_limited.inc()
                reason = UndeliverableReason.RATE_LIMITED
            else:
                result = await relay.router.route(env)
                reason = _ROUTE_REASON.get(result)
            if reason is None:
                routed += 1
            else:
                refused.setdefault(reason, []).append(env.envelope_id)
        relay.metrics.envelopes_routed.inc(routed)
        for reason, ids in refused.items():
            relay.metrics.undeliverable.labels(reason.name.lower()).inc(len(ids))
            if self.link.state in _LIVE:
                self.link.undeliverable(reason, ids)

    async def _group_send(self, event: GroupSendRequested) -> None:
        """The Delivery Service: order commits, then fan the message out once per listed device."""
        relay, device = self.relay, self.link.device_id
        assert device is not None
        size = len(event.message) * len(event.recipients)
        if len(event.message) > self.cfg.max_envelope_size:
            self.link.group_result(event.request_id, GroupStatus.TOO_BIG, 0)
            return
        if not relay.limiter.allow_envelope(device, size):
            relay.metrics.rate_limited.inc()
            self.link.group_result(event.request_id, GroupStatus.RATE_LIMITED, 0)
            return
        verdict = relay.ds.check(event.message, resend=event.resend)
        if not verdict.accepted:
            self.link.group_result(event.request_id, verdict.status, verdict.epoch)
            return
        undelivered: list[tuple[str, UndeliverableReason]] = []
        for recipient in dict.fromkeys(event.recipients):
            if recipient == device:
                continue
            env = Envelope(EnvelopeKind.GROUP, event.envelope_id, device, recipient, event.message)
            reason = _ROUTE_REASON.get(await relay.router.route(env))
            if reason is not None:
                undelivered.append((recipient, reason))
        relay.metrics.envelopes_routed.inc(len(event.recipients) - len(undelivered))
        self.link.group_result(event.request_id, GroupStatus.ACCEPTED, verdict.epoch, undelivered)


_background: set[asyncio.Task[None]] = set()
