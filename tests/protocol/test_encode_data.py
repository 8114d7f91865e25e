"""`encode_data` (the sender's ingest builds its outbox records with it, without an `InnerMessage`) returns
exactly `InnerMessage(Kind.DATA, ...).encode()`, or raises exactly the `InvalidMessageError` that construction
raises, for any arguments: well-formed ones, each field just outside its rule, and values of other types."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol import message
from gateway.protocol.message import (
    MAX_PAYLOAD_HARD_LIMIT,
    InnerMessage,
    InvalidMessageError,
    Kind,
    encode_data,
    new_message_ids,
)

FUZZ = settings(max_examples=int(os.environ.get("AGW_FUZZ_EXAMPLES", "600")), deadline=None)


class _Str(str):
    """A str subclass: passes `isinstance` checks, takes the general path."""


class _Int(int):
    pass


names = st.one_of(
    st.from_regex(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?", fullmatch=True),
    st.sampled_from(["", "A", "-a", "a-", "a" * 65, "a/b", "a\n", "\u00e9", "a b"]),
    st.text(max_size=70),
    st.builds(_Str, st.sampled_from(["alice", "bob"])),
    st.sampled_from([None, b"alice", 3]),
)
ids = st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20), st.sampled_from([None, "x" * 16]),
                st.builds(bytearray, st.binary(min_size=16, max_size=16)))
times = st.one_of(st.integers(0, 2**64 + 5), st.integers(-5, 5), st.sampled_from([True, False, 1.0, None]),
                  st.builds(_Int, st.integers(0, 10)))
payloads = st.one_of(st.binary(max_size=300), st.text(max_size=50).map(str.encode),
                     st.sampled_from([b"\xff\xfe", b"\xc3", "text", None]), st.builds(bytearray, st.binary(max_size=8)))
mqtt_text = st.one_of(st.none(), st.text(max_size=30),
                      st.sampled_from(["", "a/+", "a/#", "a\x00", "\ufeff", "a" * 4097, b"bytes", 5]))
correlation = st.one_of(st.none(), st.binary(max_size=40), st.sampled_from([b"x" * 4097, "text", bytearray(b"c")]))
flags = st.one_of(st.booleans(), st.sampled_from([0, 1, None, "yes"]))
props = st.one_of(st.just(()),
                  st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=3).map(tuple),
                  st.sampled_from([(("k", "\x00"),), (("k",),), (("k", 1),), [("k", "v")],
                                   (("agw:deliver-to", "x/y"),), None, 0, [], ""]))


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except InvalidMessageError as exc:
        return "invalid", str(exc)
    except Exception as exc:  # (e.g. a TypeError from a value of another type: the same one, for the same input)
        return type(exc).__name__, str(exc)


def built(*args: Any) -> bytes:
    mid, sender, recipient, created, expires, payload, rt, cd, ct, utf8, up = args
    return InnerMessage(Kind.DATA, mid, sender, recipient, created, expires, payload=payload, response_topic=rt,
                        correlation_data=cd, content_type=ct, payload_utf8=utf8, user_properties=up).encode()


valid = (st.binary(min_size=16, max_size=16), st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
         st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), st.integers(0, 2**40), st.integers(2**40, 2**41),
         st.binary(max_size=300), st.none(), st.none(), st.none(), st.booleans(), st.just(()))
anything = (ids, names, names, times, times, payloads, mqtt_text, correlation, mqtt_text, flags, props)


@st.composite
def arguments(draw: st.DrawFn) -> tuple[Any, ...]:
    """A plain message (perhaps flagged UTF-8 and not) with 0-3 fields replaced by anything (of any type)."""
    args = [draw(s) for s in valid]
    for i in draw(st.lists(st.integers(0, len(args) - 1), max_size=3)):
        args[i] = draw(anything[i])
    return tuple(args)


@FUZZ
@given(arguments())
def test_encode_data_is_the_validated_construction_for_any_input(args: tuple[Any, ...]) -> None:
    assert outcome(encode_data, *args) == outcome(built, *args)


def test_empty_user_properties_of_another_type_are_not_taken_for_none() -> None:
    """`None` (or 0, or an empty list) is not an empty tuple: it goes where the validated construction sends it."""
    for up in (None, 0, [], ""):
        args = (bytes(16), "alice", "bob", 1, 2, b"x", None, None, None, False, up)
        assert outcome(encode_data, *args) == outcome(built, *args)


@FUZZ
@given(st.binary(min_size=16, max_size=16), st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
       st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), st.integers(0, 2**40), st.integers(0, 2**40),
       st.binary(max_size=300), st.booleans())
def test_plain_messages_take_the_straight_line_and_match(mid: bytes, sender: str, recipient: str, created: int,
                                                         ttl: int, payload: bytes, utf8: bool) -> None:
    args = (mid, sender, recipient, created, created + ttl, payload, None, None, None, utf8, ())
    assert outcome(encode_data, *args) == outcome(built, *args)


def test_the_straight_line_is_taken_and_decodes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain message never builds an `InnerMessage` (the point of it), and the peer decodes it as built."""
    def no(*_: Any, **__: Any) -> None:
        raise AssertionError("built an InnerMessage")

    monkeypatch.setattr(message, "InnerMessage", no)
    mid = bytes(range(16))
    wire = encode_data(mid, "alice", "bob", 5, 9, b"caf\xc3\xa9", payload_utf8=True)
    monkeypatch.undo()
    assert InnerMessage.decode(wire) == InnerMessage(Kind.DATA, mid, "alice", "bob", 5, 9, payload=b"caf\xc3\xa9",
                                                     payload_utf8=True)


def test_edges_refused_like_the_construction() -> None:
    mid = bytes(16)
    for args in [
        (mid, "alice", "bob", 5, 4, b"", None, None, None, False, ()),  # expires before created
        (mid, "alice", "bob", 0, 2**64, b"", None, None, None, False, ()),
        (mid, "alice", "Bob", 0, 1, b"", None, None, None, False, ()),
        (mid, "alice", "bob", 0, 1, b"\xff", None, None, None, True, ()),  # flagged UTF-8, is not
        (mid, "alice", "bob", 0, 1, bytes(MAX_PAYLOAD_HARD_LIMIT + 1), None, None, None, False, ()),
        (mid[:15], "alice", "bob", 0, 1, b"", None, None, None, False, ()),
    ]:
        got = outcome(encode_data, *args)
        assert got[0] == "invalid" and got == outcome(built, *args)


def test_the_name_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(message, "_DATA_NAMES", {})
    for i in range(message._DATA_NAMES_MAX + 50):
        encode_data(bytes(16), f"a{i}", "bob", 0, 1, b"x")
    assert len(message._DATA_NAMES) == message._DATA_NAMES_MAX


def test_new_message_ids_are_distinct_16_byte_ids() -> None:
    got = new_message_ids(1000) + new_message_ids(3) + new_message_ids(0)
    assert len(got) == 1003 and {len(i) for i in got} == {16} and len(set(got)) == 1003
