"""End-to-end receipts and acks between the gateway and agents that use the SDK (gateway/client.py).

Sending direction: an agent's message with a well-formed `agw:sdk-id` (the SDK's random 16-byte id) gets the
end-to-end message id `derive_message_id(agent, sdk id)`, so a retransmission has the same id: the outbox does
not store it twice (INSERT OR IGNORE), and once delivered the receiving gateway's delivered-id table answers it
with an ACK instead of a second delivery (for `store.delivered_retention_days`). After each ingest commit the
gateway publishes, per agent, one receipt on agw/<agent>/receipt naming the SDK ids of the batch (duplicates too:
the first receipt may have died with the broker). A malformed `agw:sdk-id` is treated as absent (a fresh id,
no receipt) with a warning: only a non-SDK client sets one, and such a client does not wait for receipts, so
dropping its message would lose it.

Receiving direction: an agent that publishes on agw/<agent>/ack (the SDK sends an empty ack on every connect) is
remembered in the store as acknowledging, with the instance ids of its SDK clients that announced themselves
(`agw:instance`; several clients of one agent may run at once): one client's goodbye forgets only that client, and
the agent stops being held for once none is left (see `_goodbye`; before, the first goodbye stopped it for all).
Its inbox entries are not deleted at PUBCOMP but kept as HANDED until
its ack names them (only its own entries), published again after every (re)connect to the broker and whenever it
announces itself (at most once per HELLO_EVERY), and deleted with a warning when they expire unacknowledged
(docs/operations.md). At most `store.held_max_per_agent` are held per agent; past that its messages are deleted at
PUBCOMP, as for a raw agent, so an agent that announces and never acks cannot fill the store. The messages of the
groups its announcement names (`agw:groups`) are kept the same way by the group service (gateway/groups_held.py);
acks, announcements, reconnects and expiry sweeps are passed on to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from typing import Any

from gateway import topics
from gateway.bridge import AgentMessage, BrokerUnavailable
from gateway.group_hooks import GroupService
from gateway.inbox import InboxEntry, Phase
from gateway.protocol.identity.errors import BadName
from gateway.protocol.identity.names import check_id
from gateway.protocol.message import new_message_id
from gateway.protocol.receipts import (
    GOODBYE,
    INSTANCE_SIZE,
    MAX_IDS,
    MAX_REASON,
    RESERVED_INSTANCES,
    ReceiptFormatError,
    decode_ids,
    derive_message_id,
    encode_ids,
    parse_instance_id,
    parse_sdk_id,
)
from gateway.runtime import now_ms
from gateway.store import StoreError

log = logging.getLogger("agw.receipts")

ACKING_KEY = "receipts/acking/"  # + agent: in store.secrets, present once the agent acknowledged anything; value:
# 0x01 (written by gateways before 2026-12-07: clients unknown), or 0x02 then the 16-byte instance ids of its
# announced SDK clients, oldest first (see `_encode_instances`)
ACKING_GROUPS_KEY = "receipts/acking-groups/"  # + agent: the groups it announced it acknowledges (comma-separated)
MAX_ANNOUNCED_GROUPS = 1_000
# Announced clients told apart per agent; past it the least recently announced are merged into the anonymous
# client (`_announce`: still held for, with their groups, until a goodbye without an instance), so a local agent
# announcing fresh instance ids in a loop costs this much memory and one small record, not more. The groups of all
# its clients together are capped at MAX_ANNOUNCED_GROUPS too (`_union_groups`).
MAX_INSTANCES = 16
# Announcers the gateway cannot name: an announcement without `agw:instance` (an SDK that predates it, a raw
# client): only a goodbye without one (which forgets every client of the agent, as before) ends it; and clients
# known only from a store written by an older gateway, or from an ack of ids without an announcement: the first
# goodbye of the agent, of any client, ends it.
ANONYMOUS, UNKNOWN = RESERVED_INSTANCES
INSTANCES_LOG_EVERY = 60.0  # seconds between warnings that an agent's announced clients reached MAX_INSTANCES
EARLY_ACKS = 65_536  # acks remembered for entries not (yet) HANDED: an ack may overtake our PUBCOMP
WATCH_EVERY = 0.2  # seconds between looks at the broker connection
EXPIRE_EVERY = 10.0  # seconds between expiry sweeps of held entries
HELLO_GRACE = 2.0  # seconds after an agent's announcement before its older held entries are published again
HELLO_EVERY = 10.0  # seconds: at most one announcement-driven republish per agent (a flood of announcements is one)
HELLO_EVERY_MAX = 600.0  # ... doubling up to this while the agent acknowledges nothing between two of them
OVER_CAP_LOG_EVERY = 60.0  # seconds between warnings that an agent's held messages reached their cap


class Receipts:
    """Mixed into `Gateway`. Call `_init_receipts()` once the store is open, before `restore_inbox()`."""

    cfg: Any
    store: Any
    bridge: Any
    groups: GroupService
    _publishing: set[str]

    def _init_receipts(self) -> None:
        # agent -> the groups whose messages it acknowledges, those of all its announced clients together (shared
        # with the group service: gateway/groups_held.py)
        self._acking_groups: dict[str, frozenset[str]] = {}
        # agent -> its announced SDK clients, oldest first: instance id -> the groups that client reads. An agent is
        # acknowledging (`_acking`) while it has any. Only the ids and the agent's groups are stored: after a
        # restart each client is taken to read all of them (kept for more groups, never fewer, until it announces
        # itself again).
        self._instances: dict[str, dict[bytes, frozenset[str]]] = {}
        for a in self.cfg.agents:
            raw = self.store.secrets.get(ACKING_KEY + a)
            if raw is None:
                continue
            stored = self.store.secrets.get(ACKING_GROUPS_KEY + a)
            groups = frozenset(stored.decode().split(",")) if stored else frozenset()
            if groups:
                self._acking_groups[a] = groups
            self._instances[a] = dict.fromkeys(_decode_instances(a, raw), groups)
        self._acking: set[str] = set(self._instances)
        # agent -> message id -> (entry name, expiry, broker connection it was handed in, when (loop time))
        self._held: defaultdict[str, dict[bytes, tuple[str, int, int, float]]] = defaultdict(dict)
        self._early_acks: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self.receipt_counters = {"receipts": 0, "acks": 0, "held_expired": 0, "republished": 0, "bad_input": 0,
                                 "not_held_over_cap": 0, "clients_forgotten_over_cap": 0}
        self._instances_logged: dict[str, float] = {}
        self._hello_before: dict[str, float] = {}  # agent -> its latest announcement (loop time), republish pending
        self._hello_last: dict[str, float] = {}  # agent -> when its last announcement-driven republish ran
        self._hello_every: dict[str, float] = {}  # agent -> its current interval (absent: HELLO_EVERY)
        self._over_cap_logged: dict[str, float] = {}
        self._holding: defaultdict[str, set[str]] = defaultdict(set)

    # -- sending direction -------------------------------------------------------------------------------------
    def _sdk_id(self, m: AgentMessage, agent: str, *, warn: bool) -> bytes | None:
        value = next((v for k, v in m.user_properties if k == topics.PROP_SDK_ID), None)
        if value is None:
            return None
        try:
            return parse_sdk_id(value)
        except ReceiptFormatError as exc:
            if warn:
                self.receipt_counters["bad_input"] += 1
                log.warning("agent %s published on %s with a malformed agw:sdk-id (%s): it gets a fresh message "
                            "id and no receipt", agent, m.topic, exc)
            return None

    def _e2e_message_id(self, m: AgentMessage, agent: str) -> bytes:
        """The end-to-end id of an agent's message: derived from its SDK id, else fresh."""
        sdk_id = self._sdk_id(m, agent, warn=True)
        return new_message_id() if sdk_id is None else derive_message_id(agent, sdk_id)

    def _send_receipts(self, batch: list[AgentMessage], refused: Sequence[tuple[AgentMessage, str]] = ()) -> None:
        """After the ingest commit: one receipt per agent naming the SDK ids of its messages in the batch that are
        stored (now, or before: a retransmission), and one per agent and reason naming those refused for good at
        ingest, with the reason in the user property `agw:refused` (the SDK's send() raises it). Either way the
        SDK stops resending them."""
        prefix = self.cfg.mqtt.topic_prefix
        refused_ids = {id(m): reason for m, reason in refused}
        by_agent: dict[tuple[str, str | None], list[bytes]] = defaultdict(list)
        for m in batch:
            if not m.user_properties:
                continue  # no agw:sdk-id: not the SDK's, no receipt
            parts = m.topic.split("/")
            pairwise = len(parts) >= 3 and parts[2] == "out"  # <prefix>/<agent>/out/<device>/<agent>
            group = len(parts) == 5 and parts[2] == "group" and parts[4] == "out"  # <prefix>/<agent>/group/<g>/out
            if not (pairwise or group):
                continue
            try:
                agent = check_id("agent", parts[1])
            except BadName:
                continue
            sdk_id = self._sdk_id(m, agent, warn=False)
            if sdk_id is not None:
                by_agent[agent, refused_ids.get(id(m))].append(sdk_id)
        for (agent, reason), ids in by_agent.items():
            props = () if reason is None else ((topics.PROP_REFUSED, reason[:MAX_REASON]),)
            for i in range(0, len(ids), MAX_IDS):
                self._spawn_receipt(topics.receipt_topic(prefix, agent), encode_ids(ids[i:i + MAX_IDS]), props)

    def _spawn_receipt(self, topic: str, payload: bytes, props: tuple[tuple[str, str], ...] = ()) -> None:
        async def publish() -> None:
            try:
                await self.bridge.publish(topic, payload, user_properties=props)
                self.receipt_counters["receipts"] += 1
            except BrokerUnavailable as exc:  # the SDK publishes again and gets a new receipt
                log.info("a receipt on %s was not published (%s)", topic, exc)

        self._in_background(publish())  # type: ignore[attr-defined]

    # -- receiving direction: acks -----------------------------------------------------------------------------
    def _take_acks(self, batch: list[AgentMessage]) -> list[AgentMessage]:
        """Handle the acks in a batch from the broker (and PUBACK them); returns the other messages."""
        prefix = self.cfg.mqtt.topic_prefix
        rest = []
        for m in batch:
            agent = topics.ack_agent(prefix, m.topic)
            if agent is None:
                rest.append(m)
                continue
            try:
                self._on_ack(agent, m.payload, m.user_properties)
            except StoreError as exc:
                # Not PUBACKed: the broker delivers the ack again after a reconnect. Held entries stay meanwhile.
                log.error("cannot record an ack of %s (%s)", agent, exc)
                continue
            self.bridge.ack(m)
        return rest

    def _on_ack(self, agent: str, payload: bytes, properties: Sequence[tuple[str, str]] = ()) -> None:
        if agent not in self.cfg.agents:
            self.receipt_counters["bad_input"] += 1
            log.warning("an ack on the topic of %r, which is not an agent of this device: ignored", agent)
            return
        if payload == GOODBYE:
            self._goodbye(agent, properties)
            return
        try:
            ids = decode_ids(payload)
        except ReceiptFormatError as exc:
            self.receipt_counters["bad_input"] += 1
            log.warning("agent %s sent a malformed ack (%s): ignored", agent, exc)
            return
        if not ids:
            # A client of the agent (re)connected. What was handed to the broker while it was away waits in its
            # session and arrives now; after a grace period, what is still unacknowledged from before this
            # announcement is sent again (its session may have been lost, e.g. with the broker's unsaved state).
            self._announce(agent, properties)
            self._on_hello(agent)
            return
        if agent not in self._acking:  # acks without an announcement (as before: the agent acknowledges)
            self._set_instances(agent, {UNKNOWN: frozenset()})
        self.receipt_counters["acks"] += len(ids)
        self._hello_every.pop(agent, None)  # it acknowledges: its announcements are honoured at the usual rate
        ids = self.groups.acked(agent, ids)  # its held group messages (gateway/groups_held.py); the rest are ours
        held = self._held.get(agent, {})
        names = []
        for i in ids:
            got = held.pop(i, None)
            if got is not None and got[0] not in self._publishing:
                names.append(got[0])
            else:  # not handed yet (the ack overtook our PUBCOMP), or being published again: drop it at PUBCOMP
                self._early_acks[(agent, i)] = None
                if len(self._early_acks) > EARLY_ACKS:
                    self._early_acks.popitem(last=False)
        if names:
            with self.store.transaction(durable=False):
                for name in names:
                    self.store.inbox.delete(name)

    def _instance(self, agent: str, properties: Sequence[tuple[str, str]]) -> bytes | None:
        """The `agw:instance` of an announcement or goodbye; None if absent; ValueError if malformed (logged)."""
        value = next((v for k, v in properties if k == topics.PROP_INSTANCE), None)
        if value is None:
            return None
        try:
            return parse_instance_id(value)
        except ReceiptFormatError as exc:
            self.receipt_counters["bad_input"] += 1
            log.warning("agent %s sent a malformed agw:instance (%s)", agent, exc)
            raise ValueError(str(exc)) from None

    def _announce(self, agent: str, properties: Sequence[tuple[str, str]]) -> None:
        """Remember the announcing client (its `agw:instance`; none or a malformed one: `ANONYMOUS`) and the
        groups it reads, the latest last. Past MAX_INSTANCES the least recently announced clients are merged into
        `ANONYMOUS` (with a warning at most once a minute): one of them may still be running (a long-lived client
        beside a sibling that crashes in a loop), so the agent stays held for, with their groups, until a goodbye
        without an instance, the side that loses nothing."""
        try:
            instance = self._instance(agent, properties) or ANONYMOUS
        except ValueError:
            instance = ANONYMOUS  # (holding on: the side that loses nothing)
        groups = self._announced_groups(agent, properties)
        current = self._instances.get(agent, {})
        if current.get(instance) == groups:  # announced before (a reconnect): the latest now, in memory only
            del current[instance]
            current[instance] = groups
            return
        new = {i: g for i, g in current.items() if i != instance}
        new[instance] = groups
        forgotten = 0
        if len(new) > MAX_INSTANCES:
            merged = new.pop(ANONYMOUS, frozenset())
            while len(new) >= MAX_INSTANCES:  # (room for ANONYMOUS; the announcing client is the latest, kept)
                merged |= new.pop(next(iter(new)))
                forgotten += 1
            new = {ANONYMOUS: merged, **new}
        self._set_instances(agent, new)
        if forgotten > 0:
            self.receipt_counters["clients_forgotten_over_cap"] += forgotten
            t = asyncio.get_running_loop().time()
            if self._instances_logged.get(agent, float("-inf")) + INSTANCES_LOG_EVERY <= t:
                self._instances_logged[agent] = t
                log.warning("agent %s announced more than %d SDK clients without their goodbyes: the least "
                            "recently announced are no longer told apart, and the agent stays held for until a "
                            "goodbye without an instance (clients that crash without closing leave theirs; see "
                            "docs/operations.md)", agent, MAX_INSTANCES)

    def _goodbye(self, agent: str, properties: Sequence[tuple[str, str]]) -> None:
        """A client of the agent closed. With its `agw:instance`: forget that client (and `UNKNOWN`), and stop
        holding for the agent only if no announced client is left. Without (an SDK that predates instances, or
        the operator's one-byte goodbye, docs/operations.md): forget every client, as before. A malformed
        instance: ignored (holding stays on: the side that loses nothing)."""
        if agent not in self._acking:
            return
        try:
            instance = self._instance(agent, properties)
        except ValueError:
            return
        current = self._instances.get(agent, {})
        left = {} if instance is None else {i: g for i, g in current.items() if i not in (instance, UNKNOWN)}
        if len(left) == len(current):
            return  # (a client not announced, or forgotten over the cap: nothing changes)
        if not left:
            # The PUBCOMPs the broker sent before this goodbye (its messages, which the closing client may have
            # had and not acknowledged) wait up to FINISHED_WAIT_MAX for their commit: settled now, while the
            # agent still acknowledges, they are kept for its next client instead of deleted.
            self._settle_finished()  # type: ignore[attr-defined]
        self._set_instances(agent, left)
        if left:
            log.info("a client of agent %s closed; %d other client(s) of it announced: its messages are still "
                     "kept until acknowledged", agent, len(left))

    def _set_instances(self, agent: str, instances: dict[bytes, frozenset[str]]) -> None:
        """Write the agent's announced clients and the groups they read together (none: it stops acknowledging),
        each only if it changed, then follow in memory (a store error leaves both as they were: the ack is not
        PUBACKed, the broker delivers it again)."""
        groups = _union_groups(instances)
        old_groups = self._acking_groups.get(agent, frozenset())
        was = agent in self._acking
        with self.store.transaction(durable=False):
            if instances:
                if list(instances) != list(self._instances.get(agent, ())):
                    self.store.secrets.put(ACKING_KEY + agent, _encode_instances(instances))
            elif was:
                self.store.secrets.delete(ACKING_KEY + agent)
            if groups != old_groups:
                if groups:
                    self.store.secrets.put(ACKING_GROUPS_KEY + agent, ",".join(sorted(groups)).encode())
                else:
                    self.store.secrets.delete(ACKING_GROUPS_KEY + agent)
        if groups:
            self._acking_groups[agent] = groups
        else:
            self._acking_groups.pop(agent, None)
        if groups != old_groups:
            log.info("agent %s acknowledges the messages of %d group(s): they are kept until it does", agent,
                     len(groups))
        if instances:
            self._instances[agent] = instances
            self._acking.add(agent)
            if not was:
                log.info("agent %s acknowledges what it receives: its messages are kept until it does", agent)
        else:
            self._instances.pop(agent, None)
            self._acking.discard(agent)
            if was:
                log.info("agent %s stopped acknowledging (its SDK clients closed): its messages go at PUBCOMP "
                         "again", agent)

    def _announced_groups(self, agent: str, properties: Sequence[tuple[str, str]]) -> frozenset[str]:
        """An announcement names the groups whose messages the client reads and acknowledges (`agw:groups`): only
        those are kept for the agent (gateway/groups_held.py), with those of its other announced clients. None
        named (an older SDK, or one that reads no group): none for this client, so a client that never
        acknowledges a group's messages is not sent them again and again."""
        value = next((v for k, v in properties if k == topics.PROP_GROUPS), "")
        groups = set()
        for name in value.split(",")[:MAX_ANNOUNCED_GROUPS] if value else ():
            try:
                groups.add(check_id("group", name))
            except BadName:
                self.receipt_counters["bad_input"] += 1
                log.warning("agent %s announced a malformed group name %r: ignored", agent, name[:80])
        return frozenset(groups)

    def _on_hello(self, agent: str) -> None:
        """Schedule one republish of the agent's held entries handed before its announcement, HELLO_GRACE after
        its latest announcement, and at most one per interval: HELLO_EVERY, doubling (up to HELLO_EVERY_MAX)
        while the agent acknowledges nothing in between. Announcements arriving meanwhile only move `before`
        forward. A local agent that floods announcements and never acks thus costs one pass over its held
        entries per interval, not one per announcement."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = agent in self._hello_before
        self._hello_before[agent] = now
        if not pending:
            every = self._hello_every.get(agent, HELLO_EVERY)
            loop.call_at(max(now + HELLO_GRACE, self._hello_last.get(agent, float("-inf")) + every),
                         self._hello_due, agent)

    def _hello_due(self, agent: str) -> None:
        loop = asyncio.get_running_loop()
        before = self._hello_before[agent]
        if loop.time() < before + HELLO_GRACE:  # a later announcement came: its grace too
            loop.call_at(before + HELLO_GRACE, self._hello_due, agent)
            return
        del self._hello_before[agent]
        if agent not in self._acking:  # its last client said goodbye meanwhile: nothing to publish it for
            return
        self._hello_last[agent] = loop.time()
        self._hello_every[agent] = min(self._hello_every.get(agent, HELLO_EVERY / 2) * 2, HELLO_EVERY_MAX)
        self._republish_held(agent, None, before)
        self.groups.republish_held(agent, before=before)

    # -- receiving direction: hooks of the inbox (gateway/receiving.py) ----------------------------------------
    def _hold_on_pubcomp(self, e: InboxEntry) -> bool:
        """In `_drop_finished`'s transaction: True if the entry is kept as HANDED (written now) instead of
        deleted, i.e. its agent acknowledges and has not acknowledged it yet."""
        agent, mid = e.message.recipient_agent, e.message.message_id
        if agent not in self._acking:
            return self._not_held(agent, mid)  # (it said goodbye since: a republished entry leaves the index too)
        if (agent, mid) in self._early_acks:
            del self._early_acks[(agent, mid)]
            return self._not_held(agent, mid)  # the ack came first
        if self.store.inbox.get(e.name) is None:
            return self._not_held(agent, mid)  # purged meanwhile: not written back
        held = self._held.get(agent, {})
        holding = self._holding[agent]  # new holds of this batch's transaction, indexed in `_after_pubcomp`
        if mid not in held and e.name not in holding:  # (a republished held entry keeps its place)
            if len(held) + len(holding) >= self.cfg.store.held_max_per_agent:
                self._over_cap(agent)
                return False
            holding.add(e.name)
            self.store.on_rollback(lambda: holding.discard(e.name))
        self.store.inbox.put(e.name, dataclasses.replace(e, phase=Phase.HANDED, packet_id=0).record())
        return True

    def _not_held(self, agent: str, mid: bytes) -> bool:
        """The entry is deleted in this transaction: if it was indexed as held (a republish), it leaves the index
        (and comes back if the transaction rolls back)."""
        held = self._held.get(agent)
        got = held.pop(mid, None) if held is not None else None
        if held is not None and got is not None:
            self.store.on_rollback(lambda: held.__setitem__(mid, got))
        return False

    def _over_cap(self, agent: str) -> None:
        self.receipt_counters["not_held_over_cap"] += 1
        t = asyncio.get_running_loop().time()
        quiet = self._over_cap_logged.get(agent, float("-inf")) + OVER_CAP_LOG_EVERY > t
        if self.cfg.store.held_max_per_agent and not quiet:  # (a cap of 0 is the operator's choice: no warning)
            self._over_cap_logged[agent] = t
            log.warning("agent %s has %d unacknowledged message(s) held, its cap (store.held_max_per_agent): "
                        "further messages to it are not kept after the broker has them until it acknowledges "
                        "(is it reading and acknowledging? see docs/operations.md)", agent,
                        len(self._held.get(agent, ())) + len(self._holding[agent]))

    def _exchange_connect(self) -> int:
        """The broker connection a QoS 2 exchange starting now goes out in: while disconnected, paho sends the
        PUBLISH after the next connect. (If the disconnection is not noticed yet, the current one: that only
        makes the entry publish again once, needlessly.)"""
        return self.bridge.connects if self.bridge.connected else self.bridge.connects + 1

    def _after_pubcomp(self, held: list[InboxEntry]) -> None:
        """After `_drop_finished`'s commit (and after the packet ids were freed): index the entries now held."""
        when = asyncio.get_running_loop().time()
        suspects = []
        for e in held:
            self._holding[e.message.recipient_agent].discard(e.name)
            e.handed()
            self._held[e.message.recipient_agent][e.message.message_id] = (e.name, e.message.expires_at_ms,
                                                                          e.exchange_connect, when)
            if e.exchange_connect < self.bridge.connects:
                suspects.append(e.name)
        if suspects:
            # The exchange started before the broker connection it ended in: a restarted broker may have answered
            # PUBCOMP for a message it lost (a PUBREL for an id it no longer knows). Publish these again now.
            self._republish_names(set(suspects), "after a broker reconnect")

    def _restored_held(self, entries: list[InboxEntry]) -> list[InboxEntry]:
        """At start-up: index the HANDED entries (published again at the first connection: exchange in
        connection 0); returns the others."""
        rest = []
        for e in entries:
            if e.phase is Phase.HANDED:
                self._held[e.message.recipient_agent][e.message.message_id] = (e.name, e.message.expires_at_ms, 0,
                                                                              float("-inf"))
            else:
                rest.append(e)
        return rest

    def _republish_held(self, agent: str | None = None, before_connect: int | None = None,
                        before: float | None = None) -> None:
        """Publish the held entries (of one agent, or all; whose exchange started in a broker connection before
        `before_connect`, or handed before loop time `before`) again, each in a new QoS 2 exchange."""
        if not self.bridge.connected:
            return
        # Only for agents that acknowledge: one that said goodbye since keeps what it holds until a client of it
        # announces itself again (or it expires); published now, it would be deleted at PUBCOMP while no client
        # of it may be there to take it.
        wanted = {name for a, held in self._held.items() if (agent is None or a == agent) and a in self._acking
                  for name, _, connect, when in held.values()
                  if name not in self._publishing and (before_connect is None or connect < before_connect)
                  and (before is None or when < before)}
        self._republish_names(wanted, f"not yet acknowledged by {agent or 'their agents'}")

    def _republish_names(self, wanted: set[str], why: str) -> None:
        if not wanted or not self.bridge.connected:
            return
        entries = []
        for name in sorted(wanted - self._publishing):
            record = self.store.inbox.get(name)
            if record is None:
                continue
            e = InboxEntry.from_record(name, record)
            if e.phase is Phase.HANDED:
                e.to_publish_again()
                entries.append(e)
        entries.sort(key=lambda e: e.seq)
        # Claimed now, not when the task starts: an ack handled in between must see them as being published (it
        # then drops them at PUBCOMP) rather than delete an entry the task would write back and deliver again.
        self._publishing.update(e.name for e in entries)
        self.receipt_counters["republished"] += len(entries)
        log.info("publishing again %d held message(s) %s", len(entries), why)
        self._in_background(self._publish_held_again(entries))  # type: ignore[attr-defined]

    async def _publish_held_again(self, entries: list[InboxEntry]) -> None:
        """`_publish_inbox` for held entries the caller claimed. Those that get no packet id (all taken, or the
        store failed) stay HANDED in the store and wait for the next republish; one its agent acknowledged while
        it was claimed (the ack was kept as an early ack, and the entry left the index) is deleted now. Before,
        it stayed in the store outside the index, neither published again nor expired until a restart."""
        started = self._start_publishes(entries, claimed=True)  # type: ignore[attr-defined]
        self._acked_while_claimed([e for e in entries if e.phase is Phase.WAITING])
        await self._finish_publishes(started)  # type: ignore[attr-defined]

    def _acked_while_claimed(self, entries: list[InboxEntry]) -> None:
        acked = [e for e in entries if (e.message.recipient_agent, e.message.message_id) in self._early_acks]
        if not acked:
            return
        try:
            with self.store.transaction(durable=False):
                for e in acked:
                    self.store.inbox.delete(e.name)
        except StoreError as exc:  # kept, back in the index: published again later (the agent drops the copy)
            log.error("cannot delete %d acknowledged inbox entr(ies) (%s); they stay held", len(acked), exc)
            for e in acked:
                self._held[e.message.recipient_agent][e.message.message_id] = (e.name, e.message.expires_at_ms, 0,
                                                                              float("-inf"))
            return
        for e in acked:
            del self._early_acks[(e.message.recipient_agent, e.message.message_id)]
            self._held[e.message.recipient_agent].pop(e.message.message_id, None)  # (back in it after a failure)

    def _expire_held(self) -> None:
        t = now_ms()
        for agent, held in self._held.items():
            gone = [(i, name) for i, (name, expires, _, _) in held.items()
                    if expires <= t and name not in self._publishing]
            if not gone:
                continue
            with self.store.transaction(durable=False):
                for i, name in gone:
                    self.store.inbox.delete(name)
                    del held[i]
            self.receipt_counters["held_expired"] += len(gone)
            log.warning("%d message(s) handed to agent %s expired without its acknowledgement (it may have received "
                        "them; an agent that stopped acknowledging should not be remembered as acknowledging: see "
                        "docs/operations.md)", len(gone), agent)

    async def _receipts_loop(self) -> None:
        """Publish held entries again after every (re)connect to the broker (the first included), and expire them."""
        seen_connects = 0
        loop = asyncio.get_running_loop()
        expired_at = loop.time()
        while True:
            await asyncio.sleep(WATCH_EVERY)
            connects = self.bridge.connects
            if connects != seen_connects and self.bridge.connected:
                seen_connects = connects
                self._republish_held(before_connect=connects)  # (handed since: in the agent's session now)
                self.groups.republish_held(before_connect=connects)
            if loop.time() - expired_at >= EXPIRE_EVERY:
                expired_at = loop.time()
                try:
                    self._expire_held()
                    self.groups.expire_held()
                except StoreError as exc:
                    log.error("cannot expire held inbox entries (%s); retrying", exc)

    def receipts_status(self) -> dict[str, Any]:
        return {"acking_agents": sorted(self._acking),
                "acking_clients": {a: len(i) for a, i in sorted(self._instances.items())},
                "acking_groups": {a: sorted(g) for a, g in sorted(self._acking_groups.items())},
                "held": sum(len(h) for h in self._held.values()),
                **self.receipt_counters}


def _union_groups(instances: dict[bytes, frozenset[str]]) -> frozenset[str]:
    """The groups of all the agent's clients together, at most MAX_ANNOUNCED_GROUPS (those of the latest announced
    first): the bound of one client's list holds for the agent's record too."""
    union: set[str] = set()
    for groups in reversed(instances.values()):
        if len(union) + len(groups) <= MAX_ANNOUNCED_GROUPS:
            union |= groups
            continue
        for name in sorted(groups - union)[:MAX_ANNOUNCED_GROUPS - len(union)]:
            union.add(name)
        break
    return frozenset(union)


def _encode_instances(instances: dict[bytes, frozenset[str]]) -> bytes:
    """The stored value of an agent's announced clients: 0x02, then their 16-byte instance ids, oldest first."""
    return b"\x02" + b"".join(instances)


def _decode_instances(agent: str, raw: bytes) -> list[bytes]:
    """`_encode_instances` read back; 0x01 (a gateway before 2026-12-07: its clients unknown) and anything
    malformed (logged) read as `UNKNOWN`: the agent stays acknowledging, the side that loses nothing."""
    body = raw[1:]
    if raw[:1] == b"\x02" and body and len(body) % INSTANCE_SIZE == 0 and len(body) <= MAX_INSTANCES * INSTANCE_SIZE:
        return [body[i:i + INSTANCE_SIZE] for i in range(0, len(body), INSTANCE_SIZE)]
    if raw != b"\x01":
        log.warning("the stored acknowledging clients of agent %s are malformed: taken as unknown clients", agent)
    return [UNKNOWN]
