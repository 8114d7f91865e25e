"""The receiving half of the gateway: frames from the relay, into the inbox, out to local agents.

relay -> verify + decrypt -> drop duplicates -> consent -> inbox (durable) -> end-to-end ACK -> MQTT QoS 2 to
the agent's topic under a stored packet id -> after the broker's PUBCOMP the inbox entry goes. A restart resumes
each exchange where it stood (gateway/inbox.py), so the agent gets each message once. A bad envelope from one
peer is audited and dropped without disturbing the others. First contact from a peer agent not on the allowlist
is held for the operator (`agw consent allow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from gateway import stages, topics
from gateway.bridge import (
    BrokerLostMessage,
    BrokerUnavailable,
    Done,
    PublishProperties,
    encode_publish_properties_body,
    user_property_name,
    with_user_property,
)
from gateway.inbox import InboxEntry, InboxRecordError, Phase
from gateway.link import LinkDownError, LinkLost, LinkReady
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.errors import ProtocolError
from gateway.protocol.link import Delivered, NotDelivered, UndeliverableReason
from gateway.protocol.message import InnerMessage, Kind, RejectReason, new_message_id
from gateway.runtime import now_ms
from gateway.sending import CONGESTED_RETRY_MS, OFFLINE_RETRY_MS
from gateway.store import ConsentState, StoreClosed, StoreError

log = logging.getLogger("agw.daemon")

PENDING_RETRY_MS = 30_000
# Messages handed to the local broker and not yet complete. Past this the gateway stops taking frames from the
# relay until the broker catches up: the relay then holds (and finally refuses, "congested") what is meant for us,
# and the sender slows down. Without it a slow broker or agent makes the gateway hold the backlog in memory. Each
# message in this state costs ~4 KB (inbox entry, task, paho message and packet); 128 (was 512) took ~2 MB off the
# receiver's peak RSS in a 256 B burst with no loss of throughput (docs/performance.md, 2026-12-07). The check is
# made before a frame is taken and before each further slice of it (RECEIVE_SLICE), so one slice may add to it.
PUBLISH_BACKLOG = 128
# A frame from the relay is handled in slices of at most this many data messages (decrypt, admit, inbox commit,
# publishes, ACKs), with the PUBLISH_BACKLOG check before each: a frame may carry the sender's whole window (512
# messages per peer), and all of it decoded, stored and handed to paho at once set the receiver's peak memory
# (docs/performance.md, 2026-12-07, branch mem7). The sender's batches have at most 256 (gateway/sending.py).
RECEIVE_SLICE = 256
# How long a frame's end-to-end ACKs wait for the broker's PUBREC of the messages they name (see _on_delivered),
# in seconds; under load (paho's in-flight window full) they go after this.
ACK_WAIT_MAX = 0.005
# How long the deletes of entries whose PUBCOMP came may wait, in seconds, for the commit of the next PUBREC batch
# (`_broker_has`) to join: under load PUBRECs come every few milliseconds, and a transaction of its own per read of
# PUBCOMPs was ~1/3 of the receiver's commits. Past this `_drop_finished` commits them alone. Meanwhile they keep
# their packet ids and claims (see `_delivered_to_broker`) but no longer count against PUBLISH_BACKLOG.
FINISHED_WAIT_MAX = 0.005
FOLD_RETRY_S = 10.0  # after a failed fold of the recent delivered ids, the next try (see `_fold_delivered`)
# The daemon's maintenance tick (every second) makes the delivered ids' due steps itself once the receiver has made
# none for this long (`_fold_idle`: a gateway whose ids come from the group service, or whose relay traffic stopped),
# at most FOLD_TICK_STEPS per tick, each in a turn of the event loop of its own.
FOLD_IDLE_S = 1.0
FOLD_TICK_STEPS = 4
# Topics and encoded properties kept for this many shapes of message (recipient, sender, user properties, ...:
# see `Receiving._publish_shape`), each at most PUBLISH_SHAPE_BYTES of properties (a peer's large user properties
# are encoded per message, as before, not kept: the table stays under ~200 KB); past it the table starts again.
PUBLISH_SHAPES = 128
PUBLISH_SHAPE_BYTES = 512
_MESSAGE_ID_PROPERTY = user_property_name(topics.PROP_MESSAGE_ID)


@dataclass(frozen=True, slots=True)
class Verdict:
    """How to answer a DATA message: publish it (then ACK), ACK it at once, or REJECT it with a reason."""

    ack: bool
    reason: RejectReason | None = None
    publish: bool = False


class Exchanges:
    """The QoS 2 exchanges `_start_publishes` started together: each ends through `ended`, called by the bridge
    (`begin_exactly_once`) at its PUBCOMP or failure; `_finish_publishes` waits for them all. A callback per
    exchange, not a future (and a coroutine and task, before that) per message: creating and scheduling them cost
    more than the rest of this step."""

    __slots__ = ("_rx", "all_done", "errors", "left", "refused", "started", "total", "under_way")

    def __init__(self, rx: Receiving, total: int) -> None:
        self._rx = rx
        self.total = total  # entries asked for (some may have waited for a packet id)
        self.started = 0  # exchanges started (or failed to start)
        self.under_way: set[int] = set()  # packet ids of those whose PUBLISH (or PUBREL) left
        self.left = 0
        self.refused = 0
        self.errors: list[BaseException] = []
        self.all_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def ended(self, e: InboxEntry, packet_id: int, exc: BaseException | None) -> None:
        rx = self._rx
        try:
            rx._in_flight.pop(packet_id, None)
            if exc is None:
                rx._delivered_to_broker(e)
                return
            rx._publishing.discard(e.name)
            rx._publish_room.set()
            if not isinstance(exc, BrokerUnavailable):
                self.errors.append(exc)
                return
            self.refused += 1
            if isinstance(exc, BrokerLostMessage):
                rx._exchange_lost(e)
            log.warning("the broker refused a message for %s: %s", e.message.recipient_agent, exc)
        finally:
            self.left -= 1
            if not self.left and not self.all_done.done():
                self.all_done.set_result(None)

ACK = Verdict(True)
PUBLISH = Verdict(False, publish=True)  # deliver to the agent, then ACK


class Receiving:
    """Mixed into `Gateway`: the methods of the receiving half."""

    _fold_after = 0.0  # (monotonic) no fold of the delivered ids before this, after a failed one
    _folded_at = float("-inf")  # (monotonic) the receiver's last step of the delivered ids (see `_fold_idle`)
    _drop_due: asyncio.TimerHandle | None = None  # `_drop_finished` scheduled for `_finished` (FINISHED_WAIT_MAX)

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
                    await self._wait_publish_room()
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

    async def _wait_publish_room(self) -> None:
        """Wait while PUBLISH_BACKLOG messages are handed to the broker and not complete (checked before each slice
        of a frame is taken: see `_on_delivered`)."""
        while len(self._publishing) - len(self._finished) >= PUBLISH_BACKLOG:
            self._publish_room.clear()
            await self._publish_room.wait()

    async def _on_delivered(self, envelopes: tuple[Envelope, ...]) -> None:
        """Handle a frame from the relay in slices of at most RECEIVE_SLICE messages, in order, each as a whole frame
        was before: one transaction to decrypt, one to store into the inbox, concurrent publishes, its ACKs. Before
        each slice but the first (the caller waits before the frame) the PUBLISH_BACKLOG check is made again, so
        the receiver holds at most the bound plus one slice, not plus one frame (up to the sender's window, 512
        messages per peer: their decoded messages, inbox entries, records and PUBLISH packets at once)."""
        if self.store.delivered.fold_due and time.monotonic() >= self._fold_after:
            self._fold_delivered()
            self._folded_at = time.monotonic()
        carried: list[tuple[str, InnerMessage, bytes]] = []  # opened beyond a slice (a large batch), in order
        i = 0  # the next envelope to open
        while True:
            data, carried, i = self._open_slice(envelopes, i, carried)
            await self._on_slice(data)
            if not carried and i >= len(envelopes):
                return
            await self._wait_publish_room()

    def _open_slice(self, envelopes: tuple[Envelope, ...], i: int, carried: list[tuple[str, InnerMessage, bytes]]
                    ) -> tuple[list[tuple[str, InnerMessage, bytes]], list[tuple[str, InnerMessage, bytes]], int]:
        """Open envelopes from `envelopes[i]` on, in one transaction, until RECEIVE_SLICE data messages (with those
        `carried` from the last envelope of the previous slice) are at hand or the frame ends; the ACKs and REJECTs
        among them are handled at once. Returns the slice's (peer, message, plaintext), those opened beyond it and
        the next envelope to open."""
        data = carried[:RECEIVE_SLICE]
        rest = carried[RECEIVE_SLICE:]
        if rest or len(data) == RECEIVE_SLICE:
            return data, rest, i
        t = now_ms()
        frame_ns = time.time_ns() if stages.enabled else 0
        with self.store.transaction(durable=False):
            while len(data) < RECEIVE_SLICE and i < len(envelopes):
                env = envelopes[i]
                i += 1
                for inner, raw in self._open(env):
                    if inner.kind is Kind.ACK:
                        self.counters.acked += self.store.outbox.delete_many(inner.ids)
                        self._settled(env.sender, inner.ids)
                        self._handover.remove(env.sender, inner.ids)  # (held ids are not sent yet: none, normally)
                    elif inner.kind is Kind.REJECT:
                        assert inner.reason is not None
                        self._settled(env.sender, inner.ids)
                        self._handover.remove(env.sender, inner.ids)
                        if inner.reason.is_final:
                            self.store.outbox.delete_many(inner.ids)
                            self.store.audit.append({"type": "message.refused", "peer": env.sender,
                                                     "reason": inner.reason.name, "count": len(inner.ids)}, t)
                        else:
                            self.store.outbox.mark_attempts(inner.ids, t + PENDING_RETRY_MS)
                    else:
                        data.append((env.sender, inner, raw))
            self.book.flush()
        if stages.enabled:
            stages.mark("b.frame", (inner.message_id for _, inner, _ in data), frame_ns)
            stages.mark("b.opened", (inner.message_id for _, inner, _ in data))
        if len(data) > RECEIVE_SLICE:
            data, rest = data[:RECEIVE_SLICE], data[RECEIVE_SLICE:]
        return data, rest, i

    async def _on_slice(self, data: list[tuple[str, InnerMessage, bytes]]) -> None:
        """Admit a slice's data messages, store the accepted ones in the inbox (one commit), start their publishes
        and send the slice's ACKs once that commit is made (see `_on_delivered`)."""
        acks: dict[str, list[bytes]] = defaultdict(list)
        accepted: list[tuple[str, InnerMessage, bytes]] = []
        # Allowed/denied, fixed for this slice, not the frame: between two slices the frame may wait for the broker
        # as long as it is stalled, and a consent change meanwhile must hold for the next slice.
        settled: dict[tuple[str, str, str], ConsentState] = {}
        # Ids delivered (or held) before: one query for the whole slice (those of the frame's earlier slices are
        # in the store by then: marked in their inbox commit). A second copy of an id within the slice (a sender's
        # retry next to the original) is a duplicate of the first.
        # The ids' row keys are computed once, for this lookup and for marking those accepted.
        data_ids = [inner.message_id for _, inner, _ in data]
        keys = self.store.delivered.keys(data_ids)
        seen = self.store.delivered.seen_many(data_ids, keys) if data else set()
        for peer, inner, raw in data:
            verdict = self._admit(peer, inner, settled, seen)
            if verdict.publish or verdict.ack:
                seen.add(inner.message_id)
            if verdict.publish:
                accepted.append((peer, inner, raw))
            elif verdict.ack:
                acks[peer].append(inner.message_id)
            elif verdict.reason is not None:
                await self._send_reject(peer, inner, verdict.reason)
        stages.mark("b.admitted", (inner.message_id for _, inner, _ in accepted))
        if accepted:
            # Into the inbox first: once it is there the sender may forget the message, and a broker outage
            # here never stalls the sender's retries.
            entries = [InboxEntry.new(peer, self._inbox_seq(), inner, raw) for peer, inner, raw in accepted]
            t = now_ms()
            with self._inbox_writes(), self.store.transaction(durable=self.cfg.store.durability == "power-loss"):
                for e in entries:
                    self._give_packet_id(e)
                    acks[e.peer_device].append(e.message.message_id)
                ids = [e.message.message_id for e in entries]
                row_keys = dict(zip(data_ids, keys, strict=True))
                self.store.delivered.mark_many(ids, t, [row_keys[i] for i in ids])
                self.store.inbox.put_many([(e.name, e.record()) for e in entries])
                self.pubrec_marks.write(cleared=[e.packet_id for e in entries if e.in_exchange])
            stages.mark("b.stored", (e.message.message_id for e in entries))
            # The PUBLISH packets leave now, before the ACKs are encrypted (the agent's copy is on its way first);
            # their completion is awaited in the background, so the next slice (or frame from the relay) is
            # decrypted while the broker works.
            self._publishing.update(e.name for e in entries)
            started = self._start_publishes(entries, claimed=True)
            self._in_background(self._finish_publishes(started))
            under_way = started.under_way
            if under_way:
                # The slice's ACKs go once the broker has these messages (PUBREC recorded, PUBREL sent), or after
                # ACK_WAIT_MAX: encrypting and sending them costs ~0.2 ms of this loop, which would otherwise
                # stand between the broker's PUBREC and our PUBREL, i.e. on every message's way to its agent.
                # The sender needs the ACK only to forget the message, which is safe as of the inbox commit.
                recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                wait = (recorded, under_way)  # (one tuple for the slice's packet ids)
                for packet_id in under_way:
                    self._ack_waits[packet_id] = wait
                self._in_background(self._send_acks_when(recorded, under_way, acks))
                return
        await self._send_acks(acks)

    def _fold_delivered(self) -> None:
        """One step of moving the delivered ids on (`DeliveredIds.fold`: the recent ids into `delivered_mid`, or one
        merge step of that into `delivered`): between frames, in a transaction of its own, not inside a frame's
        fsync'd inbox commit; each step is short (a few hundred pages at most), one per frame. A failure costs
        nothing but the step (the ids stay where they are, found as before); the store folds the recent ids itself
        inside a later write past its bound. After a failure (e.g. near the store's size cap: a step inserts before
        it deletes) the next try waits FOLD_RETRY_S, so a store that keeps refusing costs one failed transaction
        and one log line per interval, not one per frame."""
        try:
            self.store.delivered.fold()
        except StoreError as exc:
            self._fold_after = time.monotonic() + FOLD_RETRY_S
            log.warning("cannot fold the recent delivered ids (%s); trying again in %.0f s", exc, FOLD_RETRY_S)

    async def _fold_idle(self) -> int:
        """The delivered ids' steps nobody else makes (the daemon's maintenance tick; returns how many it made).
        The receiver makes one per frame when due, but the group service marks ids too (SDK group sends) and makes
        none, and a receiver whose relay traffic stops makes no more: without this a round of merge steps stayed
        under way with nobody to finish it, and every further fold (by the store's bound, inside the group
        service's durable commit) went into an ever larger `delivered_mid`. So once the receiver has made no step
        for FOLD_IDLE_S, up to FOLD_TICK_STEPS due steps, each `_fold_delivered` as the receiver's (a transaction
        of its own, not fsynced, a failure logged and retried after FOLD_RETRY_S, never ending the daemon), each in
        a turn of the loop of its own, so a frame or a batch arriving meanwhile comes first. Runs between other
        work, never inside a transaction (no store transaction stays open across an await)."""
        steps = 0
        while steps < FOLD_TICK_STEPS and self.store.delivered.fold_due:
            t = time.monotonic()
            if t < self._fold_after or t - self._folded_at < FOLD_IDLE_S:
                break
            self._fold_delivered()
            steps += 1
            await asyncio.sleep(0)
        return steps

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_acks_when(self, recorded: asyncio.Future[None], packet_ids: set[int],
                              acks: dict[str, list[bytes]]) -> None:
        try:
            await asyncio.wait_for(recorded, ACK_WAIT_MAX)
        except TimeoutError:
            pass
        finally:
            for packet_id in packet_ids:  # (left after a timeout; an id taken again since belongs to another frame)
                if self._ack_waits.get(packet_id, (None,))[0] is recorded:
                    del self._ack_waits[packet_id]
        await self._send_acks(acks)

    def _acks_may_go(self, packet_ids: list[int]) -> None:
        """The broker has these (see `_broker_has`): the ACKs waiting for nothing else may go."""
        for packet_id in packet_ids:
            wait = self._ack_waits.pop(packet_id, None)
            if wait is not None:
                recorded, ids = wait
                ids.discard(packet_id)
                if not ids and not recorded.done():
                    recorded.set_result(None)

    def _inbox_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _give_packet_id(self, e: InboxEntry) -> bool:
        """Hold an MQTT packet id for the entry (stored with it before anything is sent); False while the broker
        has too many of ours outstanding (the entry waits)."""
        if e.phase is not Phase.WAITING:
            return True
        packet_id = self.bridge.reserve_packet_id()
        if packet_id is None:
            return False
        e.packet_id, e.phase = packet_id, Phase.PUBLISHED
        e.exchange_connect = self._exchange_connect()  # (receipts: see gateway/receipts.py)
        return True

    def restore_inbox(self) -> list[InboxEntry]:
        """At start-up, before anything is published: the entries left by the last run, in arrival order, with
        their packet ids held again so no new message takes one."""
        entries = []
        for name, record in self.store.inbox.items():
            try:
                entries.append(self._inbox_entry(name, record))
            except InboxRecordError as exc:
                log.error("%s; left in the store", exc)
        for e in entries:
            if e.in_exchange:
                self.bridge.claim_packet_id(e.packet_id)
        self._seq = max([self._seq, *(e.seq for e in entries)])
        entries = self._restored_held(entries)  # receipts: HANDED entries wait for the broker (gateway/receipts.py)
        return sorted(entries, key=lambda e: e.seq)

    def _inbox_entry(self, name: str, record: bytes) -> InboxEntry:
        """An entry read from the store, with its PUBREC mark applied (PUBLISHED + mark = BROKER_HAS)."""
        e = InboxEntry.from_record(name, record)
        if e.phase is Phase.PUBLISHED and self.pubrec_marks.has(e.packet_id, e.name):
            e.phase = Phase.BROKER_HAS
        return e

    @contextlib.contextmanager
    def _inbox_writes(self) -> Iterator[None]:
        """Around a transaction that writes PUBREC marks: if it fails, the marks held in memory are read again."""
        try:
            yield
        except BaseException:
            self.pubrec_marks.forget()
            raise

    def _broker_has(self, packet_ids: list[int]) -> None:
        """The broker answered PUBREC: record it before the PUBREL that makes it deliver (see gateway/inbox.py).
        A crash of the process, not a power loss, is what this must survive: the broker's own state does not
        survive a power loss either."""
        entries = [e for e in map(self._in_flight.get, packet_ids) if e is not None and e.phase is Phase.PUBLISHED]
        stages.mark("b.pubrec", (e.message.message_id for e in entries))
        for e in entries:
            e.phase = Phase.BROKER_HAS
        # The entries whose PUBCOMP was read in the same event (under load, most events bring both) are dropped in
        # this commit instead of one more transaction from `_drop_finished` (scheduled for them: it then finds
        # nothing to do). What follows their commit runs right after it, as there: an agent's ack handled between
        # the two would find a held entry neither indexed as held nor still due, and it would stay held.
        done, self._finished = self._finished, []
        held: list[InboxEntry] = []
        try:
            with self._inbox_writes(), self.store.transaction(durable=False):
                # One sealed record per 64 packet ids, not the entries re-sealed (gateway/inbox.py, PubrecMarks).
                self.pubrec_marks.write(marked=[(e.packet_id, e.name) for e in entries])
                if done:
                    held = self._store_finished(done)
        except BaseException:
            for e in entries:
                e.phase = Phase.PUBLISHED  # not recorded: the bridge retries the batch
            self._finished[:0] = done  # (the `_drop_finished` scheduled for them retries)
            raise
        if done:
            if self._drop_due is not None:  # (nothing was added since: this ran without a turn of the loop)
                self._drop_due.cancel()
                self._drop_due = None
            self._finished_stored(done, held)  # (`_after_pubcomp` publishes again only from a task it starts)
        if self._ack_waits:
            self._acks_may_go(packet_ids)  # (they run after this returns, i.e. after the PUBREL is written)

    def _broker_lost_session(self, packet_ids: list[int]) -> None:
        """The broker lost our session and the bridge publishes these exchanges again as new ones: the broker's
        earlier PUBREC no longer holds. Clear their marks (a kill -9 before the new PUBREC must restart them with
        a PUBLISH, not a PUBREL that the broker would answer PUBCOMP without delivering)."""
        entries = [e for e in map(self._in_flight.get, packet_ids) if e is not None and e.phase is Phase.BROKER_HAS]
        if not entries:
            return
        for e in entries:
            e.phase = Phase.PUBLISHED
        try:
            with self._inbox_writes(), self.store.transaction(durable=False):
                self.pubrec_marks.write(cleared=[e.packet_id for e in entries])
        except StoreError as exc:  # the window stays open for these: say so, keep running
            log.error("cannot clear the PUBREC marks of %d message(s) published again (%s): a gateway crash "
                      "before the broker's new PUBREC could lose them", len(entries), exc)

    async def _publish_inbox(self, entries: list[InboxEntry], *, claimed: bool = False) -> None:
        """Hand inbox entries to the broker (in order, pipelined), exactly once each, and drop each entry after
        the broker's PUBCOMP. Entries are claimed in `_publishing` first (by the caller when `claimed`), so no
        entry is published twice at once."""
        await self._finish_publishes(self._start_publishes(entries, claimed=claimed))

    def _start_publishes(self, entries: list[InboxEntry], *, claimed: bool = False) -> Exchanges:
        """The first half of `_publish_inbox`, without a turn of the event loop: claim the entries, store packet
        ids for those waiting for one, and write their PUBLISH packets (in order). Returns the exchanges started
        (an error that stopped one is raised by `_finish_publishes`, as before in the background)."""
        if not claimed:
            entries = [e for e in entries if e.name not in self._publishing]
            self._publishing.update(e.name for e in entries)
        waiting = [e for e in entries if e.phase is Phase.WAITING]
        if waiting:
            try:
                with self._inbox_writes(), self.store.transaction(durable=False):  # the id stored before the PUBLISH
                    given = [e for e in waiting if self._give_packet_id(e)]
                    for e in given:
                        self.store.inbox.put(e.name, e.record())
                    self.pubrec_marks.write(cleared=[e.packet_id for e in given])
            except StoreError as exc:  # not stored: they wait again (the 1 s inbox loop retries), nothing sent
                for e in waiting:
                    if e.phase is Phase.PUBLISHED:
                        self.bridge.free_packet_id(e.packet_id)
                        e.phase, e.packet_id = Phase.WAITING, 0
                log.error("cannot store packet ids for %d waiting inbox entr(ies) (%s); retrying", len(waiting), exc)
        ready = [e for e in entries if e.phase is not Phase.WAITING]
        self._publishing.difference_update(e.name for e in entries if e.phase is Phase.WAITING)
        self._publish_room.set()
        started = Exchanges(self, len(entries))
        started.started = started.left = len(ready)
        ended = started.ended  # (one bound method for the exchanges' callbacks, not one each)
        for e in ready:
            packet_id = e.packet_id  # (`_exchange_lost` may reset the entry's)
            self._in_flight[packet_id] = e
            try:
                self._publish_to_agent(e, functools.partial(ended, e, packet_id))
            except Exception as exc:
                started.ended(e, packet_id, exc)
            else:
                started.under_way.add(packet_id)
        return started

    async def _finish_publishes(self, started: Exchanges) -> None:
        """The second half of `_publish_inbox`: each exchange's PUBCOMP drops its entry (`Exchanges.ended`).
        Raises the first error that was not the broker's refusal, once every exchange ended."""
        if started.left:
            await started.all_done
        if started.errors:
            raise started.errors[0]
        if started.refused or started.started < started.total:
            log.warning("%d message(s) wait in the inbox for the MQTT broker",
                        started.refused + started.total - started.started)

    def _exchange_lost(self, e: InboxEntry) -> None:
        """The broker lost the message after its PUBREC (restarted from an older save): nothing was delivered, so
        the entry starts over as WAITING (a new packet id, a new exchange: `_inbox_loop` publishes it again).
        If this cannot be stored, the entry stays BROKER_HAS and the next attempt lands here again."""
        log.warning("the MQTT broker lost a message for %s after acknowledging it (restarted?); publishing it "
                    "again", e.message.recipient_agent)
        packet_id = e.packet_id
        e.phase, e.packet_id = Phase.WAITING, 0
        try:
            with self.store.transaction(durable=False):
                self.store.inbox.update_many([(e.name, e.record())])
        except StoreError as exc:
            log.error("cannot record that the broker lost a message (%s); retrying later", exc)
            e.phase, e.packet_id = Phase.BROKER_HAS, packet_id
            return
        self.bridge.free_packet_id(packet_id)

    def _delivered_to_broker(self, e: InboxEntry) -> None:
        """PUBCOMP came: the entry goes, in the commit of the next PUBREC batch (`_broker_has`), or at most
        FINISHED_WAIT_MAX later in one commit with the others completed meanwhile (`_drop_finished`). A crash
        before that commit is harmless (the restart sends PUBREL again and the broker answers PUBCOMP), but the
        entry stays claimed and its packet id held until the commit, so neither is reused meanwhile. It no longer
        counts against PUBLISH_BACKLOG: a relay link waiting for room may go on."""
        if not self._finished:
            self._drop_due = asyncio.get_running_loop().call_later(FINISHED_WAIT_MAX, self._drop_finished)
        self._finished.append(e)
        if not self._publish_room.is_set():
            self._publish_room.set()

    def _drop_finished(self) -> None:
        self._drop_due = None
        done, self._finished = self._finished, []
        if not done:
            return  # (taken by `_broker_has`, in its commit)
        try:
            with self.store.transaction(durable=False):
                held = self._store_finished(done)
        except StoreClosed:
            return  # shut down (`_close_receiving` ran): the restart's PUBREL settles them, answered by PUBCOMP
        except StoreError as exc:
            log.error("cannot drop %d delivered inbox entries (%s); retrying", len(done), exc)
            if not self._finished:
                self._drop_due = asyncio.get_running_loop().call_later(1.0, self._drop_finished)
            self._finished[:0] = done
            return
        self._finished_stored(done, held)

    def _settle_finished(self) -> None:
        """The completed entries waiting for their commit (`_delivered_to_broker`) are committed now, not at their
        timer: before an agent's last goodbye (gateway/receipts.py), so that what its broker completed before the
        goodbye is held as for an agent that acknowledges. A failed commit retries as `_drop_finished` does."""
        if self._drop_due is not None:
            self._drop_due.cancel()
            self._drop_due = None
        if self._finished:
            self._drop_finished()

    def _close_receiving(self) -> None:
        """At shutdown, before the store closes: the deletes of completed entries still waiting for a PUBREC commit
        (`_delivered_to_broker`) are committed now, and their timer cancelled, so it cannot fire on a closed store
        while the loop winds down (and the restart has no PUBREL left to send for them)."""
        if self._drop_due is not None:
            self._drop_due.cancel()
        self._drop_finished()
        if self._drop_due is not None:  # (the commit failed and `_drop_finished` scheduled a retry: too late)
            self._drop_due.cancel()
            self._drop_due = None

    def _store_finished(self, done: list[InboxEntry]) -> list[InboxEntry]:
        """In the caller's transaction: delete the entries whose PUBCOMP came, or keep them HANDED (receipts: until
        an acking agent acks); returns those kept."""
        held: list[InboxEntry] = []
        gone = []
        for e in done:
            if self._hold_on_pubcomp(e):
                held.append(e)
            else:
                gone.append(e.name)
        self.store.inbox.delete_many(gone)
        return held

    def _finished_stored(self, done: list[InboxEntry], held: list[InboxEntry]) -> None:
        """After the commit of `_store_finished`: the packet ids and claims go, the held entries are indexed. It
        runs inside the bridge's PUBREC callback too (`_broker_has`): nothing here may raise into it, or the
        PUBRECs it recorded would be reported unrecorded and their PUBRELs held back."""
        for e in done:
            self.bridge.free_packet_id(e.packet_id)
            self._publishing.discard(e.name)
        self.counters.delivered += len(done)
        self._publish_room.set()
        try:
            self._after_pubcomp(held)
        except Exception as exc:  # (reading back entries to publish again: a store error)
            log.error("could not publish again %d held inbox entr(ies) at once (%s); they go at the next broker "
                      "reconnect or announcement of their agent", len(held), exc)

    async def _inbox_loop(self, pending: list[InboxEntry]) -> None:
        """Resume the exchanges a restart interrupted, then retry entries left behind by a broker outage."""
        while True:
            if self.bridge.connected and pending:
                await self._publish_inbox(pending)
                pending = []
            await asyncio.sleep(1.0)
            if self.bridge.connected:  # (while the broker is away the inbox only grows: no need to read it)
                pending = [e for e in self._stored_inbox(skip=self._publishing)
                           if e.phase is not Phase.HANDED]  # (held entries: gateway/receipts.py)

    def _stored_inbox(self, skip: set[str] | frozenset[str] = frozenset()) -> list[InboxEntry]:
        """The stored entries but those named in `skip` (being published: not unsealed nor parsed, as under load
        most are)."""
        entries = []
        for name, record in self.store.inbox.items(skip=skip):
            try:
                entries.append(self._inbox_entry(name, record))
            except InboxRecordError:
                continue  # reported once at start-up
        return sorted(entries, key=lambda e: e.seq)

    def _open(self, env: Envelope) -> list[tuple[InnerMessage, bytes]]:
        """Verify and decrypt one envelope (a v2 batch: verify its signature once, then decrypt each message),
        each message with the plaintext it was decoded from (the inbox stores it, instead of encoding the message
        again). A bad envelope, or a bad message inside a verified batch, is audited and dropped without
        disturbing the rest."""
        try:
            if env.kind is EnvelopeKind.PAIRWISE_BATCH:
                out = []
                for r in self.book.decrypt_batch(env.sender, env.ciphertext):
                    if isinstance(r, ProtocolError):
                        self._rejected(env, r)
                        continue
                    try:
                        out.append((InnerMessage.decode(r), bytes(r)))
                    except ProtocolError as exc:
                        self._rejected(env, exc)
                return out
            raw = bytes(self.book.decrypt(env.sender, env.ciphertext))
            return [(InnerMessage.decode(raw), raw)]
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

    def _publish_to_agent(self, e: InboxEntry, done: Done) -> None:
        """Write the entry's PUBLISH (or PUBREL) now; `done` is called when the exchange ended (None at
        PUBCOMP)."""
        inner = e.message
        if stages.enabled:
            stages.mark("b.publish", (inner.message_id,))
        topic, body = self._publish_shape(e.peer_device, inner)
        self.bridge.begin_exactly_once(
            e.packet_id, topic, inner.payload,
            PublishProperties.encoded(with_user_property(body, _MESSAGE_ID_PROPERTY, inner.message_id.hex())),
            released=e.phase is Phase.BROKER_HAS, on_broker_has=self._broker_has, on_done=done)

    def _publish_shape(self, peer_device: str, inner: InnerMessage) -> tuple[str, bytes]:
        """The topic and the properties (but the message id, appended last) of the message's PUBLISH. They are the
        same for every message of a stream (same agents, same user properties, no correlation data): kept per such
        shape (`PUBLISH_SHAPES` of them, small ones only), so a message encodes only its id instead of building paho's
        `Properties` (3.8% of the receiver's samples, docs/performance.md)."""
        key = (inner.recipient_agent, peer_device, inner.sender_agent, inner.user_properties, inner.response_topic,
               inner.content_type, inner.payload_utf8)
        # Kept only if the key is small too: it holds every user property, `agw:` ones included (not encoded).
        cacheable = inner.correlation_data is None and sum(
            len(k) + len(v) for k, v in inner.user_properties) + len(inner.response_topic or "") + len(
            inner.content_type or "") <= PUBLISH_SHAPE_BYTES
        shapes = self._publish_shapes
        if cacheable:
            got = shapes.get(key)
            if got is not None:
                return got
        prefix = self.cfg.mqtt.topic_prefix
        agent = inner.recipient_agent
        topic = topics.inbox_topic(prefix, agent)
        props: list[tuple[str, str]] = []
        if inner.user_properties:
            props = [(k, v) for k, v in inner.user_properties if not k.startswith(topics.RESERVED_PREFIX)]
            deliver_to = dict(inner.user_properties).get(topics.PROP_DELIVER_TO)
            if deliver_to is not None and topics.agent_may_receive_on(prefix, agent, deliver_to):
                topic = deliver_to
        response_topic = None
        if inner.response_topic:
            response_topic = topics.reply_topic(prefix, agent, peer_device, inner.sender_agent, inner.response_topic)
        props.append((topics.PROP_FROM, f"{peer_device}/{inner.sender_agent}"))
        shape = topic, encode_publish_properties_body(response_topic, inner.correlation_data, inner.content_type,
                                                      inner.payload_utf8, tuple(props))
        if cacheable and len(shape[1]) + len(topic.encode()) <= PUBLISH_SHAPE_BYTES:
            if len(shapes) >= PUBLISH_SHAPES:
                shapes.clear()
            shapes[key] = shape
        return shape

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
        """Deliver held first messages once the operator allowed them: they move into the inbox, which
        publishes them like any other."""
        while True:
            await asyncio.sleep(0.5)
            moved = []
            for entry in self.store.consent.held():
                if entry.state is not ConsentState.ALLOWED or entry.held_message is None:
                    continue
                held = InnerMessage.decode(entry.held_message)
                e = InboxEntry.new(entry.peer.split("/", 1)[0], self._inbox_seq(), held)
                with self.store.transaction():
                    self.store.inbox.put(e.name, e.record())
                    self.store.consent.release(entry.local_agent, entry.peer)
                moved.append(e)
            if moved:
                await self._publish_inbox(moved)
