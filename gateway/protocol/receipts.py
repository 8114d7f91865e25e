"""End-to-end receipts between the agent SDK and its gateway (docs/protocol.md, "Receipts and acks").

Sans-I/O. Sending: the SDK gives each message a random 16-byte id, carried as the MQTT 5 user property
`agw:message-id` (32 lowercase hex digits); the gateway derives the end-to-end message id from it, namespaced by
the sending agent (`derive_message_id`), and answers with a receipt on `agw/<agent>/receipt` once the message is
durable. Receiving: the SDK acknowledges the `agw:message-id` of each message it hands to the application on
`agw/<agent>/ack`. Receipt and ack payloads are both a concatenation of 16-byte ids (`encode_ids`, `decode_ids`);
an empty ack says "this agent acknowledges" (sent on every connect), and the one-byte ack `GOODBYE` says "this
agent stops acknowledging" (sent by an SDK client that closes cleanly). Since 2026-12-07 both carry the SDK client's
instance id (user property `agw:instance`, `parse_instance_id`): the gateway keeps holding while any announced
client of the agent has not said goodbye; without it (an older SDK) they mean what they meant before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from gateway.protocol.errors import DecodeError

ID_SIZE = 16
MAX_IDS = 4096  # per receipt or ack payload (64 KiB)
DERIVE_LABEL = b"agw sdk message id v1"
GROUP_SEND_LABEL = b"agw sdk group send v1"
MAX_REASON = 256  # characters of the agw:refused reason on a refusal receipt
GOODBYE = b"\x00"  # the ack payload of a client that closes cleanly
INSTANCE_SIZE = 16  # bytes of an SDK client's instance id (random, made when the client is created)
# Instance ids no SDK sends (it draws 16 random bytes): the gateway uses them for announcers it cannot name.
RESERVED_INSTANCES = (bytes(INSTANCE_SIZE), b"\xff" * INSTANCE_SIZE)


class ReceiptFormatError(DecodeError):
    """A receipt, an ack or an SDK message id is malformed."""


def parse_sdk_id(value: str) -> bytes:
    """The 16-byte id of an `agw:message-id` user property set by an agent: exactly 32 lowercase hex digits."""
    if len(value) != 2 * ID_SIZE or any(c not in "0123456789abcdef" for c in value):
        raise ReceiptFormatError(f"agw:message-id must be {2 * ID_SIZE} lowercase hex digits "
                                 f"(got {len(value)} characters)")
    return bytes.fromhex(value)


def parse_instance_id(value: str) -> bytes:
    """The instance id of an `agw:instance` user property (an SDK client's announcement or goodbye): exactly 32
    lowercase hex digits, not one of `RESERVED_INSTANCES`."""
    if len(value) != 2 * INSTANCE_SIZE or any(c not in "0123456789abcdef" for c in value):
        raise ReceiptFormatError(f"agw:instance must be {2 * INSTANCE_SIZE} lowercase hex digits "
                                 f"(got {len(value)} characters)")
    raw = bytes.fromhex(value)
    if raw in RESERVED_INSTANCES:
        raise ReceiptFormatError("agw:instance is a reserved value")
    return raw


def derive_message_id(agent: str, sdk_id: bytes) -> bytes:
    """The end-to-end message id of an SDK message: SHA-256(len(label) | label | len(agent) | agent | sdk id)[:16],
    lengths as one byte. Two agents choosing the same SDK id get different message ids."""
    return _derive(DERIVE_LABEL, (agent,), sdk_id)


def derive_group_send_id(agent: str, group: str, sdk_id: bytes) -> bytes:
    """The id under which the sending gateway remembers an SDK group send, to take a retransmission once:
    SHA-256(len(label) | label | len(agent) | agent | len(group) | group | sdk id)[:16], label
    GROUP_SEND_LABEL. Never on the wire (MLS application messages carry no id)."""
    return _derive(GROUP_SEND_LABEL, (agent, group), sdk_id)


def _derive(label: bytes, names: tuple[str, ...], sdk_id: bytes) -> bytes:
    if len(sdk_id) != ID_SIZE:
        raise ReceiptFormatError(f"an SDK message id is {ID_SIZE} bytes, not {len(sdk_id)}")
    data = bytes([len(label)]) + label
    for name in names:
        raw = name.encode()
        if not 0 < len(raw) < 256:
            raise ReceiptFormatError("agent and group names must be 1-255 bytes")
        data += bytes([len(raw)]) + raw
    return hashlib.sha256(data + sdk_id).digest()[:ID_SIZE]


def encode_ids(ids: Iterable[bytes]) -> bytes:
    out = b"".join(ids)
    if len(out) % ID_SIZE or len(out) > MAX_IDS * ID_SIZE:
        raise ReceiptFormatError(f"ids are {ID_SIZE} bytes each, at most {MAX_IDS} per payload")
    return out


def decode_ids(payload: bytes) -> list[bytes]:
    """The ids of a receipt or ack payload (possibly none; the caller checks for `GOODBYE` first)."""
    if len(payload) % ID_SIZE:
        raise ReceiptFormatError(f"a receipt or ack payload is a multiple of {ID_SIZE} bytes (got {len(payload)})")
    if len(payload) > MAX_IDS * ID_SIZE:
        raise ReceiptFormatError(f"a receipt or ack payload holds at most {MAX_IDS} ids")
    return [payload[i:i + ID_SIZE] for i in range(0, len(payload), ID_SIZE)]
