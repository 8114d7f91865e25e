"""Pairwise protocol v2: a batch of ratchet messages to one peer under one signature.

Every message of a batch is still covered by an Ed25519 signature of the sender's delegated key, checked before
anything is decrypted: the batch carries one signature over all of its messages, bound to the sender and
recipient device ids and a context string. A batch whose signature does not verify is rejected whole; a message
inside a verified batch that fails its ratchet step or its AEAD tag is rejected alone (the session is unchanged
for it). Replay and reordering protection is the ratchet's, exactly as for v1 messages.

Batches are sent only on established sessions: session setup (PREKEY messages) stays v1, message by message.
`PairwiseBatch.parse` checks only shape and sizes; the result is unverified. Layout: docs/protocol.md
("Pairwise"), section 7.2.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gateway.protocol.pairwise import codec
from gateway.protocol.pairwise.crypto import SIGNATURE_LEN, TAG_LEN
from gateway.protocol.pairwise.errors import PairwiseDecodeError
from gateway.protocol.pairwise.wire import DEFAULT_MAX_MESSAGE_SIZE, SESSION_ID_LEN, RatchetHeader

BATCH_VERSION = 2
BATCH_TYPE = 3
BATCH_SIGNATURE_CONTEXT = b"agw pairwise v2 batch\x00"
MAX_BATCH_COUNT = 1024
DEFAULT_MAX_BATCH_SIZE = DEFAULT_MAX_MESSAGE_SIZE
"""Parsing limit; the daemon keeps its batches below the relay's envelope limit (256 KiB by default)."""

_HEAD = struct.Struct(">BB16sH")  # version, type, session id, count
_ITEM = struct.Struct(">32sII24sI")  # dh_public, pn, n, nonce, ciphertext length
ITEM_HEADER_LEN = _ITEM.size  # 68
BATCH_OVERHEAD = _HEAD.size + SIGNATURE_LEN  # 84 bytes, plus ITEM_HEADER_LEN + TAG_LEN per message
ITEM_OVERHEAD = ITEM_HEADER_LEN + TAG_LEN  # 84 bytes per message on top of its plaintext


def item_aad(session_id: bytes, header: bytes) -> bytes:
    """The AEAD associated data of one batched message: version, type, session id and its ratchet header
    (`dh_public || pn || n || nonce`). Version 2 makes it differ from every v1 message's associated data."""
    return bytes((BATCH_VERSION, BATCH_TYPE)) + session_id + header


def signed_data(sender_device_id: str, recipient_device_id: str, body: bytes) -> bytes:
    """What the batch signature covers: context, both device ids, and every byte of the batch before it."""
    return b"".join((BATCH_SIGNATURE_CONTEXT, codec.text8(sender_device_id), codec.text8(recipient_device_id),
                     body))


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One ratchet message of a batch: its header, the exact header bytes received, and its ciphertext."""

    header: RatchetHeader
    header_bytes: bytes
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class PairwiseBatch:
    """A parsed, not yet verified batch."""

    session_id: bytes
    items: tuple[BatchItem, ...]
    signature: bytes
    signed_part: bytes  # every byte before the signature, exactly as received

    @staticmethod
    def is_batch(data: bytes) -> bool:
        """Whether `data` starts like a batch (a v2 wire message); parse it to know whether it is one."""
        return len(data) >= 2 and data[0] == BATCH_VERSION and data[1] == BATCH_TYPE

    @classmethod
    def parse(cls, data: bytes, *, max_size: int = DEFAULT_MAX_BATCH_SIZE) -> PairwiseBatch:
        data = codec.wire_bytes(data, max_size, "pairwise batch")
        if len(data) < _HEAD.size + SIGNATURE_LEN:
            raise PairwiseDecodeError("pairwise batch: too short for a header and a signature")
        version, kind, session_id, count = _HEAD.unpack_from(data)
        if version != BATCH_VERSION:
            raise PairwiseDecodeError(f"pairwise batch: unsupported version {version} (expected {BATCH_VERSION})")
        if kind != BATCH_TYPE:
            raise PairwiseDecodeError(f"pairwise batch: unknown type {kind} (expected {BATCH_TYPE})")
        if not 1 <= count <= MAX_BATCH_COUNT:
            raise PairwiseDecodeError(f"pairwise batch: message count {count} outside 1..{MAX_BATCH_COUNT}")
        end = len(data) - SIGNATURE_LEN
        pos = _HEAD.size
        items = []
        for i in range(count):
            if pos + ITEM_HEADER_LEN > end:
                raise PairwiseDecodeError(f"pairwise batch: truncated in the header of message {i}")
            dh_public, pn, n, nonce, length = _ITEM.unpack_from(data, pos)
            if length < TAG_LEN:
                raise PairwiseDecodeError(f"pairwise batch: message {i} is shorter than an AEAD tag")
            start = pos + ITEM_HEADER_LEN
            if start + length > end:
                raise PairwiseDecodeError(f"pairwise batch: truncated in the ciphertext of message {i}")
            items.append(_item(dh_public, pn, n, nonce, data[pos : pos + ITEM_HEADER_LEN - 4],
                               data[start : start + length]))
            pos = start + length
        if pos != end:
            raise PairwiseDecodeError(f"pairwise batch: {end - pos} bytes between the last message and the signature")
        return cls(session_id, tuple(items), data[end:], data[:end])


_new_object = object.__new__
_set_dh_public = RatchetHeader.__dict__["dh_public"].__set__
_set_previous_chain_length = RatchetHeader.__dict__["previous_chain_length"].__set__
_set_message_number = RatchetHeader.__dict__["message_number"].__set__
_set_nonce = RatchetHeader.__dict__["nonce"].__set__
_set_header = BatchItem.__dict__["header"].__set__
_set_header_bytes = BatchItem.__dict__["header_bytes"].__set__
_set_ciphertext = BatchItem.__dict__["ciphertext"].__set__


def _item(dh_public: bytes, pn: int, n: int, nonce: bytes, header_bytes: bytes, ciphertext: bytes) -> BatchItem:
    """`BatchItem(RatchetHeader(dh_public, pn, n, nonce), header_bytes, ciphertext)` for `parse`, with the slots
    filled by their own setters instead of the frozen dataclasses' `__init__`s (7 `object.__setattr__` calls) and
    without the header's `__post_init__`, whose checks hold by construction here: `_ITEM` unpacks a 32-byte key, a
    24-byte nonce and two unsigned 32-bit counters. Ordinary instances: frozen, equal and hashed by their fields."""
    h = _new_object(RatchetHeader)
    _set_dh_public(h, dh_public)
    _set_previous_chain_length(h, pn)
    _set_message_number(h, n)
    _set_nonce(h, nonce)
    item = _new_object(BatchItem)
    _set_header(item, h)
    _set_header_bytes(item, header_bytes)
    _set_ciphertext(item, ciphertext)
    return item


def encode_item(header: bytes, ciphertext: bytes) -> bytes:
    """One batched message: its 64-byte ratchet header, the ciphertext length, the ciphertext."""
    return header + len(ciphertext).to_bytes(4, "big") + ciphertext


def encode_head(session_id: bytes, count: int) -> bytes:
    if len(session_id) != SESSION_ID_LEN or not 1 <= count <= MAX_BATCH_COUNT:
        raise ValueError(f"pairwise batch: session id must be {SESSION_ID_LEN} bytes and count 1..{MAX_BATCH_COUNT}")
    return _HEAD.pack(BATCH_VERSION, BATCH_TYPE, session_id, count)

