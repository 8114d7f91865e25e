"""Group messages kept for agents that acknowledge what they receive (the SDK), as pairwise messages are
(gateway/receipts.py).

Without this a group message was deleted at the broker's PUBCOMP: an SDK agent that crashed with it unread, or
was down while its session was lost (a new SDK process is a new session), or whose broker crashed before saving
it, never got it. Now, for an agent whose announcement names the group (`agw:groups`: its SDK reads the group
and acknowledges; gateway/receipts.py), a group inbox entry whose QoS 2 exchange completed becomes `HANDED`
(packet id 0, the id is free again) and stays until that agent's ack names its message id (`agw:message-id`,
the entry id). It is published again (a new QoS 2 exchange) after every (re)connect of the gateway to its
broker, at once if its exchange spanned a reconnect or began before a restart, and after the agent's
announcement (the daemon's rate limit), and deleted with a warning once it expires (`store.message_ttl_seconds`
after it was first handed). Caps: `store.held_max_per_agent` entries and HELD_MAX_BYTES_PER_AGENT of payload per
agent, HELD_MAX_BYTES for all; past them an agent's group messages are deleted at PUBCOMP, as for a raw agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.groups_store import GroupRecords, InEntry
from gateway.inbox import Phase

if TYPE_CHECKING:
    from gateway.bridge import MqttBridge
    from gateway.groups_keys import Counters
    from gateway.store import Store

log = logging.getLogger("agw.groups")

OVER_CAP_LOG_EVERY = 60.0  # seconds between warnings that an agent's held group messages reached their cap
HELD_MAX_BYTES = 16 << 20  # held group payloads of all agents together (kept in memory with the group inbox)
HELD_MAX_BYTES_PER_AGENT = 4 << 20  # ... of one agent (one that never acknowledges cannot take all of it)


@dataclass
class _HeldState:
    # agent -> entry id -> (broker connection its exchange started in, loop time it was handed, payload bytes)
    held: defaultdict[str, dict[bytes, tuple[int, float, int]]] = field(default_factory=lambda: defaultdict(dict))
    payload_bytes: int = 0  # payload bytes held, all agents
    agent_bytes: dict[str, int] = field(default_factory=dict)  # ... per agent
    acked_early: set[bytes] = field(default_factory=set)  # acked while being published: deleted at PUBCOMP
    over_cap_logged: dict[str, float] = field(default_factory=dict)


class GroupHeld:
    """Mixed into `Groups` (before `GroupKeys`, whose entry points of the same names do nothing)."""

    records: GroupRecords
    store: Store
    bridge: MqttBridge
    cfg: Any
    counters: Counters
    now_ms: Callable[[], int]
    acking_groups: dict[str, frozenset[str]]
    _publishing: set[bytes]
    _inbox_wake: asyncio.Event

    @property
    def _hstate(self) -> _HeldState:
        st: _HeldState | None = self.__dict__.get("_held_state")
        if st is None:
            st = self.__dict__["_held_state"] = _HeldState()
        return st

    def _restore_held(self) -> None:
        """At start-up: index the HANDED entries (published again at the first connection to the broker)."""
        for e in self.records.inbox():
            if e.phase == Phase.HANDED:
                self._index(e, 0, float("-inf"))

    def _exchange_connect(self) -> int:
        """The broker connection a QoS 2 exchange starting now goes out in (see `Receipts._exchange_connect`)."""
        return self.bridge.connects if self.bridge.connected else self.bridge.connects + 1

    # -- at PUBCOMP (gateway/groups_delivery.py `_flush_inbox`) ----------------------------------------------------
    def _hand_or_drop(self, done: list[InEntry]) -> list[InEntry]:
        """In `_flush_inbox`'s transaction, for entries whose exchange completed: keep as HANDED those of agents
        that acknowledge and have not acknowledged them yet, delete the others. Returns those kept."""
        st = self._hstate
        kept: list[InEntry] = []
        dropped: list[bytes] = []
        adding: dict[str, tuple[int, int]] = {}  # agent -> (entries, bytes) this batch adds
        adding_bytes = 0
        for e in done:
            held = st.held.get(e.agent, {})
            n, b = adding.get(e.agent, (0, 0))
            if e.group in self.acking_groups.get(e.agent, ()) and e.entry_id not in st.acked_early and (
                    e.entry_id in held or self._room(e.agent, n, b + len(e.payload), adding_bytes + len(e.payload))):
                kept.append(e)
                if e.entry_id not in held:
                    adding[e.agent] = (n + 1, b + len(e.payload))
                    adding_bytes += len(e.payload)
            else:
                dropped.append(e.entry_id)
        self.records.drop_in(dropped)
        ttl_ms = self.cfg.store.message_ttl_seconds * 1000 if kept else 0
        for e in kept:
            before = (e.phase, e.packet_id)
            e.phase, e.packet_id = Phase.HANDED, 0
            e.expires_ms = e.expires_ms or self.now_ms() + ttl_ms
            self.records.update_in(e)
            self.store.on_rollback(lambda e=e, before=before: _restore(e, *before))  # type: ignore[misc]
        return kept

    def _room(self, agent: str, adding: int, agent_adding_bytes: int, adding_bytes: int) -> bool:
        cap = self.cfg.store.held_max_per_agent
        st = self._hstate
        if (len(st.held.get(agent, ())) + adding < cap and st.payload_bytes + adding_bytes <= HELD_MAX_BYTES
                and st.agent_bytes.get(agent, 0) + agent_adding_bytes <= HELD_MAX_BYTES_PER_AGENT):
            return True
        self.counters.held_not_kept_over_cap += 1
        t = asyncio.get_running_loop().time()
        if cap and self._hstate.over_cap_logged.get(agent, float("-inf")) + OVER_CAP_LOG_EVERY <= t:
            self._hstate.over_cap_logged[agent] = t
            log.warning("agent %s has %d unacknowledged group message(s) held, %d KiB (caps: "
                        "store.held_max_per_agent messages and %d MiB per agent, %d MiB for all agents, now %d KiB): "
                        "further group messages to it are not kept after the broker has them until it "
                        "acknowledges (see docs/operations.md)", agent, len(st.held.get(agent, ())),
                        st.agent_bytes.get(agent, 0) >> 10, HELD_MAX_BYTES_PER_AGENT >> 20, HELD_MAX_BYTES >> 20,
                        st.payload_bytes >> 10)
        return False

    def _after_handed(self, done: list[InEntry], kept: list[InEntry]) -> None:
        """After that commit: index what is held now, forget what was deleted; an exchange that spanned a broker
        reconnect may have ended in a PUBCOMP from a restarted broker that lost the message: published again."""
        st = self._hstate
        when = asyncio.get_running_loop().time()
        kept_ids = {e.entry_id for e in kept}
        for e in done:
            st.acked_early.discard(e.entry_id)
            if e.entry_id not in kept_ids:
                self._unindex(e.agent, e.entry_id)
        for e in kept:
            self._unindex(e.agent, e.entry_id)  # (a republished one: indexed again)
            self._index(e, e.exchange_connect, when)
        suspects = [e.entry_id for e in kept if e.exchange_connect < self.bridge.connects]
        if suspects:
            self._publish_again(suspects, "after a broker reconnect")

    # -- the daemon's entry points (gateway/receipts.py) -----------------------------------------------------------
    def acked(self, agent: str, ids: list[bytes]) -> list[bytes]:
        """`agent` acknowledged `ids`: delete its group entries among them (or, if being published, at their
        PUBCOMP). Returns the ids that name none of its group entries (pairwise ones, for the caller)."""
        st = self._hstate
        rest, drop = [], []
        for i in ids:
            e = self.records.inbox_entry(i)
            if e is None or e.agent != agent:
                rest.append(i)
            elif i in self._publishing or e.phase in (Phase.PUBLISHED, Phase.BROKER_HAS):
                st.acked_early.add(i)  # its exchange (holding a packet id) goes on, or resumes: deleted at PUBCOMP
            else:
                drop.append(i)
        if drop:
            with self.store.transaction(durable=False):
                self.records.drop_in(drop)
            for i in drop:
                self._unindex(agent, i)
        return rest

    def _index(self, e: InEntry, connect: int, when: float) -> None:
        st = self._hstate
        st.held[e.agent][e.entry_id] = (connect, when, len(e.payload))
        st.payload_bytes += len(e.payload)
        st.agent_bytes[e.agent] = st.agent_bytes.get(e.agent, 0) + len(e.payload)

    def _unindex(self, agent: str, entry_id: bytes) -> None:
        st = self._hstate
        got = st.held.get(agent, {}).pop(entry_id, None)
        if got is not None:
            st.payload_bytes -= got[2]
            st.agent_bytes[agent] -= got[2]

    def republish_held(self, agent: str | None = None, *, before_connect: int | None = None,
                       before: float | None = None) -> None:
        """Publish again the held entries (of one agent, or all; whose exchange started in a broker connection
        before `before_connect`, or handed before loop time `before`), each in a new QoS 2 exchange."""
        if not self.bridge.connected:
            return
        # Only those of groups their agent still reads: an entry of a group whose last reading client said
        # goodbye since keeps waiting for a client that announces it again (or its expiry); published now, it
        # would be deleted at PUBCOMP while no client of the agent may be there to take it.
        wanted = [i for a, held in self._hstate.held.items()
                  if (agent is None or a == agent) and a in self.acking_groups
                  for i, (connect, when, _) in held.items()
                  if (before_connect is None or connect < before_connect) and (before is None or when < before)]
        self._publish_again(wanted, f"not yet acknowledged by {agent or 'their agents'}", still_read=True)

    def _publish_again(self, ids: list[bytes], why: str, *, still_read: bool = False) -> None:
        """`still_read`: only the entries whose group their agent still reads (`acking_groups`)."""
        entries = [e for e in map(self.records.inbox_entry, ids)
                   if e is not None and e.phase == Phase.HANDED and e.entry_id not in self._publishing
                   and (not still_read or e.group in self.acking_groups.get(e.agent, ()))]
        if not entries:
            return
        with self.store.transaction(durable=False):
            for e in entries:
                e.phase = Phase.WAITING  # the inbox loop takes it again, in arrival order, under a new packet id
                self.records.update_in(e)
                self.store.on_rollback(lambda e=e: _restore(e, Phase.HANDED, 0))  # type: ignore[misc]
        self.counters.held_republished += len(entries)
        log.info("publishing again %d held group message(s) %s", len(entries), why)
        self._inbox_wake.set()

    def expire_held(self) -> None:
        """Delete held entries past their expiry (their agent never acknowledged them)."""
        t = self.now_ms()
        for agent, held in self._hstate.held.items():
            gone = [i for i in held if i not in self._publishing
                    and ((e := self.records.inbox_entry(i)) is None
                         or (e.phase == Phase.HANDED and 0 < e.expires_ms <= t))]
            if not gone:
                continue
            with self.store.transaction(durable=False):
                self.records.drop_in(gone)
            for i in gone:
                self._unindex(agent, i)
            self.counters.held_expired += len(gone)
            log.warning("%d group message(s) handed to agent %s expired without its acknowledgement (it may have "
                        "received them; see docs/operations.md)", len(gone), agent)

    def held_count(self) -> int:
        return sum(len(h) for h in self._hstate.held.values())


def _restore(e: InEntry, phase: int, packet_id: int) -> None:
    e.phase, e.packet_id = phase, packet_id
