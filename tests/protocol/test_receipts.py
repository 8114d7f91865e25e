"""The receipt and ack wire formats (gateway/protocol/receipts.py, docs/protocol.md "Receipts and acks")."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol.errors import ProtocolError
from gateway.protocol.receipts import (
    GOODBYE,
    ID_SIZE,
    INSTANCE_SIZE,
    MAX_IDS,
    RESERVED_INSTANCES,
    ReceiptFormatError,
    decode_ids,
    derive_group_send_id,
    derive_message_id,
    encode_ids,
    parse_instance_id,
    parse_sdk_id,
)


def test_derived_id_is_the_documented_hash_and_namespaced_by_agent() -> None:
    sdk_id = bytes(range(16))
    label = b"agw sdk message id v1"
    expected = hashlib.sha256(bytes([len(label)]) + label + bytes([5]) + b"alice" + sdk_id).digest()[:16]
    assert derive_message_id("alice", sdk_id) == expected
    assert derive_message_id("alice", sdk_id) != derive_message_id("bob", sdk_id)
    with pytest.raises(ReceiptFormatError):
        derive_message_id("alice", sdk_id[:15])


def test_group_send_id_is_the_documented_hash_and_namespaced_by_agent_and_group() -> None:
    sdk_id = bytes(range(16))
    label = b"agw sdk group send v1"
    expected = hashlib.sha256(bytes([len(label)]) + label + bytes([5]) + b"alice" + bytes([4]) + b"team"
                              + sdk_id).digest()[:16]
    assert derive_group_send_id("alice", "team", sdk_id) == expected
    others = {derive_group_send_id("bob", "team", sdk_id), derive_group_send_id("alice", "teams", sdk_id),
              derive_message_id("alice", sdk_id)}
    assert expected not in others and len(others) == 3
    for bad in (("alice", "team", sdk_id[:15]), ("", "team", sdk_id), ("alice", "t" * 256, sdk_id)):
        with pytest.raises(ReceiptFormatError):
            derive_group_send_id(*bad)


def test_sdk_id_is_exactly_32_lowercase_hex_digits() -> None:
    assert parse_sdk_id("00" * 15 + "ff") == bytes(15) + b"\xff"
    for bad in ("", "ab", "00" * 15 + "FF", "0" * 33, "g" * 32, " " + "0" * 31, "0" * 31 + "\u0660"):
        with pytest.raises(ReceiptFormatError):
            parse_sdk_id(bad)


def test_ids_round_trip_and_bounds() -> None:
    ids = [bytes([i]) * ID_SIZE for i in range(3)]
    assert decode_ids(encode_ids(ids)) == ids
    assert decode_ids(b"") == []
    assert GOODBYE == b"\x00" and len(GOODBYE) % ID_SIZE  # never a valid list of ids
    with pytest.raises(ReceiptFormatError):
        decode_ids(bytes(ID_SIZE * (MAX_IDS + 1)))
    with pytest.raises(ReceiptFormatError):
        encode_ids([b"short"])


@given(st.binary(max_size=200))
def test_decode_ids_raises_only_declared_errors(data: bytes) -> None:
    try:
        ids = decode_ids(data)
    except ProtocolError:
        assert len(data) % ID_SIZE
        return
    assert b"".join(ids) == data


@given(st.text(max_size=40))
def test_parse_sdk_id_raises_only_declared_errors(value: str) -> None:
    try:
        assert len(parse_sdk_id(value)) == ID_SIZE
    except ProtocolError:
        pass


def test_instance_id_is_32_lowercase_hex_digits_and_not_reserved() -> None:
    """`agw:instance` on an announcement or a goodbye (docs/protocol.md): the reserved values stand for clients
    the gateway cannot name, so no client may claim one."""
    assert parse_instance_id("01" * INSTANCE_SIZE) == b"\x01" * INSTANCE_SIZE
    assert RESERVED_INSTANCES == (bytes(INSTANCE_SIZE), b"\xff" * INSTANCE_SIZE)
    for bad in ("", "00" * 16, "ff" * 16, "FF" * 16, "0" * 31, "g" * 32, "01" * 17):
        with pytest.raises(ReceiptFormatError):
            parse_instance_id(bad)


@given(st.text(max_size=40))
def test_parse_instance_id_raises_only_declared_errors(value: str) -> None:
    try:
        assert len(parse_instance_id(value)) == INSTANCE_SIZE
    except ProtocolError:
        pass
