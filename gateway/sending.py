"""The sending half of the gateway: agents' messages into the outbox, then out to peers under pairwise sessions.

agent -> MQTT -> outbox (durable) -> PUBACK to the broker -> encrypt + sign -> relay. Each peer has a send window
of envelopes not yet answered; ACKs and REJECTs from the peer refill it. Entries not answered are retried with
backoff until an ACK, a final REJECT or expiry. A broker redelivery (DUP) of a PUBLISH already stored is
recognised by its packet id and content digest and not stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import operator
import struct
import time
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any

from gateway import stages, topics
from gateway.bridge import AgentMessage
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.errors import ProtocolError
from gateway.protocol.message import encode_data, new_message_ids
from gateway.protocol.pairwise.batch import ITEM_OVERHEAD
from gateway.runtime import now_ms
from gateway.store import OutboxEntry, OutboxFull, StoreError
from gateway.store.marks import RedeliveryMarks

if TYPE_CHECKING:
    pass

log = logging.getLogger("agw.daemon")

RETRY_MIN_MS = 5_000
RETRY_MAX_MS = 60_000
OFFLINE_RETRY_MS = 5_000
CONGESTED_RETRY_MS = 250
EXPIRE_EVERY_MS = 1_000  # how often the sender removes expired outbox entries
SEND_WINDOW = 512  # messages per peer sent and not yet answered
SEND_READ_BYTES = 1024 * 1024  # messages read from the outbox per round (large messages: fewer at once)
BATCH_MESSAGES = 256  # messages per signed pairwise batch
BATCH_BYTES = 192 * 1024  # and bytes per batch, well below the relay's envelope limit (256 KiB by default)
HANDOVER_ENTRIES = 4096  # messages stored and held in memory for the sender loop (see Handover)
HANDOVER_BYTES = 1024 * 1024  # and their bytes
# A handed-over entry sent within HANDOVER_FRESH_MS of being stored needs no attempt mark: its row was stored with
# the first attempt counted and due HANDOVER_DUE_MS later, so without an ACK it is retried RETRY_MIN_MS to
# HANDOVER_DUE_MS after that send (and `due` does not read it back meanwhile). Later sends are marked as usual.
HANDOVER_FRESH_MS = 2_000
HANDOVER_DUE_MS = HANDOVER_FRESH_MS + RETRY_MIN_MS
# A batch that does not fit waits up to this long for the sender to make room, if the sender is taking entries
# (it took some within HANDOVER_MOVING_S): sent from memory it costs less than read back and marked. The broker
# keeps the messages meanwhile (nothing is acknowledged before it is stored).
HANDOVER_WAIT_S = 0.5
HANDOVER_MOVING_S = 0.5


# What one outbox entry may add to its record's size on the link at most (envelope, batch and ratchet headers, AEAD
# tag, or a session setup's keys), for the agent loop's pass to take only what the link's queue holds (`_fitting`).
ENTRY_ALLOWANCE = 2048


def _fitting(entries: list[Any], room_bytes: int, room_envelopes: int) -> int:
    """How many of `entries`, in order, fit into the link queue's free bytes and envelopes (each counted as its
    record plus ENTRY_ALLOWANCE, and as one envelope, as a v1 message is)."""
    n = 0
    for e in entries:
        room_bytes -= len(e.record) + ENTRY_ALLOWANCE
        if room_bytes < 0 or n >= room_envelopes:
            break
        n += 1
    return n


_LEN4 = struct.Struct(">I").pack


_NO_LENGTHS = _LEN4(0) * 2  # the empty correlation data and response topic of `_digest`
_DIGEST_HEADS: dict[str, Any] = {}  # topic -> SHA-256 state after its length and bytes (1,024 short topics at most)


def _digest(m: AgentMessage) -> bytes:
    """What identifies a broker redelivery of the same PUBLISH (same packet id, same content): SHA-256 over the
    topic, payload, correlation data and response topic, each after its 4-byte length. The state after the
    topic is kept per topic (agents publish on a few) and copied for each message."""
    head = _DIGEST_HEADS.get(m.topic)
    if head is None:
        topic = m.topic.encode()
        head = hashlib.sha256(_LEN4(len(topic)) + topic)
        if len(m.topic) <= topics.CACHED_TOPIC_MAX:  # (a long topic, up to 64 KiB, is not held: 1,024 of them would)
            if len(_DIGEST_HEADS) >= 1024:
                _DIGEST_HEADS.clear()
            _DIGEST_HEADS[m.topic] = head
    h = head.copy()
    payload, cd, rt = m.payload, m.correlation_data, m.response_topic
    if cd is None and rt is None:
        h.update(b"".join((_LEN4(len(payload)), payload, _NO_LENGTHS)))
    else:
        cd, rtb = cd or b"", (rt or "").encode()
        h.update(b"".join((_LEN4(len(payload)), payload, _LEN4(len(cd)), cd, _LEN4(len(rtb)), rtb)))
    return h.digest()[:16]


def _chunks(entries: list[Any], max_bytes: int = BATCH_BYTES) -> list[list[Any]]:
    """Split outbox entries into batches of at most BATCH_MESSAGES messages and `max_bytes` bytes of messages (a
    single larger message goes alone, as it would unbatched)."""
    out: list[list[Any]] = []
    size = 0
    for e in entries:
        n = len(e.record) + ITEM_OVERHEAD
        if out and len(out[-1]) < BATCH_MESSAGES and size + n <= max_bytes:
            out[-1].append(e)
            size += n
        else:
            out.append([e])
            size = n
    return out


HANDOVER_RUN_MIN = 64  # a batch of fewer held messages takes the next batch's too (see Handover)
_PEER = operator.itemgetter(1)


class _Run:
    """Messages held for one peer, stored together: message id -> record, in the order stored, and what they
    share: expiry, attempts counted, due time as stored (0: `stale`). A message that differs from its run's values
    (another expiry) is held as (record, [expires_at_ms, attempts, due_at_ms]) instead of its record."""

    __slots__ = ("attempts", "due_at_ms", "entries", "expires_at_ms")

    def __init__(self, expires_at_ms: int, attempts: int, due_at_ms: int) -> None:
        self.expires_at_ms, self.attempts, self.due_at_ms = expires_at_ms, attempts, due_at_ms
        self.entries: dict[bytes, bytes | tuple[bytes, list[int]]] = {}

    def entry(self, peer: str, msg_id: bytes, v: bytes | tuple[bytes, list[int]]) -> OutboxEntry:
        if isinstance(v, bytes):
            return OutboxEntry(msg_id, peer, v, self.expires_at_ms, self.attempts, self.due_at_ms)
        record, (expires, attempts, due) = v
        return OutboxEntry(msg_id, peer, record, expires, attempts, due)

    def expires(self, v: bytes | tuple[bytes, list[int]]) -> int:
        return self.expires_at_ms if isinstance(v, bytes) else v[1][0]


class Handover:
    """Outbox entries just stored and handed to the sender loop in memory, so it does not read and unseal them
    back from the outbox. The outbox row stays the durable copy: it is stored with its first attempt counted and
    due only after HANDOVER_DUE_MS (so `due` does not return it meanwhile, and a first send from memory within
    HANDOVER_FRESH_MS needs no attempt mark), and at start-up every entry sent at most once is made due at once
    (`Outbox.release_unsent`). Bounded: a batch that would overfill it is stored due at once and read back by
    `due`, as before. The sender sends what `due` returns (older: retries, the last run's, overflow) before
    what is held here, so the order stays oldest first except around an overflow.

    A held entry's `attempts` is 1 if its row is the one stored with it (the first attempt counted), 0 if the
    batch met ids already queued (the row may be an older one: it is marked like any entry); its `due_at_ms` is
    the row's due time as stored, 0 once the row may have changed (`stale`: rescheduled or purged, see
    `Outbox.epoch`), which also makes the sender mark it and learn from the row count whether it is gone.

    Compact (issue 7: it holds ~3,500-4,100 messages of 256 B under load, at the sender's peak): per peer, a list
    of runs (`_Run`), each a dict of message id -> record with the values its messages share, so a held message
    costs its record and a dict slot. Not one dict per peer of `OutboxEntry`s: a 6-tuple (and an expiry int) per
    message, and a dict that takes in and gives up ~4,000 entries a second, which CPython regrows to a table
    of 3 x its size (~295 KB) at each resize. A run's dict only gives up entries after it is filled, and is dropped
    when empty. A batch joins the peer's last run while that has fewer than HANDOVER_RUN_MIN messages, so a
    peer has at most about HANDOVER_ENTRIES / HANDOVER_RUN_MIN runs to look an id up in. An `OutboxEntry` is
    built when the sender takes a message (`first`)."""

    __slots__ = ("bytes", "count", "epoch", "peers", "room", "taken_at")

    def __init__(self) -> None:
        self.peers: dict[str, list[_Run]] = {}  # by peer, runs in the order stored
        self.count = 0
        self.bytes = 0
        self.epoch = 0  # the `Outbox.epoch` the held entries' rows are known to be as stored under
        self.room = asyncio.Event()  # set when entries leave
        self.taken_at = 0.0  # monotonic time entries last left

    async def wait_room(self, items: list[tuple[bytes, str, bytes, int]]) -> bool:
        """Whether `items` fit, after waiting up to HANDOVER_WAIT_S for the sender to make room if they would fit
        an empty hand-over, the sender is taking entries and every entry held is for a peer of this batch."""
        size = sum(len(i[2]) for i in items)  # (once: not again on each wake while waiting)
        if self.takes(len(items), size):
            return True
        # Only behind the same peers' messages: a batch never waits on room that another (slow) peer's held
        # messages take, or its agents' PUBACKs and receipts would be delayed by a peer they do not send to.
        if (len(items) > HANDOVER_ENTRIES or size > HANDOVER_BYTES
                or time.monotonic() - self.taken_at > HANDOVER_MOVING_S
                or not self.peers.keys() <= {i[1] for i in items}):
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HANDOVER_WAIT_S):
                while not self.takes(len(items), size):
                    self.room.clear()
                    await self.room.wait()
        return self.takes(len(items), size)

    def takes(self, count: int, size: int) -> bool:
        """Whether `count` more entries of `size` record bytes in all fit."""
        return self.count + count <= HANDOVER_ENTRIES and self.bytes + size <= HANDOVER_BYTES

    def add(self, items: list[tuple[bytes, str, bytes, int]], due_at_ms: int, counted: bool) -> None:
        """Hold a stored batch; `counted`: every row is new, stored due `due_at_ms` with its first attempt. An id
        already held (or twice in the batch) is held once, as first added."""
        attempts = 1 if counted else 0
        count = size = 0
        for peer, run_items in itertools.groupby(items, key=_PEER):  # (a batch is mostly one peer's)
            group = list(run_items)
            runs = self.peers.setdefault(peer, [])
            known: set[bytes] = set()
            if runs:
                ids = {i[0] for i in group}
                for old in runs:
                    known.update(ids & old.entries.keys())  # (in C, over the smaller side)
            # A small last run takes the batch whatever its values: each batch is stored at its own millisecond
            # (its due time), so requiring equal values would make one run per batch of a slow trickle (review
            # finding M1: 4,096 runs of one message while the link is down, each looked through per id). Its
            # messages whose values differ from the run's keep their own (the tuple form).
            last = runs[-1] if runs else None
            if last is not None and len(last.entries) < HANDOVER_RUN_MIN:
                run = last
            else:
                run = _Run(group[0][3], attempts, due_at_ms)
                runs.append(run)
            entries, expiry = run.entries, run.expires_at_ms
            shared = run.attempts == attempts and run.due_at_ms == due_at_ms
            for msg_id, _, record, expires in group:
                if msg_id in known or msg_id in entries:
                    continue
                entries[msg_id] = (record if expires == expiry and shared
                                   else (record, [expires, attempts, due_at_ms]))
                count += 1
                size += len(record)
            if not entries:
                runs.pop()
                if not runs:
                    del self.peers[peer]
        self.count += count
        self.bytes += size

    def sync(self, epoch: int) -> None:
        """Call with `Outbox.epoch` before adding or sending: if rows were rescheduled or purged since the last
        call, the entries held until then are made stale."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.stale()

    def stale(self) -> None:
        """The held entries' rows may have changed: each is sent with an attempt mark (whose row count shows
        whether it is still queued)."""
        for runs in self.peers.values():
            for run in runs:
                run.due_at_ms = 0
                for v in run.entries.values():
                    if not isinstance(v, bytes):
                        v[1][2] = 0

    def holds_id(self, peer: str, msg_id: bytes) -> bool:
        return any(msg_id in run.entries for run in self.peers.get(peer, ()))

    def holds(self, e: OutboxEntry) -> bool:
        return self.holds_id(e.peer_device, e.msg_id)

    def ids(self, peer: str) -> list[bytes]:
        """The ids held for `peer`, oldest first."""
        return [m for run in self.peers.get(peer, ()) for m in run.entries]

    def first(self, peer: str, n: int) -> list[OutboxEntry]:
        """The oldest `n` entries held for `peer`, as outbox entries."""
        out: list[OutboxEntry] = []
        for run in self.peers.get(peer, ()):
            if len(out) >= n:
                break
            out += [run.entry(peer, m, v) for m, v in itertools.islice(run.entries.items(), n - len(out))]
        return out

    def remove(self, peer: str, msg_ids: Iterable[bytes]) -> None:
        runs = self.peers.get(peer)
        if not runs:
            return
        n = self.count
        left = set(msg_ids)
        for run in runs:  # (the ids the sender takes are in the first run or two; an ACK's are in none, normally)
            if not left:
                break
            hit = run.entries.keys() & left  # (in C, over the smaller side)
            if hit:
                left -= hit
                pop = run.entries.pop
                for m in hit:
                    v = pop(m)
                    self.bytes -= len(v) if isinstance(v, bytes) else len(v[0])
                self.count -= len(hit)
        if self.count < n:
            runs[:] = [run for run in runs if run.entries]
            if not runs:
                del self.peers[peer]
            self.taken_at = time.monotonic()
            self.room.set()

    def remove_expired(self, now_ms: int) -> None:
        for peer, runs in list(self.peers.items()):
            self.remove(peer, [m for run in runs for m, v in run.entries.items() if run.expires(v) <= now_ms])


class Sending:
    """Mixed into `Gateway`: the methods of the sending half."""

    _send_busy = False  # a sender pass is under way (see `_send_pass`)
    _send_again = False  # another pass was asked for meanwhile
    _expired_at = 0  # when the sender last removed expired outbox entries (ms)

    @cached_property
    def _handover(self) -> Handover:
        return Handover()

    @cached_property
    def _marks(self) -> RedeliveryMarks:
        return RedeliveryMarks(self.store.secrets, "mqtt-in/")

    async def _agent_loop(self) -> None:
        q = self.bridge.incoming
        prefix = self.cfg.mqtt.topic_prefix
        ttl = self.cfg.store.message_ttl_seconds * 1000
        max_record = self.store.outbox.limits.max_record_bytes
        while True:
            batch = [await q.get()]
            if not q.empty():
                batch += q.get_many_nowait(511)  # (one call, not one `get_nowait` per message)
            await self._ingest(batch, prefix, ttl, max_record)
            # Stored and acknowledged: the batch's messages are not held through the send pass (issue 7: the
            # encryption's buffers are the sender's largest; the pass can also wait for room on the link).
            del batch
            await self._send_now()

    async def _ingest(self, batch: list[AgentMessage], prefix: str, ttl: int, max_record: int) -> None:
        """Store a batch of agents' messages in the outbox (one durable commit), hand it to the sender in memory
        when there is room, then acknowledge it to the broker and send the agents' receipts."""
        dequeued_ns = time.time_ns() if stages.enabled else 0
        items: list[tuple[bytes, str, bytes, int]] = []
        ingested: list[tuple[int, bytes]] = []
        t = now_ms()
        expires = t + ttl  # (one int for the batch: each message's tuple, and the hand-over, share it)
        group_msgs = [m for m in batch if topics.is_group_topic(prefix, m.topic)]
        if group_msgs:
            group_refused = await self.groups.on_agent_messages(group_msgs)
            for m in group_msgs:
                self.bridge.ack(m)
            self._send_receipts(group_msgs, group_refused)  # SDK group sends: stored, or refused for good
            batch = [m for m in batch if not topics.is_group_topic(prefix, m.topic)]
        batch = self._take_acks(batch)  # receipts: agents' acks of what they received (gateway/receipts.py)
        refused: list[tuple[AgentMessage, str]] = []
        fresh = iter(new_message_ids(len(batch)))  # (one draw of random ids for the batch)
        for m in batch:
            try:
                out = topics.parse_out_topic(prefix, m.topic)
                message_id, record = self._record_from_agent(m, out, t, ttl, fresh)
            except (topics.TopicError, ValueError) as exc:
                log.warning("dropping a message on %r: %s", m.topic, exc)
                refused.append((m, str(exc)))
                continue
            digest = _digest(m)
            if m.dup and await self._is_copy(m.mid, digest):
                continue  # the broker resends what we stored but had not acknowledged before a crash
            if len(record) > max_record:  # never storable: refused, not retried (that would stall ingest)
                reason = (f"the message is {len(record)} bytes encoded, over the outbox's max_record_bytes "
                          f"({max_record}); send smaller messages")
                log.warning("dropping a message on %r: %s", m.topic, reason)
                refused.append((m, reason))
                continue
            items.append((message_id, out.peer_device, record, expires))
            ingested.append((m.mid, digest))
        handover = await self._handover.wait_room(items)  # sent from memory, the row due later (Handover)
        stored_at = now_ms() if handover else t
        while True:
            try:
                with self.store.transaction(durable=self.cfg.store.durability == "power-loss"):
                    due_at = stored_at + HANDOVER_DUE_MS if handover else 0
                    added = self.store.outbox.put_many(items, due_at_ms=due_at, attempts=int(handover))
                    self._marks.put(ingested)
                break
            except (OutboxFull, StoreError) as exc:
                self._marks.forget()  # rolled back
                # Not acknowledged: the broker keeps the messages; we try again shortly.
                log.error("outbox refuses new messages (%s); holding %d unacknowledged", exc, len(items))
                await asyncio.sleep(1.0)
        if handover:
            self._handover.sync(self.store.outbox.epoch)
            self._handover.add(items, stored_at + HANDOVER_DUE_MS, counted=added == len(items))
        if stages.enabled:
            stages.mark("a.dequeued", (i[0] for i in items), dequeued_ns)
            stages.mark("a.stored", (i[0] for i in items))
        self.bridge.ack_many(batch)
        stages.mark("a.acked", (i[0] for i in items))
        # receipts: tell SDK agents what is now durable, and what was refused for good (gateway/receipts.py)
        self._send_receipts(batch, refused)
        self.counters.sent += len(items)

    async def _is_copy(self, packet_id: int, digest: bytes) -> bool:
        """Whether a DUP PUBLISH is a copy of what was stored under its packet id. A mark may have to be read from
        the store (`RedeliveryMarks`); while that read fails, the message waits unacknowledged and the read is
        retried each second, as a failed outbox write is (the error used to end the agent loop, and the daemon)."""
        while True:
            try:
                return self._marks.is_copy(packet_id, digest)
            except StoreError as exc:
                log.error("cannot read the broker's redelivery marks (%s); holding the resent message "
                          "unacknowledged and retrying", exc)
                await asyncio.sleep(1.0)

    def _record_from_agent(self, m: AgentMessage, out: topics.OutTopic, t: int, ttl: int,
                           fresh: Iterator[bytes]) -> tuple[bytes, bytes]:
        """The message id and encoded DATA inner message (the outbox record) of an agent's message; raises
        `InvalidMessageError` (a ValueError) for a field outside the inner format's rules (`encode_data` applies
        every rule of `InnerMessage`, without building one). `fresh`: random ids, one taken if the message has
        no agw:sdk-id to derive its id from."""
        props: tuple[tuple[str, str], ...] = ()
        if m.user_properties:
            props = tuple((k, v) for k, v in m.user_properties if not k.startswith(topics.RESERVED_PREFIX))
            message_id = self._e2e_message_id(m, out.agent)
        else:
            message_id = next(fresh)
        if out.deliver_to is not None:
            props += ((topics.PROP_DELIVER_TO, out.deliver_to),)
        return message_id, encode_data(message_id, out.agent, out.peer_agent, t, t + ttl, m.payload,
                                       m.response_topic, m.correlation_data, m.content_type, m.payload_utf8, props)

    async def _sender_loop(self) -> None:
        self.store.outbox.release_unsent(now_ms())  # entries the last run meant to send from memory
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # (no task per wake, unlike wait_for)
                    await self._wake_sender.wait()
            self._wake_sender.clear()
            await self._send_pass()

    async def _send_now(self) -> None:
        """After the agent loop stored (and acknowledged) a batch: the sender's pass, run at once in the agent
        loop's task instead of waking the sender task (a loop turn, ~30-40 us on a lone message's way out). The
        order of durable effects is the sender task's: the batch is in the outbox (committed, fsynced) and its
        PUBACKs are queued before anything of it is encrypted; the session state is committed before its
        ciphertext is queued on the link. Not while a pass is under way, nor while envelopes wait for the link's
        writer (a pass could then wait for room in its queue, and ingest would wait with it): the sender task
        is woken instead, as before."""
        if self._send_busy or self.link.queued:
            self._wake_sender.set()
            return
        await self._send_pass(self.link.room())

    async def _send_pass(self, queue_room: tuple[int, int] | None = None) -> None:
        """One pass of the sender: expiry, then what is due and what is handed over, per peer, encrypted and
        queued on the link (`_sender_loop`, `_send_now`). Passes never interleave: one asked for while another
        waits in `link.send` (for room in its queue) wakes the sender task once that one is over. `queue_room`: the
        link queue's free (bytes, envelopes); the pass then takes only what fits, so that it never waits in
        `link.send` (the agent loop's pass: ingest and its PUBACKs would wait with it), and leaves the rest to
        the sender task."""
        if self._send_busy:
            self._send_again = True
            return
        if self.link.state.value != "ready":
            return
        self._send_busy = True
        try:
            await self._send_pass_body(queue_room)
        finally:
            self._send_busy = False
            if self._send_again:
                self._send_again = False
                self._wake_sender.set()

    async def _send_pass_body(self, queue_room: tuple[int, int] | None) -> None:
        hand = self._handover
        room_bytes, room_envelopes = queue_room if queue_room is not None else (0, 0)
        t = now_ms()
        if t - self._expired_at >= EXPIRE_EVERY_MS:  # not on every wake: `due` skips expired entries anyway
            self._expired_at = t
            for entry in self.store.outbox.expire(t):
                self.store.audit.append({"type": "message.expired", "peer": entry.peer_device,
                                         "attempts": entry.attempts}, t)
            hand.remove_expired(t)
        # Peers that cannot take more now: their window is full, or they are offline or congested.
        blocked = {p for p, until in self._peer_retry_at.items() if until > t}
        for peer, inflight in self._inflight.items():
            for mid in [m for m, sent in inflight.items() if sent < t - RETRY_MIN_MS]:
                del inflight[mid]  # unanswered for a retry period: no longer counts against the window
            if len(inflight) >= SEND_WINDOW:
                blocked.add(peer)
        # Retries, entries from the last run and overflow come from the outbox, oldest first; then the entries
        # handed over in memory (an entry in both goes from memory). Not read: blocked peers' entries, and
        # past a peer's room in its window (a slow peer's held entries become due after HANDOVER_DUE_MS: only
        # as many are read as go out from memory in this pass, not all of them on every pass).
        rooms = {p: SEND_WINDOW - len(inflight) for p, inflight in self._inflight.items()
                 if inflight and p not in blocked}
        due = self.store.outbox.due(t, limit=SEND_WINDOW, max_bytes=SEND_READ_BYTES, except_peers=blocked,
                                    peer_limits=rooms)
        by_peer: dict[str, list[Any]] = {}
        for e in due:
            if not hand.holds(e) and e.peer_device not in blocked:
                by_peer.setdefault(e.peer_device, []).append(e)
        for peer in hand.peers:
            if peer not in blocked:
                by_peer.setdefault(peer, [])
        for peer, entries in by_peer.items():
            if not self.book.has_session(peer):
                self._ensure_session(peer)
                continue
            room = max(0, SEND_WINDOW - len(self._inflight[peer]))
            entries = entries[:room]
            hand.sync(self.store.outbox.epoch)  # rows rescheduled, purged or released since: not as stored
            held = [e for e in hand.first(peer, room - len(entries)) if e.expires_at_ms > t]
            if queue_room is not None:  # (the agent loop's pass: only what the link's queue takes without waiting)
                fit = _fitting(entries + held, room_bytes, room_envelopes)
                if fit < len(entries) + len(held):
                    self._send_again = True  # the rest: the sender task's, once this pass is over
                    entries, held = entries[:fit], held[:max(0, fit - len(entries))]
                room_bytes -= sum(len(e.record) + ENTRY_ALLOWANCE for e in (*entries, *held))
                room_envelopes -= len(entries) + len(held)
            # Held entries sent soon enough after being stored need no attempt mark (see Handover). A stored
            # due time further than HANDOVER_DUE_MS away means the wall clock stepped back since: marked, or
            # the first retry would wait for the step as well.
            counted = [e for e in held
                       if e.attempts and not RETRY_MIN_MS <= e.due_at_ms - t <= HANDOVER_DUE_MS]
            marked = entries + [e for e in held if not e.attempts]
            entries += held
            if not entries:
                continue
            stages.mark("a.due", (e.msg_id for e in entries))
            envelopes = []
            try:
                with self.store.transaction(durable=False):
                    delay = min(RETRY_MAX_MS, RETRY_MIN_MS << min(marked[0].attempts, 4)) if marked else 0
                    # Some may have left the outbox since they were read or handed over (answered, expired,
                    # purged by the operator): those are not sent.
                    gone = (self._left_outbox(marked, t + delay, count=True)
                            | self._left_outbox(counted, t + RETRY_MIN_MS, count=False))
                    if gone:
                        hand.remove(peer, gone)
                        entries = [e for e in entries if e.msg_id not in gone]
                    if entries:
                        envelopes = self._encrypt_entries(peer, entries)
                        self.book.flush()
            except (ProtocolError, LookupError) as exc:
                log.warning("cannot encrypt for %s: %s", peer, exc)
                continue
            if not entries:
                continue
            hand.remove(peer, [e.msg_id for e in entries])
            self._inflight[peer].update((e.msg_id, t) for e in entries)
            stages.mark("a.sent", (e.msg_id for e in entries))
            await self.link.send(envelopes)

    def _left_outbox(self, entries: list[OutboxEntry], next_due_ms: int, *, count: bool) -> set[bytes]:
        """Mark a send attempt of these entries; returns the ids no longer in the outbox (by the row count)."""
        if not entries:
            return set()
        ids = [e.msg_id for e in entries]
        if self.store.outbox.mark_attempts(ids, next_due_ms, count=count) == len(ids):
            return set()
        kept = self.store.outbox.existing(ids)
        return {i for i in ids if i not in kept}

    def _encrypt_entries(self, peer: str, entries: list[Any]) -> list[Envelope]:
        """Envelopes for outbox entries to one peer: signed v2 batches on an established session (one Ed25519
        signature per batch), else one v1 message per entry (they carry the session setup). A batch's envelope
        id is its first entry's message id, so an UNDELIVERABLE answer still names an outbox entry of the peer."""
        out: list[Envelope] = []
        # Below the link's envelope limit, with room for the envelope and batch headers.
        max_bytes = min(BATCH_BYTES, self.link.config.max_envelope_size - 1024)
        for chunk in _chunks(entries, max_bytes):
            wire = self.book.encrypt_batch(peer, [e.record for e in chunk])
            if wire is not None:
                out.append(Envelope(EnvelopeKind.PAIRWISE_BATCH, chunk[0].msg_id, self.device_id, peer, wire))
                continue
            for e in chunk:
                wire, setup = self.book.encrypt(peer, e.record)
                kind = EnvelopeKind.PREKEY if setup else EnvelopeKind.PAIRWISE
                out.append(Envelope(kind, e.msg_id, self.device_id, peer, wire))
        return out

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

    def _settled(self, peer: str, ids: tuple[bytes, ...]) -> None:
        """The peer answered these ids: they leave the send window, which may let more go out."""
        inflight = self._inflight.get(peer)
        if inflight:
            for i in ids:
                inflight.pop(i, None)
        self._wake_sender.set()
