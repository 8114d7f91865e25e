"""`agw run`: the gateway daemon. It loads the identity from the hardware, opens the encrypted store, wires the
MQTT bridge, the relay link and the session book together, and keeps them healthy (housekeeping, status,
systemd notifications). The delivery rules live in `gateway.sending` and `gateway.receiving`:

agent -> MQTT -> outbox (durable) -> PUBACK to the broker -> encrypt + sign -> relay -> peer gateway
peer gateway: verify + decrypt -> drop duplicates -> consent -> inbox (durable) -> end-to-end ACK -> MQTT QoS 1
to the agent -> after the broker's PUBACK the inbox entry goes; the sender deletes its outbox entry on the ACK.

Hardware keys are used at start-up, delegation and relay tokens only; messages are signed by the delegated key.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import nacl.signing

from gateway import (
    allocator,
    deferred_imports,  # noqa: F401 - first: urllib.request and importlib.metadata load on use
)
from gateway.bridge import MqttBridge
from gateway.config import GatewayConfig
from gateway.control import ControlServer
from gateway.device_identity import DeviceIdentity
from gateway.group_hooks import GroupService, NoGroups
from gateway.inbox import InboxEntry, PubrecMarks
from gateway.link import RelayLink, RelayLinkConfig
from gateway.protocol.identity.credential import credential_verifier, encode_credential
from gateway.protocol.pairwise import Ed25519Signer
from gateway.receipts import Receipts
from gateway.receiving import Receiving
from gateway.runtime import Counters, event_loop_factory, now_ms
from gateway.sd_notify import Notifier
from gateway.sending import Sending
from gateway.sessions import SessionBook
from gateway.store import OutboxLimits, Store

log = logging.getLogger("agw.daemon")

# Allocations of container objects between two collections of the youngest generation (Python's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_collector() -> None:
    """Once started: the cyclic garbage collector leaves alone what start-up made (modules, classes, config, keys:
    ~45,000 objects that live as long as the process), and collects the young generation every 10,000
    allocations instead of 700. Each message makes a few dozen short-lived objects (almost all freed at once by
    reference counting), so with the defaults the collector ran ~15 young passes per 1,000 messages and a full
    pass over the whole heap every ~9,000: ~4.4 us of a receiver's CPU per 256 B message, ~0.4 us after this
    (docs/performance.md, 2026-12-07 `recv2`)."""
    gc.collect()  # (start-up's cyclic garbage, e.g. a failed first connection's traceback, is not frozen)
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

HOUSEKEEPING_INTERVAL = 3600.0
STORE_UPGRADE_TIMEOUT_S = 3600.0  # how long systemd waits for the start during a store schema upgrade
SIGNED_PREKEY_ROTATION_MS = 7 * 86_400_000
# Frames received from the relay and not yet handled (each up to LinkLimits.max_frame_size, 1 MiB): past this the
# link stops reading and TCP pushes back to the relay. The link's default (10,000) could hold gigabytes.
LINK_EVENT_QUEUE = 16
















class Gateway(Sending, Receiving, Receipts):
    """A running gateway: start-up, wiring, housekeeping and status; the halves live in `sending` and
    `receiving`."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.counters = Counters()
        self._stop = asyncio.Event()
        self._wake_sender = asyncio.Event()
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._peer_retry_at: dict[str, int] = {}
        self._inflight: defaultdict[str, dict[bytes, int]] = defaultdict(dict)
        self._seq = time.time_ns()
        self._publishing: set[str] = set()
        self._in_flight: dict[int, InboxEntry] = {}  # inbox entries being published, by MQTT packet id
        # A frame's ACKs wait for the PUBRECs of its messages: by packet id, (the frame's future, ids left)
        self._ack_waits: dict[int, tuple[asyncio.Future[None], set[int]]] = {}
        self._publish_shapes: dict[tuple[object, ...], tuple[str, bytes]] = {}  # see Receiving._publish_shape
        self._finished: list[InboxEntry] = []  # PUBCOMP received, entry not yet deleted
        self._publish_room = asyncio.Event()  # set when inbox entries leave `_publishing` (see PUBLISH_BACKLOG)
        self._background: set[asyncio.Task[None]] = set()
        self.notifier = Notifier()

    # -- start-up ----------------------------------------------------------------------------------------------
    async def run(self) -> int:
        cfg = self.cfg
        if cfg.relay is None:
            raise SystemExit("agw run: the configuration has no relay: section")
        started = time.monotonic()
        self.identity = await asyncio.to_thread(DeviceIdentity.load, cfg)
        self.device_id = self.identity.device.device_id
        self.delegated = await asyncio.to_thread(self.identity.delegated_key)
        self.signer = Ed25519Signer(nacl.signing.SigningKey(self.delegated.raw_private_key()))
        credential = encode_credential([self.delegated.certificate, self.identity.certificate])
        limits = OutboxLimits(max_entries=cfg.store.outbox_max_entries, max_bytes=cfg.store.outbox_max_bytes)
        cfg.paths.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = await asyncio.to_thread(Store.open, cfg.paths.state_dir / "agw.db", self.identity.storage_key,
                                             limits=limits, on_upgrade=self._store_upgrading)
        self.pubrec_marks = PubrecMarks(self.store.secrets)  # the inbox's PUBREC records (gateway/inbox.py)
        self.book = SessionBook(self.store, device_id=self.device_id, credential=credential, signer=self.signer,
                                verify_credential=credential_verifier(lambda: self.identity.trust,
                                                                      lambda: dt.datetime.now(dt.UTC)),
                                now_ms=now_ms)
        relay = cfg.relay
        self.link = RelayLink(RelayLinkConfig(url=relay.url, ca_file=relay.ca_file, server_name=relay.server_name,
                                              event_queue=LINK_EVENT_QUEUE), self._token)
        self.bridge = MqttBridge(host=cfg.mqtt.host, port=cfg.mqtt.port, client_id=f"agw-gateway-{self.device_id}",
                                 prefix=cfg.mqtt.topic_prefix, username=cfg.mqtt.username,
                                 password_file=cfg.mqtt.password_file)
        self.bridge.on_session_lost.append(self._broker_lost_session)  # (gateway/receiving.py)
        self._init_receipts()
        restored_inbox = self.restore_inbox()  # holds their packet ids before any new message takes one
        self.control = ControlServer(cfg.paths.state_dir / "control.sock", self)
        # Groups (MLS) only when the device has agents; the MLS code is not even imported otherwise, and the group
        # service itself (gateway/groups.py) only once a group is used (gateway/groups_keys.py).
        self.groups: GroupService = NoGroups()
        if cfg.agents:
            from gateway.groups_keys import GroupKeys

            keys = GroupKeys(self.store, self.identity, self.link, self.bridge, self.cfg, now_ms)
            keys.acking_groups = self._acking_groups  # their messages are kept until acked too (groups_held.py)
            self.groups = keys
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.groups.start()
        await self.control.start()
        self.link.start()
        await self.bridge.start()
        log.info("gateway %s ready in %.2f s (relay %s, broker %s:%s)", self.device_id,
                 time.monotonic() - started, relay.url, cfg.mqtt.host, cfg.mqtt.port)
        self.ready_seconds = time.monotonic() - started
        settle_collector()
        self.notifier.ready(f"device {self.device_id}")
        tasks = [asyncio.create_task(c, name=n) for n, c in (
            ("agents", self._agent_loop()), ("link", self._link_loop()), ("sender", self._sender_loop()),
            ("consent", self._consent_loop()), ("inbox", self._inbox_loop(restored_inbox)),
            ("maintenance", self._maintenance_loop()), ("receipts", self._receipts_loop()))]
        try:
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            self.notifier.stopping()
            log.info("stopping: draining")
            for t in tasks:
                t.cancel()
            with contextlib.suppress(Exception):
                await self.bridge.stop()
            with contextlib.suppress(Exception):
                await self.link.close()
            await self.control.stop()
            self._close_receiving()
            self.store.close()
        return 0

    def _token(self, challenge: bytes, audience: str) -> str:
        return self.identity.mint_token(challenge, audience)

    async def _housekeeping(self) -> None:
        """Hourly: renew the delegated key a day before it expires, rotate the signed prekey weekly, top up and
        republish prekeys, prune delivered ids and audit entries past their retention."""
        t = now_ms()
        now = dt.datetime.now(dt.UTC)
        republish = False
        if self.delegated.not_after - now < self.identity.renew_before:
            self.delegated = await asyncio.to_thread(self.identity.delegated_key, force_new=True)
            self.signer = Ed25519Signer(nacl.signing.SigningKey(self.delegated.raw_private_key()))
            self.book.signer = self.signer
            self.book.credential = encode_credential([self.delegated.certificate, self.identity.certificate])
            self.book.forget_cache()
            log.info("delegated signing key renewed until %s", self.delegated.not_after.isoformat())
            republish = True
        if self.book.signed_prekey_age_ms(t) > SIGNED_PREKEY_ROTATION_MS:
            self.book.rotate_signed_prekey(t)
            republish = True
        if republish or self.link.state.value == "ready":
            await self._publish_prekeys()
        day = 86_400_000
        cutoff = t - self.cfg.store.delivered_retention_days * day
        for i in range(self.store.delivered.PRUNE_SLICES):  # (a 256th of the ids at a time, between other work)
            self.store.delivered.prune_slice(cutoff, i)
            await asyncio.sleep(0)
        self.store.prune_audit(t - self.cfg.store.audit_retention_days * day)

    async def _trim_heap(self) -> None:
        """Free heap pages back to the kernel (gateway/allocator.py), off the event loop."""
        if allocator.enabled():
            try:
                await asyncio.to_thread(allocator.trim)
            except Exception as exc:  # only memory is at stake: the daemon goes on, and says so
                log.warning("giving the heap back to the kernel (malloc_trim) failed: %s", exc)

    def _store_upgrading(self, old: int, new: int) -> None:
        """Before a schema upgrade of the store (one transaction: minutes with millions of delivered ids on a slow
        card): say so, and ask systemd for more time, so that it does not kill the start and roll it back at every
        restart."""
        log.warning("upgrading the store's schema from version %d to %d (once; an older agw cannot open it after "
                    "this; with millions of delivered ids this can take minutes)", old, new)
        self.notifier.extend_timeout(STORE_UPGRADE_TIMEOUT_S, f"upgrading the store schema {old} -> {new}")

    def _activity(self) -> int:
        c = self.counters
        return c.sent + c.delivered + c.acked

    async def _maintenance_loop(self) -> None:
        status_path = self.cfg.paths.state_dir / "status.json"
        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL
        await self._trim_heap()  # what start-up allocated and freed (imports, compilation, TLS, key loading)
        activity = last_activity = self._activity()
        while True:
            # A burst of traffic just ended (messages moved in the last tick, none in this one): give the heap
            # it grew back (gateway/allocator.py).
            activity, previous = self._activity(), activity
            if activity == previous != last_activity:
                last_activity = activity
                await self._trim_heap()
            if time.monotonic() >= next_housekeeping:
                next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL
                try:
                    await self._housekeeping()
                except Exception as exc:  # retried next hour; the daemon keeps serving
                    log.error("housekeeping failed: %s", exc)
            await self._fold_idle()  # the delivered ids' steps, if the receiver makes none (gateway/receiving.py)
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()
            with contextlib.suppress(OSError):
                tmp = status_path.with_suffix(".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(self.status()))
                os.replace(tmp, status_path)
            await asyncio.sleep(min(1.0, self.notifier.watchdog_interval or 1.0))

    def group_control(self, request: dict[str, Any]) -> Any:
        return self.groups.control(request)

    def status(self) -> dict[str, Any]:
        """Written to status.json every second: only counts kept in memory, no `Store.stats()` (its COUNT(*) over
        the delivered ids and the audit log grows with them: ~30 days of ids on a busy device). It also read the
        outbox depth under a key `stats` does not have, so `outbox_depth` was always 0."""
        depth, size = self.store.outbox.usage()
        return {"device": self.device_id, "pid": os.getpid(), "time": now_ms(),
                "link": {"state": self.link.state.value, "relay": self.cfg.relay.url if self.cfg.relay else None,
                         "last_error": str(self.link.fatal_error or self.link.last_error or "") or None,
                         "connects": self.link.connects},
                "mqtt": {"connected": self.bridge.connected},
                "queue": {"outbox_depth": depth, "outbox_bytes": size},
                "inbox": {"publishing": len(self._publishing)},  # handed to the broker, not yet complete
                "pending_consent": self.store.consent.pending_count(),
                "peers": self.book.peers(),
                "counters": {k: v for k, v in vars(self.counters).items() if k != "extra"},
                "groups": self.groups.status(), "receipts": self.receipts_status()}


async def run_gateway(cfg: GatewayConfig) -> int:
    return await Gateway(cfg).run()


def configure_logging(cfg: GatewayConfig) -> None:
    level = getattr(logging, cfg.logging.level.upper())
    if cfg.logging.format == "json":
        fmt = '{"t":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":%(message)r}'
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt)


def main_run(config_path: Path) -> int:
    from gateway.config import load_config

    cfg = load_config(config_path, isolated=True)  # pydantic and PyYAML stay out of the daemon's memory
    configure_logging(cfg)
    factory = event_loop_factory()
    log.info("event loop: %s", "uvloop" if factory is not None else "asyncio")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_gateway(cfg))

