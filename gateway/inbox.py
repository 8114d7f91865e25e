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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.protocol.errors import ProtocolError
from gateway.protocol.message import InnerMessage

RECORD_VERSION = 2


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
    def new(cls, peer_device: str, seq: int, message: InnerMessage) -> InboxEntry:
        return cls(f"{peer_device}/{message.message_id.hex()}", peer_device, seq, message, message.encode())

    def record(self) -> bytes:
        return (bytes([RECORD_VERSION]) + self.seq.to_bytes(8, "big") + self.packet_id.to_bytes(2, "big")
                + bytes([self.phase]) + self.encoded)

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
