"""The routing envelope: round trips, strict decoding, and device-id validation."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol.envelope import ENVELOPE_OVERHEAD, Envelope, EnvelopeError, EnvelopeKind, check_device_id
from gateway.protocol.errors import ProtocolError

device_ids = st.from_regex(r"[a-z0-9](?:[a-z0-9._-]{0,10}[a-z0-9])?", fullmatch=True)


@given(
    kind=st.sampled_from(EnvelopeKind),
    eid=st.binary(min_size=16, max_size=16),
    sender=device_ids,
    recipient=device_ids,
    ct=st.binary(max_size=300),
)
def test_round_trip(kind: EnvelopeKind, eid: bytes, sender: str, recipient: str, ct: bytes) -> None:
    env = Envelope(kind, eid, sender, recipient, ct)
    data = env.serialize()
    assert len(data) == env.size
    assert Envelope.parse(data) == env
    assert Envelope.peek_id(data) == eid


def test_layout_is_as_documented() -> None:
    env = Envelope(EnvelopeKind.PAIRWISE, bytes(range(16)), "a", "bc", b"xyz")
    assert env.serialize() == b"\x01\x01" + bytes(range(16)) + b"\x01a" + b"\x02bc" + b"\x00\x00\x00\x03xyz"
    assert env.size == ENVELOPE_OVERHEAD + 1 + 2 + 3


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:-1],  # truncated ciphertext
        lambda d: d + b"\x00",  # trailing byte
        lambda d: b"\x02" + d[1:],  # unknown version
        lambda d: d[:1] + b"\x09" + d[2:],  # unknown kind
        lambda d: d[:18] + b"\x00" + d[19:],  # empty sender id
        lambda d: d[:19] + b"A" + d[20:],  # upper-case sender
        lambda d: d[:10],
    ],
)
def test_malformed_rejected(mutate) -> None:  # type: ignore[no-untyped-def]
    data = Envelope(EnvelopeKind.E2E_ACK, os.urandom(16), "dev-a", "dev-b", b"ciphertext").serialize()
    with pytest.raises(EnvelopeError):
        Envelope.parse(mutate(data))


def test_size_limit() -> None:
    data = Envelope(EnvelopeKind.GROUP, os.urandom(16), "a", "b", b"x" * 1000).serialize()
    with pytest.raises(EnvelopeError, match="exceeds"):
        Envelope.parse(data, max_size=999)


@pytest.mark.parametrize("bad", ["", "A", "-a", "a-", "a" * 65, "a/b", "é"])
def test_bad_device_ids(bad: str) -> None:
    with pytest.raises(EnvelopeError):
        check_device_id(bad)
    with pytest.raises(EnvelopeError):
        Envelope(EnvelopeKind.PAIRWISE, bytes(16), bad, "b", b"")


def test_bad_id_length() -> None:
    with pytest.raises(EnvelopeError):
        Envelope(EnvelopeKind.PAIRWISE, bytes(15), "a", "b", b"")


@given(st.binary(max_size=200))
def test_fuzz_only_protocol_errors(data: bytes) -> None:
    try:
        Envelope.parse(data)
    except ProtocolError:
        pass
