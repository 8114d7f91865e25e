"""The delivery half of the group service: the outbox (group messages some member devices have not acknowledged
end to end yet, resent to those devices only, with backoff, until they acknowledge, leave the group, or the
message expires), end-to-end group acknowledgements both ways (gateway/protocol/group_ack.py: a member device
acknowledges what is durably in its group inbox or epoch buffer, or a known duplicate), the inbox (decrypted
messages handed to the broker, deleted after its PUBCOMP or, for an agent that acknowledges, kept until it
does: gateway/groups_held.py) and keeping the relay stocked with each local agent's
KeyPackages. `Groups` (gateway/groups.py) mixes
this in; the attributes below are set by its constructor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway import topics
from gateway.bridge import BrokerUnavailable, MqttBridge
from gateway.groups_identity import AgentSigner, agent_of
from gateway.groups_keys import REPLENISH_S, Counters, _log_limited
from gateway.groups_store import GroupRecords, InEntry, OutEntry
from gateway.inbox import Phase
from gateway.link import RelayLink
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.errors import ProtocolError
from gateway.protocol.group_ack import MAX_IDS, GroupAck
from gateway.protocol.link import GroupStatus
from gateway.protocol.mls.crypto import CipherSuite
from gateway.store import Store, StoreError

if TYPE_CHECKING:  # the MLS engine is imported where first used (see gateway/groups.py)
    from gateway.protocol.mls.framing import MLSMessage
    from gateway.protocol.mls.group import Group
    from gateway.protocol.mls.welcome_structs import Welcome

log = logging.getLogger("agw.groups")

RETRY_MS = 5_000  # first resend to a device that has not acknowledged (then x2 per attempt)
RETRY_MAX_MS = 30_000
RELINK_RESEND_MS = 1_000  # after the relay link comes back, resend what is unacknowledged this soon
SEND_BATCH = 256
INBOX_BATCH = 512


@dataclass
class _DeliveryState:
    """Per-service delivery bookkeeping (made on first use: `Groups.__init__` belongs to the membership side)."""

    # (device, group, acking agent or "" for any local member) -> message ids
    acks_due: dict[tuple[str, str, str], dict[bytes, None]] = field(default_factory=dict)
    by_msg_id: dict[bytes, bytes] = field(default_factory=dict)  # message id -> outbox entry id
    rosters: dict[str, tuple[tuple[int, int], dict[str, bytes]]] = field(default_factory=dict)
    last_ack_ms: dict[str, int] = field(default_factory=dict)  # device -> when it last acknowledged anything
    gaps: dict[bytes, set[str]] = field(default_factory=dict)  # entry id -> devices that skipped it (resend now)
    ack_wake: asyncio.Event = field(default_factory=asyncio.Event)
    unsent: dict[bytes, set[str]] = field(default_factory=dict)  # entry id -> devices known not to have it
    inbox_in_flight: dict[int, InEntry] = field(default_factory=dict)  # being published, by MQTT packet id


class GroupDelivery:
    link: RelayLink
    bridge: MqttBridge
    records: GroupRecords
    store: Store
    device: str
    members: dict[tuple[str, str], Group]
    outbox: dict[bytes, OutEntry]
    signers: dict[str, AgentSigner]
    counters: Counters
    cs: CipherSuite
    prefix: str
    now_ms: Callable[[], int]
    _wake: asyncio.Event
    _inbox_wake: asyncio.Event
    _publishing: set[bytes]
    _seq: int

    if TYPE_CHECKING:  # provided by Groups, GroupMembership and GroupHeld
        def _exchange_connect(self) -> int:
            raise NotImplementedError

        def _hand_or_drop(self, done: list[InEntry]) -> list[InEntry]:
            raise NotImplementedError

        def _after_handed(self, done: list[InEntry], kept: list[InEntry]) -> None:
            raise NotImplementedError

        def _on_welcome(self, welcome: Welcome) -> None:
            raise NotImplementedError

        def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
            raise NotImplementedError

    @property
    def _dstate(self) -> _DeliveryState:
        st: _DeliveryState | None = self.__dict__.get("_delivery_state")
        if st is None:
            st = self.__dict__["_delivery_state"] = _DeliveryState()
        if len(st.by_msg_id) != len(self.outbox):  # entries restored at start-up
            st.by_msg_id = {e.msg_id: e.entry_id for e in self.outbox.values()}
        return st

    # -- delivery ------------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        next_replenish = 0.0
        last_error = 0.0
        was_ready = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            try:
                ready = self.link.state.value == "ready"
                if ready and not was_ready:
                    self._resend_soon()  # the relay may have restarted and lost what it held for members
                was_ready = ready
                if ready:
                    await self._send_due()
                    loop_t = asyncio.get_running_loop().time()
                    if loop_t >= next_replenish:
                        next_replenish = loop_t + REPLENISH_S
                        self._spawn(self._replenish_all(), "group-key-packages")
            except Exception as exc:  # e.g. a full disk: retried every second, logged at most every 30 s
                last_error = _log_limited(last_error, "group outbox", exc)

    async def _inbox_loop(self) -> None:
        """Hand decrypted group messages to the broker, apart from the relay's read loop (and start the ack
        task: acks must not wait behind the broker's PUBACKs, or senders resend what we already hold)."""
        self._spawn(self._ack_loop(), "group-acks")
        last_error = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._inbox_wake.wait(), 1.0)
            self._inbox_wake.clear()
            try:
                await self._flush_inbox()
            except Exception as exc:
                last_error = _log_limited(last_error, "group inbox", exc)

    async def _ack_loop(self) -> None:
        """Send queued GroupAcks as soon as the receive batch that took their messages has committed (this task
        runs only when the synchronous receive path has returned, i.e. after its transaction)."""
        wake = self._dstate.ack_wake
        last_error = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 1.0)
            wake.clear()
            try:
                await self._flush_acks()
            except Exception as exc:
                last_error = _log_limited(last_error, "group acks", exc)

    def _resend_soon(self) -> None:
        """The relay link is back; the relay may have restarted and lost whatever it held for any device: every
        unacknowledged message counts as not sent, and goes again now, oldest first."""
        st = self._dstate
        st.last_ack_ms.clear()
        for e in self.outbox.values():
            e.next_ms = 0
            st.unsent[e.entry_id] = set(e.devices)

    def _roster(self, group: str) -> dict[str, bytes]:
        """`<device>/<agent>` -> leaf signature key of the group's current members, from one local member's tree
        (all local members are at the same epoch once caught up); cached per epoch."""
        g = next((g for (_a, gname), g in self.members.items() if gname == group), None)
        if g is None:
            return {}
        st = self._dstate
        cached = st.rosters.get(group)
        if cached is not None and cached[0] == (id(g), g.epoch):
            return cached[1]
        roster = {agent_of(leaf.credential): leaf.signature_key for _, leaf in g.members()}
        st.rosters[group] = ((id(g), g.epoch), roster)
        return roster

    def _pending_devices(self, entry: OutEntry) -> list[str]:
        """The devices still to acknowledge `entry` that still have a member in its group (devices that left
        are not waited for). Entries of older versions (no group recorded) keep their list."""
        if not entry.group:
            return entry.devices
        devices = {name.split("/")[0] for name in self._roster(entry.group)}
        return [d for d in entry.devices if d in devices]

    def _track(self, entry: OutEntry) -> None:
        st = self._dstate
        self.outbox[entry.entry_id] = entry
        st.by_msg_id[entry.msg_id] = entry.entry_id

    async def _send_due(self) -> None:
        """Hand due outbox entries to the relay, in the order they were made, pipelined (one frame each), to the
        devices that have not acknowledged them yet; the next attempt waits for their acks, with backoff."""
        t = self.now_ms()
        due = sorted((e for e in self.outbox.values() if e.next_ms <= t), key=lambda e: e.seq)[:SEND_BATCH]
        done = [e.entry_id for e in due if e.expires_ms <= t]
        for e in due:
            if e.expires_ms <= t and e.devices:
                log.warning("group %s: a message expired unacknowledged by %s", e.group or "?", ", ".join(e.devices))
        due = [e for e in due if e.expires_ms > t]
        for e in due:
            e.devices = self._pending_devices(e)
        done += [e.entry_id for e in due if not e.devices]
        due = [e for e in due if e.devices]
        # A resend goes only to devices that have been silent for a while: one that acknowledges (a backlog, say)
        # is alive, and if it skipped this message, its ack of a later one resends it at once (_fill_gaps).
        # Per device, messages go in the order they were made: a device is not sent a message while an older
        # one it is known not to have (offline, congested, failed send) waits for its retry; the receiver's MLS
        # keeps skipped keys only for a bounded window of generations.
        st = self._dstate
        last_ack, gaps, unsent = st.last_ack_ms, st.gaps, st.unsent
        held_from: dict[str, int] = {}
        for e in self.outbox.values():
            if e.next_ms > t:
                for d in unsent.get(e.entry_id, ()):
                    held_from[d] = min(held_from.get(d, e.seq), e.seq)

        def wanted(e: OutEntry, d: str) -> bool:
            if held_from.get(d, e.seq) < e.seq:
                unsent.setdefault(e.entry_id, set()).add(d)
                return False
            return (not e.attempts or d in unsent.get(e.entry_id, ()) or d in gaps.get(e.entry_id, ())
                    or t - last_ack.get(d, 0) >= RETRY_MS)

        targets = {e.entry_id: [d for d in e.devices if wanted(e, d)] for e in due}
        for e in due:
            gaps.pop(e.entry_id, None)
        for e in due:
            if not targets[e.entry_id]:
                e.next_ms = t + RETRY_MS
        due = [e for e in due if targets[e.entry_id]]
        self.counters.resent += sum(len(targets[e.entry_id]) for e in due if e.attempts)
        results = await asyncio.gather(*(self.link.group_send(targets[e.entry_id], e.entry_id, e.message,
                                                              resend=e.resend) for e in due), return_exceptions=True)
        with self.records.store.transaction(durable=False):
            self.records.deferred += 1
            try:
                for entry, res in zip(due, results, strict=True):
                    missed = unsent.setdefault(entry.entry_id, set())
                    missed.difference_update(targets[entry.entry_id])
                    if isinstance(res, BaseException):
                        missed.update(targets[entry.entry_id])
                        log.info("group send failed, will retry: %s: %s", type(res).__name__, res)
                    elif res.status is GroupStatus.RATE_LIMITED:
                        missed.update(targets[entry.entry_id])
                    elif res.status is GroupStatus.ACCEPTED:
                        missed.update(d for d, _ in res.undelivered)
                    else:
                        log.warning("the relay refused a group message (%s); dropping it", res.status.name)
                        entry.devices = []
                    if not entry.devices or entry.entry_id not in self.outbox:  # refused, or acknowledged meanwhile
                        done.append(entry.entry_id)
                        continue
                    entry.attempts += 1
                    entry.next_ms = self.now_ms() + min(RETRY_MAX_MS, RETRY_MS << min(entry.attempts - 1, 4))
                self._forget(done)
            finally:
                self.records.deferred -= 1
                if not self.records.deferred:
                    self.records.flush_index()
        if len(due) == SEND_BATCH:
            self._wake.set()

    def _forget(self, entry_ids: list[bytes]) -> None:
        st = self._dstate
        for i in entry_ids:
            st.gaps.pop(i, None)
            st.unsent.pop(i, None)
            e = self.outbox.pop(i, None)
            if e is not None:
                st.by_msg_id.pop(e.msg_id, None)
        self.records.drop_out(entry_ids)

    # -- end-to-end acknowledgements -------------------------------------------------------------------------------
    def _ack_later(self, device: str, group: str, msg_id: bytes, *, acker: str = "") -> None:
        """Acknowledge `msg_id` to `device` once the current transaction is committed (the inbox task sends)."""
        if device != self.device:
            self._dstate.acks_due.setdefault((device, group, acker), {})[msg_id] = None
            self._dstate.ack_wake.set()

    async def _flush_acks(self) -> None:
        """One signed GroupAck per (sending device, group), up to MAX_IDS ids each, all in one ENVELOPES frame.
        Called from a task, so every id queued was committed by the transaction that took its message. Lost
        acks cost a resend, which is acknowledged as a duplicate."""
        st = self._dstate
        if not st.acks_due or self.link.state.value != "ready":
            return
        due, st.acks_due = st.acks_due, {}
        envelopes = []
        for (device, group, acker), ids in due.items():
            agent = acker or next((a for (a, g) in sorted(self.members) if g == group and a in self.signers), None)
            if agent is None or agent not in self.signers:
                continue  # no local member left: the sender stops waiting for us once it sees that
            id_list = list(ids)
            for k in range(0, len(id_list), MAX_IDS):
                ack = GroupAck(group.encode(), f"{self.device}/{agent}", device, tuple(id_list[k:k + MAX_IDS]))
                envelopes.append(Envelope(EnvelopeKind.GROUP, os.urandom(16), self.device, device,
                                          ack.signed(self.signers[agent].signer).to_bytes()))
                self.counters.acks_sent += len(ack.message_ids)
        if envelopes:
            try:
                await self.link.send(envelopes)
            except Exception as exc:
                log.info("group acks not sent (%s: %s); the senders will resend and get them again",
                         type(exc).__name__, exc)

    def _audit_refusal(self, sender_device: str, group: str, msg: MLSMessage, targets: list[str],
                       before: tuple[int, int, int, list[int]]) -> None:
        """A commit or application message that no local member took (refused by MLS: bad signature, replayed
        generation, unknown sender, or by our policy) goes to the audit log; group state is unchanged by it."""
        dropped, seq, buffered, epochs = before
        after = [self.members[(a, group)].epoch if (a, group) in self.members else -1 for a in targets]
        taken = self._seq != seq or self.counters.buffered != buffered or after != epochs
        kind = _content_kind(msg)
        if taken or kind == "proposal":
            return
        self.counters.extra["refused"] = self.counters.extra.get("refused", 0) + 1
        self.store.audit.append({"type": "group.message_refused", "group": group, "peer": sender_device,
                                 "kind": kind, "epoch": _epoch_of(msg),
                                 "by_policy": self.counters.dropped != dropped}, self.now_ms())
        log.warning("group %s: a %s from %s was refused (audited)", group, kind, sender_device)

    def _receive_welcome(self, sender_device: str, welcome: Welcome, msg_id: bytes) -> None:
        """A Welcome is acknowledged (signed by the invited agent's leaf key, which the adder's tree holds) once
        it made a membership or an invitation held for consent; again when it comes again."""
        known = self.records.welcomed(msg_id)
        if known is None:
            before = set(self.members) | set(self.records.index.invites)
            refused = self.counters.refused_joins
            self._on_welcome(welcome)
            new = sorted((set(self.members) | set(self.records.index.invites)) - before)
            if new:
                known = new[0]
                self.records.put_welcomed(msg_id, *known)
            elif self.counters.refused_joins != refused:
                # Refused (no consent) and audited once: resends are dropped unprocessed. Not acknowledged (we
                # do not learn the group of a refused Welcome), so the adder resends it until it expires.
                self.records.put_welcomed(msg_id, "", "")
        else:
            self.counters.duplicates += 1
        if known is not None and known[0] and sender_device != self.device:
            self._ack_later(sender_device, known[1], msg_id, acker=known[0])

    def _on_group_ack(self, sender_device: str, data: bytes) -> None:
        """A member device acknowledges our group messages: verified against its leaf in our group tree."""
        try:
            ack = GroupAck.from_bytes(data)
            group = ack.group_id.decode("ascii")
            if ack.target != self.device or ack.acker_device != sender_device:
                raise _Refused(f"ack from {sender_device} names {ack.acker} for {ack.target}")
            key = self._roster(group).get(ack.acker)
            if key is None:
                raise _Refused(f"{ack.acker} is not a member of group {group} here")
            ack.verify(self.cs, key)
        except (ProtocolError, UnicodeDecodeError, _Refused) as exc:
            self.counters.acks_refused += 1
            log.warning("group ack from %s refused: %s", sender_device, exc)
            self.store.audit.append({"type": "group.ack_refused", "peer": sender_device,
                                     "reason": f"{type(exc).__name__}: {exc}"[:200]}, self.now_ms())
            return
        self._dstate.last_ack_ms[sender_device] = self.now_ms()
        done = []
        newest = 0
        for msg_id in ack.message_ids:
            entry = self.outbox.get(self._dstate.by_msg_id.get(msg_id, b""))
            if entry is None or sender_device not in entry.devices:
                continue
            newest = max(newest, entry.seq)
            entry.devices.remove(sender_device)
            self.counters.acks_received += 1
            if not entry.devices:
                done.append(entry.entry_id)
            # (the shrunken device list is not written: after a restart the devices that acked get the message
            # again and acknowledge it as a duplicate; one write per ack would cost more than that rare resend)
        if done:
            self._forget(done)
        if newest:
            self._fill_gaps(sender_device, newest)

    def _fill_gaps(self, device: str, newest: int) -> None:
        """`device` acknowledged a message sent after some it has not acknowledged: the relay delivers in order,
        so those were lost (relay or gateway restart). Resend them now, oldest first, rather than after their
        backoff: the receiver's MLS keeps skipped keys only for a bounded window of generations. What it is
        known not to have (held back, or undelivered while it was offline) goes now as well."""
        now = self.now_ms()
        woke = False
        unsent = self._dstate.unsent
        for e in self.outbox.values():
            if device not in e.devices or e.next_ms <= now:
                continue
            if e.seq < newest and e.attempts:
                e.next_ms = now
                self._dstate.gaps.setdefault(e.entry_id, set()).add(device)
                woke = True
            elif device in unsent.get(e.entry_id, ()):  # held back or undelivered: the device is reachable now
                e.next_ms = now
                woke = True
        if woke:
            self._wake.set()

    def _claim_inbox_ids(self) -> None:
        """At start-up, before anything is published: hold the packet ids the stored entries carry."""
        for e in self.records.inbox():
            if e.phase != Phase.WAITING:
                self.bridge.claim_packet_id(e.packet_id)

    def _broker_has(self, packet_ids: list[int]) -> None:
        """The broker answered PUBREC: record it before PUBREL (see gateway/inbox.py; crash-durable suffices)."""
        in_flight = self._dstate.inbox_in_flight
        with self.records.store.transaction(durable=False):
            for packet_id in packet_ids:
                e = in_flight.get(packet_id)
                if e is not None and e.phase == Phase.PUBLISHED:
                    e.phase = Phase.BROKER_HAS
                    self.records.update_in(e)

    def _broker_lost_session(self, packet_ids: list[int]) -> None:
        """The broker lost our session; these exchanges are published again as new ones: their entries are
        PUBLISHED again (stored), so a kill -9 before the new PUBREC restarts them with a PUBLISH, not a PUBREL
        the broker would answer PUBCOMP without delivering."""
        in_flight = self._dstate.inbox_in_flight
        entries = [e for e in map(in_flight.get, packet_ids) if e is not None and e.phase == Phase.BROKER_HAS]
        if not entries:
            return
        try:
            with self.records.store.transaction(durable=False):
                for e in entries:
                    e.phase = Phase.PUBLISHED
                    self.records.update_in(e)
        except StoreError as exc:
            log.error("cannot record %d group message(s) as published again (%s): a gateway crash before the "
                      "broker's new PUBREC could lose them", len(entries), exc)

    async def _flush_inbox(self) -> None:
        """Publish inbox entries in arrival order, pipelined (up to INBOX_BATCH at once), each exactly once (MQTT
        QoS 2 under a packet id stored with the entry first); drop the completed."""
        in_flight = self._dstate.inbox_in_flight
        while self.bridge.connected:
            pending = [e for e in self.records.inbox()
                       if e.entry_id not in self._publishing and e.phase != Phase.HANDED][:INBOX_BATCH]
            if not pending:
                return
            waiting = [e for e in pending if e.phase == Phase.WAITING]
            if waiting:
                connect = self._exchange_connect()
                with self.records.store.transaction(durable=False):  # stored before the PUBLISH leaves
                    for e in waiting:
                        packet_id = self.bridge.reserve_packet_id()
                        if packet_id is None:
                            break
                        e.packet_id, e.phase, e.exchange_connect = packet_id, Phase.PUBLISHED, connect
                        self.records.update_in(e)
            pending = [e for e in pending if e.phase != Phase.WAITING]
            if not pending:
                return  # every packet id is in use: the next round takes these
            self._publishing.update(e.entry_id for e in pending)
            in_flight.update((e.packet_id, e) for e in pending)
            try:
                results = await asyncio.gather(*(self.bridge.publish_exactly_once(
                    e.packet_id, topics.group_inbox_topic(self.prefix, e.agent, e.group), e.payload,
                    on_broker_has=self._broker_has, released=e.phase == Phase.BROKER_HAS,
                    user_properties=((topics.PROP_FROM, e.sender), ("agw:group", e.group), ("agw:epoch", str(e.epoch)),
                                     (topics.PROP_MESSAGE_ID, e.entry_id.hex()))) for e in pending),
                    return_exceptions=True)
            finally:
                for e in pending:
                    in_flight.pop(e.packet_id, None)
            done = [e for e, r in zip(pending, results, strict=True) if r is None]
            kept: list[InEntry] = []
            try:
                if done:
                    packet_ids = [e.packet_id for e in done]
                    with self.records.store.transaction(durable=False):
                        kept = self._hand_or_drop(done)  # (gateway/groups_held.py)
                    for packet_id in packet_ids:
                        self.bridge.free_packet_id(packet_id)
                    self.counters.delivered += len(done)
            finally:
                self._publishing.difference_update(e.entry_id for e in pending)
            if done:
                self._after_handed(done, kept)  # (no longer being published: may go again at once)
            if len(done) < len(pending):
                failed = next(r for r in results if r is not None)
                if not isinstance(failed, BrokerUnavailable | TimeoutError):
                    raise failed
                return


def _epoch_of(msg: MLSMessage) -> int:
    from gateway.protocol.mls.framing import PrivateMessage, PublicMessage

    body = msg.body
    if isinstance(body, PrivateMessage):
        return body.epoch
    if isinstance(body, PublicMessage):
        return body.content.epoch
    return 0


def _content_kind(msg: MLSMessage) -> str:
    from gateway.protocol.mls.framing import PrivateMessage, PublicMessage

    body = msg.body
    if isinstance(body, PrivateMessage):
        return body.content_type.name.lower()
    if isinstance(body, PublicMessage):
        return body.content.content_type.name.lower()
    return "other"


class _Refused(Exception):
    """A well-formed group ack that does not match its envelope or our group."""
