"""An inbox entry: a received message on its way to an agent, with where its MQTT QoS 2 exchange stands.

The entry is written (with the message) before the peer gets our end-to-end ACK, and deleted after the broker's
PUBCOMP. Its `packet_id` and `phase` let a restarted gateway resume the exchange with the broker instead of
publishing again: `PUBLISHED` means a PUBLISH under that id may have reached the broker, so it is sent again
under the same id (the broker drops it if it holds it); `BROKER_HAS` means the broker answered PUBREC, so only
PUBREL is sent. See gateway/bridge.py and docs/reliability.md.

For an agent that acknowledges what it receives (the SDK, gateway/receipts.py) the entry is not deleted at
PUBCOMP: it becomes `HANDED` (packet id 0: the id is free again) and stays until the agent's ack names it, or
it expires. A HANDED entry is published again (a new QoS 2 exchange under a new packet id) after every
(re)connect to the broker, at start-up and when the agent announces itself.

Record layout (inside the store's sealed value): version 0x02 | seq u64 | packet id u16 | phase u8 | message.
Records written before this layout (seq u64 | message; the sequence is a nanosecond clock, so the first byte is
never 0x02) read as WAITING.

The broker's PUBREC (PUBLISHED -> BROKER_HAS) is not written into the record (that re-sealed the whole message
once more per message: ~10 us of ~130 us of the receiver's CPU per 256 B message). It is a `PubrecMarks` slot:
the packet id's slot holds a digest of the entry's name. The slot is cleared in the transaction that writes the
entry PUBLISHED under that packet id, so a slot naming the entry can only come from a PUBREC of the exchange the
record describes; reading the entry, PUBLISHED + its mark = BROKER_HAS. (Stores written before the marks hold
BROKER_HAS in the record, which still reads as such.)
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.protocol.errors import ProtocolError
from gateway.protocol.message import InnerMessage
from gateway.store.records import KeyedBlobs

RECORD_VERSION = 2


_RECORD_HEAD = struct.Struct(">BQHB").pack  # version, seq u64, packet id u16, phase u8 (the layout above)


class InboxRecordError(ValueError):
    """A stored inbox record that does not parse (the store authenticated it, so this is a software bug)."""


class Phase(enum.IntEnum):
    WAITING = 0  # no packet id yet: nothing was sent to the broker
    PUBLISHED = 1  # packet id stored; a PUBLISH under it may have reached the broker
    BROKER_HAS = 2  # the broker answered PUBREC: only PUBREL (then PUBCOMP) is left
    HANDED = 3  # PUBCOMP came; kept until the (acknowledging) agent's ack names it. No packet id.


@dataclass(slots=True)
class InboxEntry:
    name: str  # the store key: "<peer device>/<message id hex>"
    peer_device: str
    seq: int  # arrival order, for publishing in order after a restart
    message: InnerMessage
    encoded: bytes  # `message` encoded, kept so a phase change does not encode it again
    packet_id: int = 0
    phase: Phase = Phase.WAITING
    # Not stored: the broker connection (MqttBridge.connects) in which the current QoS 2 exchange started (0: in an
    # earlier run; see Receipts._exchange_connect). An exchange that spans a reconnect may end in a PUBCOMP from a
    # restarted broker that lost the message: gateway/receipts.py publishes such an entry again once it is HANDED.
    exchange_connect: int = 0

    @classmethod
    def new(cls, peer_device: str, seq: int, message: InnerMessage, encoded: bytes | None = None) -> InboxEntry:
        """`encoded`: the bytes `message` was decoded from, if at hand (stored as they are: no second encoding)."""
        return cls(f"{peer_device}/{message.message_id.hex()}", peer_device, seq, message,
                   message.encode() if encoded is None else encoded)

    def record(self) -> bytes:
        return _RECORD_HEAD(RECORD_VERSION, self.seq, self.packet_id, self.phase) + self.encoded

    @property
    def in_exchange(self) -> bool:
        """A QoS 2 exchange under `packet_id` is (or may be) under way."""
        return self.phase in (Phase.PUBLISHED, Phase.BROKER_HAS)

    def handed(self) -> None:
        self.phase, self.packet_id = Phase.HANDED, 0

    def to_publish_again(self) -> None:
        """A HANDED entry to be published once more: it takes a new packet id like a new entry."""
        if self.phase is Phase.HANDED:
            self.phase = Phase.WAITING

    @classmethod
    def from_record(cls, name: str, record: bytes) -> InboxEntry:
        peer_device = name.split("/", 1)[0]
        try:
            if record[:1] == bytes([RECORD_VERSION]):
                seq, packet_id = int.from_bytes(record[1:9], "big"), int.from_bytes(record[9:11], "big")
                phase, encoded = Phase(record[11]), record[12:]
            else:
                seq, packet_id, phase, encoded = int.from_bytes(record[:8], "big"), 0, Phase.WAITING, record[8:]
            message = InnerMessage.decode(encoded)
        except (ProtocolError, ValueError, IndexError) as exc:
            raise InboxRecordError(f"inbox entry {name!r} does not parse: {exc}") from exc
        if phase in (Phase.PUBLISHED, Phase.BROKER_HAS) and packet_id == 0:
            raise InboxRecordError(f"inbox entry {name!r} is {phase.name} without a packet id")
        return cls(name, peer_device, seq, message, encoded, packet_id, phase)


PUBREC_PER_BUCKET = 64
_DIGEST = 16
_NO_MARK = bytes(_DIGEST)
_BUCKET_BYTES = PUBREC_PER_BUCKET * _DIGEST


# The keyed-by-personalisation BLAKE2b state, copied per name: half the cost of setting it up for each (one name
# per message at its PUBREC).
_NAME_HASH = hashlib.blake2b(digest_size=_DIGEST, person=b"agw-inbox-rec")


def _name_digest(name: str) -> bytes:
    h = _NAME_HASH.copy()
    h.update(name.encode())
    d = h.digest()
    return d if d != _NO_MARK else b"\x01" + d[1:]


class PubrecMarks:
    """Which inbox entry the broker answered PUBREC for, by MQTT packet id (see the module docstring).

    Packet ids fall into buckets of 64; a bucket is one sealed record `inbox-pubrec/b<n>` in a `KeyedBlobs`
    table holding 64 16-byte digests (zero: no mark), so a readable event's PUBRECs cost one sealed record per
    bucket touched instead of one re-sealed inbox record per message. Write only inside a store transaction; if
    that transaction rolls back, the buckets in memory are dropped (`forget`) and read again when needed. The
    last `cache` buckets used are kept in memory (packet ids are taken in sequence, but a burst holds up to a few
    thousand at once: the PUBRECs come for the oldest while a new frame takes the newest, so 8 buckets missed
    often (a store read and unseal each time); 32 are 32 KiB; all 1,024 would be 1 MiB).
    """

    PREFIX = "inbox-pubrec/b"

    def __init__(self, blobs: KeyedBlobs, cache: int = 32) -> None:
        self._blobs = blobs
        self._cache = cache
        self._buckets: dict[int, bytearray] = {}

    def _bucket(self, n: int) -> bytearray:
        got = self._buckets.pop(n, None)
        if got is None:
            raw = self._blobs.get(f"{self.PREFIX}{n}")
            got = bytearray(raw) if raw is not None and len(raw) == _BUCKET_BYTES else bytearray(_BUCKET_BYTES)
            if len(self._buckets) >= self._cache:
                del self._buckets[next(iter(self._buckets))]  # the least recently used
        self._buckets[n] = got
        return got

    @staticmethod
    def _slot(packet_id: int) -> tuple[int, int]:
        if not 1 <= packet_id <= 0xFFFF:
            raise ValueError(f"MQTT packet ids are 1..65535, not {packet_id}")
        return packet_id // PUBREC_PER_BUCKET, (packet_id % PUBREC_PER_BUCKET) * _DIGEST

    def has(self, packet_id: int, name: str) -> bool:
        """Whether the broker answered PUBREC for entry `name` under `packet_id` (recorded by `write`)."""
        n, i = self._slot(packet_id)
        return bytes(self._bucket(n)[i:i + _DIGEST]) == _name_digest(name)

    def write(self, marked: Iterable[tuple[int, str]] = (), cleared: Iterable[int] = ()) -> None:
        """Mark (packet id, entry name) pairs, clear the slots of packet ids just given to entries: one sealed
        record per bucket touched, in the caller's transaction."""
        touched: dict[int, bytearray] = {}
        changes = [(p, _NO_MARK) for p in cleared] + [(p, _name_digest(name)) for p, name in marked]
        if changes:
            for packet_id in (min(changes)[0], max(changes)[0]):
                self._slot(packet_id)  # (raises for an id out of range)
        for packet_id, value in changes:  # (`_slot` inline: this runs for every message, twice)
            n = packet_id // PUBREC_PER_BUCKET
            bucket = touched.get(n)
            if bucket is None:
                bucket = touched[n] = self._bucket(n)
            i = (packet_id % PUBREC_PER_BUCKET) * _DIGEST
            bucket[i:i + _DIGEST] = value
        if touched:
            self._blobs.put_many([(f"{self.PREFIX}{n}", bytes(b)) for n, b in sorted(touched.items())])
            self._blobs.on_rollback(self.forget)  # whichever transaction this joins: a rolled-back mark must not stay

    def forget(self) -> None:
        """Drop the buckets held in memory (after a failed transaction): they are read again when needed."""
        self._buckets.clear()
