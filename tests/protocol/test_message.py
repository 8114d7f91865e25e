"""The inner message codec: round trips per kind, strictness and size limits."""

from __future__ import annotations

import pytest

from gateway.protocol.errors import DecodeError
from gateway.protocol.message import (
    MAX_ACK_IDS,
    InnerMessage,
    InvalidMessageError,
    Kind,
    MessageDecodeError,
    MessageLimits,
    RejectReason,
    new_message_id,
)


def data_message(**kw: object) -> InnerMessage:
    fields: dict[str, object] = {
        "kind": Kind.DATA, "message_id": bytes(range(16)), "sender_agent": "planner",
        "recipient_agent": "camera-01", "created_at_ms": 1_700_000_000_000, "expires_at_ms": 1_700_086_400_000,
        "payload": b"\x00\xffhello",
    }
    fields.update(kw)
    return InnerMessage(**fields)  # type: ignore[arg-type]


FULL = data_message(
    response_topic="agw/planner/in/reply-7", correlation_data=b"\x01\x02corr", content_type="application/json",
    payload=b'{"a": 1}', payload_utf8=True,
    user_properties=(("trace", "abc"), ("trace", "dup keys allowed"), ("ünï", "cödé")),
)


@pytest.mark.parametrize(
    "message",
    [
        data_message(),
        data_message(payload=b""),
        FULL,
        InnerMessage(Kind.ACK, new_message_id(), "camera-01", "planner", 5, 5, ids=(b"a" * 16, b"b" * 16)),
        InnerMessage(Kind.REJECT, new_message_id(), "camera-01", "planner", 5, 9, ids=(b"c" * 16,),
                     reason=RejectReason.CONSENT_PENDING),
    ],
    ids=["data", "empty-payload", "all-properties", "ack", "reject"],
)
def test_round_trip(message: InnerMessage) -> None:
    encoded = message.encode()
    assert InnerMessage.decode(encoded) == message
    assert InnerMessage.decode(encoded).encode() == encoded


def test_absent_and_empty_properties_differ() -> None:
    empty = data_message(correlation_data=b"", content_type="")
    absent = data_message()
    assert InnerMessage.decode(empty.encode()).correlation_data == b""
    assert InnerMessage.decode(absent.encode()).correlation_data is None
    assert empty.encode() != absent.encode()


def test_trailing_and_truncated_bytes_are_refused() -> None:
    encoded = FULL.encode()
    with pytest.raises(MessageDecodeError, match="trailing"):
        InnerMessage.decode(encoded + b"\x00")
    for cut in range(len(encoded)):
        with pytest.raises(MessageDecodeError):
            InnerMessage.decode(encoded[:cut])


def test_payload_limit_is_enforced_before_reading() -> None:
    big = data_message(payload=b"x" * 2000)
    assert InnerMessage.decode(big.encode(), limits=MessageLimits(max_payload=2000)).payload == b"x" * 2000
    with pytest.raises(MessageDecodeError, match="exceeds 1999"):
        InnerMessage.decode(big.encode(), limits=MessageLimits(max_payload=1999))
    header_only = big.encode()[:-2000]  # claims 2000 bytes, carries none: refused on the length alone
    with pytest.raises(MessageDecodeError, match="exceeds"):
        InnerMessage.decode(header_only, limits=MessageLimits(max_payload=10))


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [(0, 2, "version"), (1, 9, "unknown kind")],
)
def test_unknown_version_and_kind(offset: int, value: int, match: str) -> None:
    encoded = bytearray(data_message().encode())
    encoded[offset] = value
    with pytest.raises(MessageDecodeError, match=match):
        InnerMessage.decode(bytes(encoded))


def test_unknown_flag_bits_are_refused() -> None:
    encoded = bytearray(data_message().encode())
    flags_at = 18 + 1 + len("planner") + 1 + len("camera-01") + 16
    assert encoded[flags_at] == 0
    encoded[flags_at] = 0x80
    with pytest.raises(MessageDecodeError, match="flag"):
        InnerMessage.decode(bytes(encoded))


def test_invalid_utf8_agent_name_is_a_decode_error() -> None:
    encoded = bytearray(data_message().encode())
    encoded[19] = 0xFF  # first byte of the sender agent name
    with pytest.raises(MessageDecodeError):
        InnerMessage.decode(bytes(encoded))


@pytest.mark.parametrize(
    "kw",
    [
        {"message_id": b"short"},
        {"sender_agent": "Upper"},
        {"sender_agent": "a/b"},
        {"recipient_agent": "x" * 65},
        {"recipient_agent": "trailing-\n"},
        {"created_at_ms": 10, "expires_at_ms": 9},
        {"created_at_ms": -1},
        {"response_topic": "agw/+/in"},
        {"response_topic": ""},
        {"content_type": "a\x00b"},
        # What Mosquitto refuses in an MQTT string (it would disconnect the gateway at every hand-over):
        {"content_type": "text\x7f"},
        {"response_topic": "agw/x\u0085y"},
        {"user_properties": (("k", "a\tb"),)},
        {"user_properties": (("k\ufffe", "v"),)},
        {"user_properties": (("k", "\U0010ffff"),)},
        {"user_properties": (("\ufdd0", "v"),)},
        {"payload": b"\xff", "payload_utf8": True},
        {"user_properties": (("k", "v"),) * 65},
        {"user_properties": (("k" * 4097, "v"),)},
        {"ids": (bytes(16),)},
        {"reason": RejectReason.EXPIRED},
        {"payload": "not bytes"},
    ],
)
def test_local_construction_is_validated(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidMessageError):
        data_message(**kw)


def test_any_other_unicode_is_fine_in_mqtt_strings() -> None:
    m = data_message(content_type="text/plain; charset=utf-8 \u00e9", response_topic="agw/\u65e5\u672c/r",
                     user_properties=(("emoji", "\U0001f600"), ("bmp-end", "\ufffd"), ("latin", "\u00a0\u00ff")))
    assert InnerMessage.decode(m.encode()) == m


def test_ack_and_reject_rules() -> None:
    mid = new_message_id()
    with pytest.raises(InvalidMessageError):
        InnerMessage(Kind.REJECT, mid, "a", "b", 0, 0, reason=RejectReason.EXPIRED)  # no ids
    empty_ack = InnerMessage(Kind.ACK, mid, "a", "b", 0, 0)  # a no-op that opens a session
    assert InnerMessage.decode(empty_ack.encode()) == empty_ack
    with pytest.raises(InvalidMessageError):
        InnerMessage(Kind.ACK, mid, "a", "b", 0, 0, ids=(bytes(16),) * (MAX_ACK_IDS + 1))
    with pytest.raises(InvalidMessageError):
        InnerMessage(Kind.ACK, mid, "a", "b", 0, 0, ids=(bytes(16),), payload=b"x")
    with pytest.raises(InvalidMessageError):
        InnerMessage(Kind.REJECT, mid, "a", "b", 0, 0, ids=(bytes(16),))  # reason missing
    assert InnerMessage(Kind.ACK, mid, "a", "b", 0, 0, ids=(bytes(16),) * MAX_ACK_IDS).encode()


def test_rule_violations_from_the_wire_are_decode_errors() -> None:
    encoded = bytearray(InnerMessage(Kind.REJECT, bytes(16), "a", "b", 0, 0, ids=(bytes(16),),
                                     reason=RejectReason.TOO_LARGE).encode())
    encoded[-18:-16] = b"\x00\x00"  # id count 0
    with pytest.raises(MessageDecodeError, match=r"1\.\.1024"):
        InnerMessage.decode(bytes(encoded[:-16]))
    times_at = 18 + 1 + len("planner") + 1 + len("camera-01")
    encoded = bytearray(data_message().encode())
    encoded[times_at : times_at + 16] = (20).to_bytes(8, "big") + (10).to_bytes(8, "big")
    with pytest.raises(MessageDecodeError, match="created_at_ms"):
        InnerMessage.decode(bytes(encoded))


def test_decode_errors_are_protocol_decode_errors() -> None:
    assert issubclass(MessageDecodeError, DecodeError)
    with pytest.raises(DecodeError):
        InnerMessage.decode(b"")
    with pytest.raises(MessageDecodeError):
        InnerMessage.decode("not bytes")  # type: ignore[arg-type]


def test_reject_reason_finality_and_expiry() -> None:
    assert not RejectReason.CONSENT_PENDING.is_final and RejectReason.CONSENT_DENIED.is_final
    m = data_message(created_at_ms=100, expires_at_ms=200)
    assert not m.is_expired(199) and m.is_expired(200)
    assert new_message_id() != new_message_id() and len(new_message_id()) == 16


def test_layout_matches_the_document() -> None:
    """docs/protocol.md ("Pairwise") section 10, built by hand."""
    import struct

    mid = bytes(range(16))
    by_hand = (
        b"\x01\x01" + mid + b"\x07planner" + b"\x09camera-01" + struct.pack(">QQ", 5, 9)
        + bytes([0x01 | 0x02 | 0x08]) + b"\x00\x05topic" + b"\x00\x02\xca\xfe"
        + b"\x00\x01" + b"\x00\x01k" + b"\x00\x02vv" + b"\x00\x00\x00\x02hi"
    )
    m = InnerMessage(Kind.DATA, mid, "planner", "camera-01", 5, 9, payload=b"hi", response_topic="topic",
                     correlation_data=b"\xca\xfe", payload_utf8=True, user_properties=(("k", "vv"),))
    assert m.encode() == by_hand
    reject = (b"\x01\x03" + mid + b"\x01a" + b"\x01b" + struct.pack(">QQ", 0, 0) + b"\x02" + b"\x00\x01" + b"x" * 16)
    assert InnerMessage.decode(reject).reason is RejectReason.CONSENT_DENIED


def test_agent_names_checked_once_per_pair_refuse_the_same() -> None:
    """`_check` remembers (sender, recipient) pairs of plain `str` that passed its name rule: a remembered pair is
    accepted without the regex, a refused name is refused every time and never remembered, nor is a `str`
    subclass, and past the bound the set starts again with the new pair (a refused one never enters)."""
    from gateway.protocol import message as message_module

    memo = message_module._NAMES_CHECKED
    saved = set(memo)
    memo.clear()
    try:
        good = data_message(sender_agent="memo-a", recipient_agent="memo-b")
        assert ("memo-a", "memo-b") in memo
        assert InnerMessage.decode(good.encode()) == good  # (the decoder's `_built` runs `_check` too)
        for _ in range(2):  # the second time with the good pair remembered beside it
            for kw in ({"sender_agent": "memo-a", "recipient_agent": "Memo-b"},
                       {"sender_agent": "memo-a/", "recipient_agent": "memo-b"},
                       {"sender_agent": "memo-a", "recipient_agent": "memo-b\n"}):
                with pytest.raises(InvalidMessageError, match="agent"):
                    data_message(**kw)
            assert memo == {("memo-a", "memo-b")}

        class Name(str):
            pass

        assert data_message(sender_agent=Name("memo-c"), recipient_agent="memo-d").sender_agent == "memo-c"
        assert memo == {("memo-a", "memo-b")}
        wire = bytearray(good.encode())
        wire[19:19 + len("memo-a")] = b"Memo-a"  # a refused name from the wire, the good pair remembered
        with pytest.raises(MessageDecodeError, match="agent"):
            InnerMessage.decode(bytes(wire))
        memo.update((f"x{i}", "y") for i in range(message_module._NAMES_CHECKED_MAX))  # full
        assert data_message(sender_agent="memo-e", recipient_agent="memo-f")
        assert memo == {("memo-e", "memo-f")}  # a full set starts again: later streams are not kept out for good
        with pytest.raises(InvalidMessageError, match="agent"):
            data_message(sender_agent="memo-e", recipient_agent="Memo-f")
        assert memo == {("memo-e", "memo-f")}
    finally:
        memo.clear()
        memo.update(saved)
