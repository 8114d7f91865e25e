"""Fuzzing: `InnerMessage.decode` raises only `MessageDecodeError` on any input, and anything it accepts
re-encodes to the same bytes. Set AGW_FUZZ_EXAMPLES for a long run."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.message import (
    InnerMessage,
    Kind,
    MessageDecodeError,
    MessageLimits,
    RejectReason,
    mqtt_utf8_ok,
)

EXAMPLES = int(os.environ.get("AGW_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None)

SEEDS = [
    InnerMessage(Kind.DATA, bytes(range(16)), "planner", "camera-01", 1, 2, payload=b"hello", payload_utf8=True,
                 response_topic="agw/planner/in", correlation_data=b"c", content_type="text/plain",
                 user_properties=(("k", "v"), ("k2", "v2"))).encode(),
    InnerMessage(Kind.DATA, bytes(16), "a", "b", 0, 0).encode(),
    InnerMessage(Kind.ACK, bytes(16), "a", "b", 0, 0, ids=(b"x" * 16, b"y" * 16)).encode(),
    InnerMessage(Kind.REJECT, bytes(16), "a", "b", 0, 0, ids=(b"x" * 16,), reason=RejectReason.EXPIRED).encode(),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend"]))
        if op == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.sampled_from([0, 1, 2, 3, 0x80, 0xFF]))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        else:
            data += draw(st.binary(max_size=32))
    return bytes(data)


@FUZZ
@given(st.one_of(st.binary(max_size=256), mutated()))
def test_decode_raises_only_decode_errors(data: bytes) -> None:
    try:
        message = InnerMessage.decode(data, limits=MessageLimits(max_payload=4096))
    except MessageDecodeError:
        return
    assert message.encode() == data


names = st.from_regex(r"[a-z0-9]([a-z0-9._-]{0,10}[a-z0-9])?", fullmatch=True)
# What MQTT strings may hold (gateway.protocol.message.mqtt_utf8_ok: no control characters or non-characters).
text = st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=20).filter(mqtt_utf8_ok)


@FUZZ
@given(
    message_id=st.binary(min_size=16, max_size=16), sender=names, recipient=names,
    created=st.integers(0, 2**63), extra=st.integers(0, 2**63 - 1), payload=st.binary(max_size=300),
    topic=st.none() | text.filter(lambda t: t != "" and "+" not in t and "#" not in t),
    corr=st.none() | st.binary(max_size=40), ctype=st.none() | text,
    props=st.lists(st.tuples(text, text), max_size=5),
)
def test_generated_data_messages_round_trip(
    message_id: bytes, sender: str, recipient: str, created: int, extra: int, payload: bytes, topic: str | None,
    corr: bytes | None, ctype: str | None, props: list[tuple[str, str]],
) -> None:
    m = InnerMessage(Kind.DATA, message_id, sender, recipient, created, created + extra, payload=payload,
                     response_topic=topic, correlation_data=corr, content_type=ctype, user_properties=tuple(props))
    assert InnerMessage.decode(m.encode()) == m


def _step_by_step(data: bytes, limits: MessageLimits) -> InnerMessage | str:
    """The reader-based parse alone (the straight-line fast path switched off), as a result or an error text."""
    import gateway.protocol.message as message_module

    fast = message_module._decode_fast
    message_module._decode_fast = lambda *_: None  # type: ignore[assignment]
    try:
        return InnerMessage.decode(data, limits=limits)
    except MessageDecodeError as exc:
        return str(exc)
    finally:
        message_module._decode_fast = fast


@FUZZ
@given(st.one_of(st.binary(max_size=256), mutated()), st.sampled_from([0, 4, 4096]))
def test_fast_decode_agrees_with_the_step_by_step_parse(data: bytes, max_payload: int) -> None:
    """The straight-line decode of DATA and ACK messages returns exactly what the reader-based parse returns, and
    leaves every input it does not accept to it (so errors keep their exact text)."""
    limits = MessageLimits(max_payload=max_payload)
    try:
        got: InnerMessage | str = InnerMessage.decode(data, limits=limits)
    except MessageDecodeError as exc:
        got = str(exc)
    assert got == _step_by_step(data, limits)


def test_fast_decode_takes_the_common_messages() -> None:
    """The fast path is really used for DATA and ACK (else the test above compares the slow path with itself)."""
    import gateway.protocol.message as message_module

    for seed in SEEDS[:3]:
        assert message_module._decode_fast(InnerMessage, seed, 4096) == InnerMessage.decode(seed)
    assert message_module._decode_fast(InnerMessage, SEEDS[3], 4096) is None  # REJECT: step by step


def test_fast_decode_builds_ordinary_frozen_messages() -> None:
    """The fast path fills the slots without the dataclass `__init__` (`_built`): what it returns is still an
    `InnerMessage` like one built by `__init__`: every field set, equal and hashed alike, frozen, same repr, and
    `dataclasses.replace` and pickling work; a subclass still goes through its own `__init__`; a field that breaks a
    rule is refused as before (by the step-by-step parse's error)."""
    import dataclasses
    import pickle

    import gateway.protocol.message as message_module

    for seed in SEEDS[:3]:
        fast = message_module._decode_fast(InnerMessage, seed, 4096)
        assert fast is not None and type(fast) is InnerMessage
        built = InnerMessage(*(getattr(fast, f.name) for f in dataclasses.fields(InnerMessage)))
        assert fast == built and hash(fast) == hash(built) and repr(fast) == repr(built)
        assert dataclasses.astuple(fast) == dataclasses.astuple(built)
        assert pickle.loads(pickle.dumps(fast)) == fast
        assert dataclasses.replace(fast, created_at_ms=0) == dataclasses.replace(built, created_at_ms=0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.kind = Kind.REJECT  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            del fast.payload  # type: ignore[misc]

    calls = []

    class Traced(InnerMessage):
        __slots__ = ()

        def __post_init__(self) -> None:
            calls.append(self.message_id)
            super().__post_init__()

    got = Traced.decode(SEEDS[1])
    assert type(got) is Traced and calls == [bytes(16)] and got == Traced(Kind.DATA, bytes(16), "a", "b", 0, 0)

    bad_name = InnerMessage(Kind.DATA, bytes(16), "ab", "b", 0, 0).encode().replace(b"\x02ab", b"\x02A!")
    assert message_module._decode_fast(InnerMessage, bad_name, 4096) is None
    with pytest.raises(MessageDecodeError, match="sender agent 'A!'"):
        InnerMessage.decode(bad_name)
