"""`agw run`: the gateway daemon. It wires the parts together and owns the delivery rules:

agent -> MQTT -> outbox (durable) -> PUBACK to the broker -> encrypt + sign -> relay -> peer gateway
peer gateway: verify + decrypt -> drop duplicates -> consent -> MQTT QoS 1 to the agent -> after the broker's
PUBACK: remember the id, send an encrypted end-to-end ACK -> the sender deletes the outbox entry.

The sender retries until the ACK (or a final REJECT) arrives or the message expires. Hardware keys are used at
start-up and for relay tokens only; messages are signed by the delegated key in software.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing

from gateway import topics
from gateway.bridge import AgentMessage, BrokerUnavailable, MqttBridge
from gateway.config import GatewayConfig
from gateway.control import ControlServer
from gateway.device_identity import DeviceIdentity
from gateway.group_hooks import GroupService, NoGroups
from gateway.link import LinkDownError, LinkLost, LinkReady, RelayLink, RelayLinkConfig
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.errors import ProtocolError
from gateway.protocol.identity.credential import credential_verifier, encode_credential
from gateway.protocol.link import Delivered, NotDelivered, UndeliverableReason
from gateway.protocol.message import InnerMessage, Kind, RejectReason, new_message_id
from gateway.protocol.pairwise import Ed25519Signer
from gateway.sd_notify import Notifier
from gateway.sessions import SessionBook
from gateway.store import ConsentState, OutboxFull, OutboxLimits, Store, StoreError

log = logging.getLogger("agw.daemon")

RETRY_MIN_MS = 5_000
RETRY_MAX_MS = 60_000
PENDING_RETRY_MS = 30_000
OFFLINE_RETRY_MS = 5_000
CONGESTED_RETRY_MS = 250
SEND_WINDOW = 512  # envelopes per peer sent and not yet answered
HOUSEKEEPING_INTERVAL = 3600.0
SIGNED_PREKEY_ROTATION_MS = 7 * 86_400_000


def _digest(m: AgentMessage) -> bytes:
    """What identifies a broker redelivery of the same PUBLISH (same packet id, same content)."""
    h = hashlib.sha256()
    for part in (m.topic.encode(), m.payload, m.correlation_data or b"", (m.response_topic or "").encode()):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()[:16]


def _inbox_name(peer_device: str, inner: InnerMessage) -> str:
    return f"{peer_device}/{inner.message_id.hex()}"


def _inbox_record(seq: int, inner: InnerMessage) -> bytes:
    return seq.to_bytes(8, "big") + inner.encode()


def _inbox_decode(record: bytes) -> tuple[int, InnerMessage]:
    return int.from_bytes(record[:8], "big"), InnerMessage.decode(record[8:])


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Verdict:
    """How to answer a DATA message: publish it (then ACK), ACK it at once, or REJECT it with a reason."""

    ack: bool
    reason: RejectReason | None = None
    publish: bool = False


ACK = Verdict(True)
PUBLISH = Verdict(False, publish=True)  # deliver to the agent, then ACK


@dataclass
class Counters:
    sent: int = 0
    delivered: int = 0
    acked: int = 0
    duplicates: int = 0
    rejected_in: int = 0
    bad_input: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Gateway:
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
                                             limits=limits)
        self.book = SessionBook(self.store, device_id=self.device_id, credential=credential, signer=self.signer,
                                verify_credential=credential_verifier(lambda: self.identity.trust,
                                                                      lambda: dt.datetime.now(dt.UTC)),
                                now_ms=now_ms)
        relay = cfg.relay
        self.link = RelayLink(RelayLinkConfig(url=relay.url, ca_file=relay.ca_file, server_name=relay.server_name),
                              self._token)
        self.bridge = MqttBridge(host=cfg.mqtt.host, port=cfg.mqtt.port, client_id=f"agw-gateway-{self.device_id}",
                                 prefix=cfg.mqtt.topic_prefix, username=cfg.mqtt.username,
                                 password_file=cfg.mqtt.password_file)
        self.control = ControlServer(cfg.paths.state_dir / "control.sock", self)
        self.groups: GroupService = __import__("gateway.groups").groups.Groups(self.store, self.identity, self.link, self.bridge, self.cfg, now_ms) if cfg.agents else NoGroups()  # noqa: E501
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
        self.notifier.ready(f"device {self.device_id}")
        tasks = [asyncio.create_task(c, name=n) for n, c in (
            ("agents", self._agent_loop()), ("link", self._link_loop()), ("sender", self._sender_loop()),
            ("consent", self._consent_loop()), ("inbox", self._inbox_loop()),
            ("maintenance", self._maintenance_loop()))]
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
            self.store.close()
        return 0

    def _token(self, challenge: bytes, audience: str) -> str:
        return self.identity.mint_token(challenge, audience)

    # -- agent -> peer -----------------------------------------------------------------------------------------
    async def _agent_loop(self) -> None:
        q = self.bridge.incoming
        prefix = self.cfg.mqtt.topic_prefix
        ttl = self.cfg.store.message_ttl_seconds * 1000
        while True:
            batch = [await q.get()]
            while not q.empty() and len(batch) < 512:
                batch.append(q.get_nowait())
            items: list[tuple[bytes, str, bytes, int]] = []
            ingested: list[tuple[str, bytes]] = []
            t = now_ms()
            group_msgs = [m for m in batch if topics.is_group_topic(prefix, m.topic)]
            if group_msgs:
                await self.groups.on_agent_messages(group_msgs)
                for m in group_msgs:
                    self.bridge.ack(m)
                batch = [m for m in batch if not topics.is_group_topic(prefix, m.topic)]
            for m in batch:
                try:
                    out = topics.parse_out_topic(prefix, m.topic)
                    inner = self._inner_from_agent(m, out, t, ttl)
                except (topics.TopicError, ValueError) as exc:
                    log.warning("dropping a message on %r: %s", m.topic, exc)
                    continue
                mark_name, digest = f"mqtt-in/{m.mid}", _digest(m)
                if m.dup and self.store.secrets.get(mark_name) == digest:
                    continue  # the broker resends what we stored but had not acknowledged before a crash
                items.append((inner.message_id, out.peer_device, inner.encode(), inner.expires_at_ms))
                ingested.append((mark_name, digest))
            while True:
                try:
                    with self.store.transaction(durable=self.cfg.store.durability == "power-loss"):
                        self.store.outbox.put_many(items)
                        for name, digest in ingested:
                            self.store.secrets.put(name, digest)
                    break
                except (OutboxFull, StoreError) as exc:
                    # Not acknowledged: the broker keeps the messages; we try again shortly.
                    log.error("outbox refuses new messages (%s); holding %d unacknowledged", exc, len(items))
                    await asyncio.sleep(1.0)
            for m in batch:
                self.bridge.ack(m)
            self.counters.sent += len(items)
            self._wake_sender.set()

    def _inner_from_agent(self, m: AgentMessage, out: topics.OutTopic, t: int, ttl: int) -> InnerMessage:
        props = tuple((k, v) for k, v in m.user_properties if not k.startswith(topics.RESERVED_PREFIX))
        if out.deliver_to is not None:
            props += ((topics.PROP_DELIVER_TO, out.deliver_to),)
        return InnerMessage(kind=Kind.DATA, message_id=new_message_id(), sender_agent=out.agent,
                            recipient_agent=out.peer_agent, created_at_ms=t, expires_at_ms=t + ttl,
                            payload=m.payload, response_topic=m.response_topic, correlation_data=m.correlation_data,
                            content_type=m.content_type, payload_utf8=m.payload_utf8, user_properties=props)

    async def _sender_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_sender.wait(), 1.0)
            self._wake_sender.clear()
            if self.link.state.value != "ready":
                continue
            t = now_ms()
            for entry in self.store.outbox.expire(t):
                self.store.audit.append({"type": "message.expired", "peer": entry.peer_device,
                                         "attempts": entry.attempts}, t)
            due = self.store.outbox.due(t, limit=SEND_WINDOW)
            by_peer: dict[str, list[Any]] = defaultdict(list)
            for e in due:
                if self._peer_retry_at.get(e.peer_device, 0) <= t:
                    by_peer[e.peer_device].append(e)
            for peer, entries in by_peer.items():
                if not self.book.has_session(peer):
                    self._ensure_session(peer)
                    continue
                inflight = self._inflight[peer]
                for mid in [m for m, sent in inflight.items() if sent < t - RETRY_MIN_MS]:
                    del inflight[mid]  # unanswered for a retry period: no longer counts against the window
                entries = entries[:max(0, SEND_WINDOW - len(inflight))]
                if not entries:
                    continue
                envelopes = []
                try:
                    with self.store.transaction(durable=False):
                        for e in entries:
                            wire, setup = self.book.encrypt(peer, e.record)
                            kind = EnvelopeKind.PREKEY if setup else EnvelopeKind.PAIRWISE
                            envelopes.append(Envelope(kind, e.msg_id, self.device_id, peer, wire))
                        delay = min(RETRY_MAX_MS, RETRY_MIN_MS << min(entries[0].attempts, 4))
                        self.store.outbox.mark_attempts([e.msg_id for e in entries], t + delay)
                        self.book.flush()
                except (ProtocolError, LookupError) as exc:
                    log.warning("cannot encrypt for %s: %s", peer, exc)
                    continue
                inflight.update((e.msg_id, t) for e in entries)
                await self.link.send(envelopes)

    def _ensure_session(self, peer: str) -> None:
        if peer in self._fetching:
            return

        async def fetch() -> None:
            try:
                got = await self.link.fetch_prekeys(peer)
                if got.bundle is None:
                    log.info("no prekeys published for %s (offline or unknown); retrying later", peer)
                    self._peer_retry_at[peer] = now_ms() + OFFLINE_RETRY_MS
                    return
                self.book.open_session(peer, got.bundle, got.one_time)
                log.info("opened a pairwise session with %s", peer)
                self._wake_sender.set()
            except (ProtocolError, Exception) as exc:
                log.warning("session setup with %s failed: %s", peer, exc)
                self._peer_retry_at[peer] = now_ms() + OFFLINE_RETRY_MS
            finally:
                self._fetching.pop(peer, None)

        self._fetching[peer] = asyncio.create_task(fetch(), name=f"fetch-{peer}")

    # -- relay -> agent ----------------------------------------------------------------------------------------
    async def _link_loop(self) -> None:
        try:
            await self._link_events()
        except LinkDownError as exc:
            # Fatal (revoked or untrusted): stay up so the operator sees why (agw status), keep the outbox.
            log.error("the relay link stopped for good: %s. Re-enroll the device or fix the relay trust, "
                      "then restart agw.", exc)
            await self._stop.wait()

    async def _link_events(self) -> None:
        async for ev in self.link.events():
            if isinstance(ev, LinkReady):
                await self._publish_prekeys()
                await self.groups.on_link_ready()
                self._wake_sender.set()
            elif isinstance(ev, Delivered):
                group_envs = [e for e in ev.envelopes if e.kind is EnvelopeKind.GROUP]
                if group_envs:
                    await self.groups.on_envelopes(group_envs)
                pairwise = tuple(e for e in ev.envelopes if e.kind is not EnvelopeKind.GROUP)
                if pairwise:
                    await self._on_delivered(pairwise)
            elif isinstance(ev, NotDelivered):
                t = now_ms()
                # Offline: try again in a few seconds. Congested or rate limited: back off briefly.
                wait = OFFLINE_RETRY_MS if ev.reason is UndeliverableReason.OFFLINE else CONGESTED_RETRY_MS
                peers = {e.peer_device for e in (self.store.outbox.get(i) for i in ev.envelope_ids) if e}
                for p in peers:
                    self._peer_retry_at[p] = t + wait
                    self.store.outbox.reschedule_peer(p, t + wait)
                    self._inflight[p].clear()
            elif isinstance(ev, LinkLost):
                log.warning("relay link lost: %s", ev.reason)
            else:
                await self.groups.on_link_event(ev)

    async def _publish_prekeys(self) -> None:
        bundle, one_time = self.book.publishable_prekeys()
        try:
            await self.link.publish_prekeys(bundle, one_time)
        except Exception as exc:
            log.warning("publishing prekeys failed: %s", exc)

    async def _on_delivered(self, envelopes: tuple[Envelope, ...]) -> None:
        """Handle a batch from the relay: one transaction to decrypt, concurrent publishes, one to remember."""
        data: list[tuple[str, InnerMessage]] = []
        t = now_ms()
        with self.store.transaction(durable=False):
            for env in envelopes:
                inner = self._open(env)
                if inner is None:
                    continue
                if inner.kind is Kind.ACK:
                    self.counters.acked += self.store.outbox.delete_many(inner.ids)
                    self._settled(env.sender, inner.ids)
                elif inner.kind is Kind.REJECT:
                    assert inner.reason is not None
                    self._settled(env.sender, inner.ids)
                    if inner.reason.is_final:
                        self.store.outbox.delete_many(inner.ids)
                        self.store.audit.append({"type": "message.refused", "peer": env.sender,
                                                 "reason": inner.reason.name, "count": len(inner.ids)}, t)
                    else:
                        self.store.outbox.mark_attempts(inner.ids, t + PENDING_RETRY_MS)
                else:
                    data.append((env.sender, inner))
            self.book.flush()
        acks: dict[str, list[bytes]] = defaultdict(list)
        accepted: list[tuple[str, InnerMessage]] = []
        for peer, inner in data:
            verdict = self._admit(peer, inner)
            if verdict.publish:
                accepted.append((peer, inner))
            elif verdict.ack:
                acks[peer].append(inner.message_id)
            elif verdict.reason is not None:
                await self._send_reject(peer, inner, verdict.reason)
        if accepted:
            # Into the inbox first: once it is there the sender may forget the message, and a broker outage
            # here never stalls the sender's retries.
            t = now_ms()
            with self.store.transaction(durable=self.cfg.store.durability == "power-loss"):
                for peer, inner in accepted:
                    self.store.delivered.mark(inner.message_id, t)
                    self.store.inbox.put(_inbox_name(peer, inner), _inbox_record(self._inbox_seq(), inner))
                    acks[peer].append(inner.message_id)
        if accepted:
            # In the background, so the next frame from the relay is decrypted while the broker works; started
            # before the ACKs go out so the agent's copy is on its way first.
            entries = [(_inbox_name(p, i), p, i) for p, i in accepted]
            self._publishing.update(name for name, _, _ in entries)
            task = asyncio.create_task(self._publish_inbox(entries, claimed=True))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            await asyncio.sleep(0)  # let the publishes reach paho before encrypting the ACKs
        await self._send_acks(acks)

    def _inbox_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _publish_inbox(self, entries: list[tuple[str, str, InnerMessage]], *, claimed: bool = False) -> None:
        """Hand inbox entries to the broker (in order, pipelined) and drop those it acknowledged. Entries are
        claimed in `_publishing` first (by the caller when `claimed`), so no entry is published twice at once."""
        if not claimed:
            entries = [e for e in entries if e[0] not in self._publishing]
            self._publishing.update(name for name, _, _ in entries)
        try:
            results = await asyncio.gather(*(self._publish_to_agent(p, i) for _, p, i in entries),
                                           return_exceptions=True)
        finally:
            self._publishing.difference_update(name for name, _, _ in entries)
        done = [name for (name, _, _), r in zip(entries, results, strict=True) if r is None]
        if len(done) < len(entries):
            log.warning("%d message(s) wait in the inbox for the MQTT broker", len(entries) - len(done))
        if done:
            with self.store.transaction(durable=False):
                for name in done:
                    self.store.inbox.delete(name)
            self.counters.delivered += len(done)

    async def _inbox_loop(self) -> None:
        """Retry inbox entries left behind by a broker outage or a restart."""
        while True:
            await asyncio.sleep(1.0)
            if not self.bridge.connected:
                continue
            pending = sorted(((*_inbox_decode(v), name) for name, v in self.store.inbox.items()
                              if name not in self._publishing), key=lambda e: e[0])
            if pending:
                await self._publish_inbox([(name, name.split("/", 1)[0], inner) for _, inner, name in pending])

    def _settled(self, peer: str, ids: tuple[bytes, ...]) -> None:
        """The peer answered these ids: they leave the send window, which may let more go out."""
        inflight = self._inflight.get(peer)
        if inflight:
            for i in ids:
                inflight.pop(i, None)
        self._wake_sender.set()

    def _open(self, env: Envelope) -> InnerMessage | None:
        """Verify and decrypt one envelope; a bad one is audited and dropped without disturbing the rest."""
        try:
            return InnerMessage.decode(self.book.decrypt(env.sender, env.ciphertext))
        except ProtocolError as exc:
            self.counters.bad_input += 1
            log.warning("rejected an envelope from %s: %s", env.sender, exc)
            self.store.audit.append({"type": "message.rejected", "peer": env.sender,
                                     "reason": type(exc).__name__}, now_ms())
            return None

    def _admit(self, peer_device: str, inner: InnerMessage) -> Verdict:
        """Decide what to do with a DATA message: PUBLISH it to the agent, or answer at once."""
        agent = inner.recipient_agent
        peer = f"{peer_device}/{inner.sender_agent}"
        t = now_ms()
        if self.store.delivered.seen(inner.message_id):
            self.counters.duplicates += 1
            return ACK  # delivered (or held) before; the sender missed our ACK
        if inner.is_expired(t):
            return Verdict(False, RejectReason.EXPIRED)
        if agent not in self.cfg.agents:
            self.store.audit.append({"type": "message.unknown_agent", "agent": agent, "peer": peer}, t)
            return Verdict(False, RejectReason.UNKNOWN_AGENT)
        state = self._consent(agent, peer_device, inner.sender_agent)
        if state is ConsentState.DENIED:
            self.store.audit.append({"type": "message.denied", "agent": agent, "peer": peer}, t)
            return Verdict(False, RejectReason.CONSENT_DENIED)
        if state is not ConsentState.ALLOWED:
            if self.store.consent.get(agent, peer) is None:
                # First contact: hold this message until the operator decides; the sender may forget it.
                with self.store.transaction():
                    self.store.consent.request(agent, peer, inner.encode(), t)
                    self.store.delivered.mark(inner.message_id, t)
                log.info("consent requested: %s -> %s (agw consent allow --agent %s --peer %s)", peer, agent,
                         agent, peer)
                return ACK
            return Verdict(False, RejectReason.CONSENT_PENDING)
        return PUBLISH

    def _consent(self, agent: str, peer_device: str, peer_agent: str) -> ConsentState | None:
        stored = self.store.consent.state(agent, f"{peer_device}/{peer_agent}")
        if stored is not None and stored is not ConsentState.PENDING:
            return stored
        allow = self.cfg.agents[agent].allow
        if f"{peer_device}/{peer_agent}" in allow or f"{peer_device}/*" in allow:
            return ConsentState.ALLOWED
        return stored

    async def _publish_to_agent(self, peer_device: str, inner: InnerMessage) -> None:
        prefix = self.cfg.mqtt.topic_prefix
        agent = inner.recipient_agent
        props = [(k, v) for k, v in inner.user_properties if not k.startswith(topics.RESERVED_PREFIX)]
        deliver_to = dict(inner.user_properties).get(topics.PROP_DELIVER_TO)
        topic = topics.inbox_topic(prefix, agent)
        if deliver_to is not None and topics.agent_may_receive_on(prefix, agent, deliver_to):
            topic = deliver_to
        response_topic = None
        if inner.response_topic:
            response_topic = topics.reply_topic(prefix, agent, peer_device, inner.sender_agent, inner.response_topic)
        props += [(topics.PROP_FROM, f"{peer_device}/{inner.sender_agent}"),
                  (topics.PROP_MESSAGE_ID, inner.message_id.hex())]
        await self.bridge.publish(topic, inner.payload, response_topic=response_topic,
                                  correlation_data=inner.correlation_data, content_type=inner.content_type,
                                  payload_utf8=inner.payload_utf8, user_properties=tuple(props))

    async def _send_acks(self, acks: dict[str, list[bytes]]) -> None:
        t = now_ms()
        for peer, ids in acks.items():
            for i in range(0, len(ids), 1024):
                chunk = tuple(ids[i:i + 1024])
                inner = InnerMessage(kind=Kind.ACK, message_id=new_message_id(), sender_agent="gateway",
                                     recipient_agent="gateway", created_at_ms=t, expires_at_ms=t + 3_600_000,
                                     ids=chunk)
                await self._send_control(peer, inner, EnvelopeKind.E2E_ACK)

    async def _send_reject(self, peer: str, inner: InnerMessage, reason: RejectReason) -> None:
        t = now_ms()
        msg = InnerMessage(kind=Kind.REJECT, message_id=new_message_id(), sender_agent="gateway",
                           recipient_agent="gateway", created_at_ms=t, expires_at_ms=t + 3_600_000,
                           ids=(inner.message_id,), reason=reason)
        await self._send_control(peer, msg, EnvelopeKind.E2E_ACK)

    async def _send_control(self, peer: str, inner: InnerMessage, kind: EnvelopeKind) -> None:
        """ACK and REJECT go out at once, without the outbox: if lost, the sender's retry brings a new one."""
        try:
            wire, _ = self.book.encrypt(peer, inner.encode())
            with self.store.transaction(durable=False):
                self.book.flush()
        except (LookupError, ProtocolError) as exc:
            log.warning("cannot answer %s: %s", peer, exc)
            return
        await self.link.send([Envelope(kind, inner.message_id, self.device_id, peer, wire)])

    # -- consent, status, maintenance --------------------------------------------------------------------------
    async def _consent_loop(self) -> None:
        """Deliver held first messages once the operator allowed them."""
        while True:
            await asyncio.sleep(0.5)
            for entry in self.store.consent.held():
                if entry.state is not ConsentState.ALLOWED or entry.held_message is None:
                    continue
                inner = InnerMessage.decode(entry.held_message)
                device = entry.peer.split("/", 1)[0]
                try:
                    await self._publish_to_agent(device, inner)
                except BrokerUnavailable:
                    continue
                self.store.consent.release(entry.local_agent, entry.peer)
                self.counters.delivered += 1

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
        self.store.prune_delivered(t - self.cfg.store.delivered_retention_days * day)
        self.store.prune_audit(t - self.cfg.store.audit_retention_days * day)

    async def _maintenance_loop(self) -> None:
        status_path = self.cfg.paths.state_dir / "status.json"
        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL
        while True:
            if time.monotonic() >= next_housekeeping:
                next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL
                try:
                    await self._housekeeping()
                except Exception as exc:  # retried next hour; the daemon keeps serving
                    log.error("housekeeping failed: %s", exc)
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()
            with contextlib.suppress(OSError):
                tmp = status_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.status()))
                os.replace(tmp, status_path)
            await asyncio.sleep(min(1.0, self.notifier.watchdog_interval or 1.0))

    def group_control(self, request: dict[str, Any]) -> Any:
        return self.groups.control(request)

    def status(self) -> dict[str, Any]:
        stats = self.store.stats().as_dict()
        return {"device": self.device_id, "pid": os.getpid(), "time": now_ms(),
                "link": {"state": self.link.state.value, "relay": self.cfg.relay.url if self.cfg.relay else None,
                         "last_error": str(self.link.fatal_error or self.link.last_error or "") or None,
                         "connects": self.link.connects},
                "mqtt": {"connected": self.bridge.connected},
                "queue": {"outbox_depth": stats.get("outbox_entries", 0), "outbox_bytes": stats.get("outbox_bytes", 0)},
                "pending_consent": self.store.consent.pending_count(),
                "peers": sorted(self.book._sessions),
                "counters": {k: v for k, v in vars(self.counters).items() if k != "extra"},
                "groups": self.groups.status()}


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

    cfg = load_config(config_path)
    configure_logging(cfg)
    return asyncio.run(run_gateway(cfg))
