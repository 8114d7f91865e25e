"""The receiving half of the gateway: frames from the relay, into the inbox, out to local agents.

relay -> verify + decrypt -> drop duplicates -> consent -> inbox (durable) -> end-to-end ACK -> MQTT QoS 1 to
the agent -> after the broker's PUBACK the inbox entry goes. A bad envelope from one peer is audited and
dropped without disturbing the others. First contact from a peer agent not on the allowlist is held for the
operator (`agw consent allow`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from gateway import stages, topics
from gateway.bridge import BrokerUnavailable
from gateway.link import LinkDownError, LinkLost, LinkReady
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.errors import ProtocolError
from gateway.protocol.link import Delivered, NotDelivered, UndeliverableReason
from gateway.protocol.message import InnerMessage, Kind, RejectReason, new_message_id
from gateway.runtime import now_ms
from gateway.sending import CONGESTED_RETRY_MS, OFFLINE_RETRY_MS
from gateway.store import ConsentState

log = logging.getLogger("agw.daemon")

PENDING_RETRY_MS = 30_000


@dataclass(frozen=True, slots=True)
class Verdict:
    """How to answer a DATA message: publish it (then ACK), ACK it at once, or REJECT it with a reason."""

    ack: bool
    reason: RejectReason | None = None
    publish: bool = False


ACK = Verdict(True)
PUBLISH = Verdict(False, publish=True)  # deliver to the agent, then ACK


def _inbox_name(peer_device: str, inner: InnerMessage) -> str:
    return f"{peer_device}/{inner.message_id.hex()}"


def _inbox_record(seq: int, inner: InnerMessage) -> bytes:
    return seq.to_bytes(8, "big") + inner.encode()


def _inbox_decode(record: bytes) -> tuple[int, InnerMessage]:
    return int.from_bytes(record[:8], "big"), InnerMessage.decode(record[8:])


class Receiving:
    """Mixed into `Gateway`: the methods of the receiving half."""

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
        frame_ns = time.time_ns() if stages.enabled else 0
        with self.store.transaction(durable=False):
            for env, inner in [(e, i) for e in envelopes for i in self._open(e)]:
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
        if stages.enabled:
            stages.mark("b.frame", (inner.message_id for _, inner in data), frame_ns)
            stages.mark("b.opened", (inner.message_id for _, inner in data))
        acks: dict[str, list[bytes]] = defaultdict(list)
        accepted: list[tuple[str, InnerMessage]] = []
        settled: dict[tuple[str, str, str], ConsentState] = {}  # allowed/denied, fixed for this frame
        # Ids delivered (or held) before: one query for the whole frame. A second copy of an id within the frame
        # (a sender's retry next to the original) is a duplicate of the first.
        seen = self.store.delivered.seen_many([inner.message_id for _, inner in data]) if data else set()
        for peer, inner in data:
            verdict = self._admit(peer, inner, settled, seen)
            if verdict.publish or verdict.ack:
                seen.add(inner.message_id)
            if verdict.publish:
                accepted.append((peer, inner))
            elif verdict.ack:
                acks[peer].append(inner.message_id)
            elif verdict.reason is not None:
                await self._send_reject(peer, inner, verdict.reason)
        stages.mark("b.admitted", (inner.message_id for _, inner in accepted))
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
        """Hand inbox entries to the broker (in order, pipelined) and drop each as soon as the broker has
        acknowledged it: the time between a PUBACK and the delete is the window in which a crash makes us
        publish that message again after a restart, so it is kept to one small commit. Entries are claimed in
        `_publishing` first (by the caller when `claimed`), so no entry is published twice at once."""
        if not claimed:
            entries = [e for e in entries if e[0] not in self._publishing]
            self._publishing.update(name for name, _, _ in entries)

        async def one(name: str, peer: str, inner: InnerMessage) -> bool:
            try:
                await self._publish_to_agent(peer, inner)
            except BrokerUnavailable:
                return False
            finally:
                self._publishing.discard(name)
            with self.store.transaction(durable=False):
                self.store.inbox.delete(name)
            self.counters.delivered += 1
            return True

        try:
            results = await asyncio.gather(*(one(*e) for e in entries))
        finally:
            self._publishing.difference_update(name for name, _, _ in entries)
        if not all(results):
            log.warning("%d message(s) wait in the inbox for the MQTT broker", results.count(False))

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

    def _open(self, env: Envelope) -> list[InnerMessage]:
        """Verify and decrypt one envelope (a v2 batch: verify its signature once, then decrypt each message).
        A bad envelope, or a bad message inside a verified batch, is audited and dropped without disturbing the
        rest."""
        try:
            if env.kind is EnvelopeKind.PAIRWISE_BATCH:
                out = []
                for r in self.book.decrypt_batch(env.sender, env.ciphertext):
                    if isinstance(r, ProtocolError):
                        self._rejected(env, r)
                        continue
                    try:
                        out.append(InnerMessage.decode(r))
                    except ProtocolError as exc:
                        self._rejected(env, exc)
                return out
            return [InnerMessage.decode(self.book.decrypt(env.sender, env.ciphertext))]
        except ProtocolError as exc:
            self._rejected(env, exc)
            return []

    def _rejected(self, env: Envelope, exc: ProtocolError) -> None:
        self.counters.bad_input += 1
        log.warning("rejected an envelope from %s: %s", env.sender, exc)
        self.store.audit.append({"type": "message.rejected", "peer": env.sender,
                                 "reason": type(exc).__name__}, now_ms())

    def _admit(self, peer_device: str, inner: InnerMessage,
               settled: dict[tuple[str, str, str], ConsentState] | None = None,
               seen: set[bytes] | None = None) -> Verdict:
        """Decide what to do with a DATA message: PUBLISH it to the agent, or answer at once. `seen`: the ids of
        the frame already delivered or held, looked up at once by the caller (else one query here)."""
        agent = inner.recipient_agent
        peer = f"{peer_device}/{inner.sender_agent}"
        t = now_ms()
        if inner.message_id in seen if seen is not None else self.store.delivered.seen(inner.message_id):
            self.counters.duplicates += 1
            return ACK  # delivered (or held) before; the sender missed our ACK
        if inner.is_expired(t):
            return Verdict(False, RejectReason.EXPIRED)
        if agent not in self.cfg.agents:
            self.store.audit.append({"type": "message.unknown_agent", "agent": agent, "peer": peer}, t)
            return Verdict(False, RejectReason.UNKNOWN_AGENT)
        key = (agent, peer_device, inner.sender_agent)
        state = settled.get(key) if settled is not None else None
        if state is None:
            state = self._consent(*key)
            if settled is not None and state in (ConsentState.ALLOWED, ConsentState.DENIED):
                settled[key] = state
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
