"""Link frame codec: every frame round-trips, limits hold, and a fuzzer finds only our declared errors."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.errors import ProtocolError
from gateway.protocol.link import (
    Auth,
    AuthFail,
    AuthFailCode,
    AuthOk,
    Challenge,
    Deliver,
    DirectoryKind,
    Envelopes,
    Error,
    ErrorCode,
    Frame,
    FrameError,
    LinkLimits,
    Ping,
    Prekeys,
    PrekeysFetch,
    PrekeysPublish,
    PrekeysStored,
    Refresh,
    Undeliverable,
    UndeliverableReason,
    batch_envelopes,
    decode_frame,
    encode_frame,
)

FUZZ_EXAMPLES = int(os.environ.get("AGW_FUZZ_EXAMPLES", "300"))
LIMITS = LinkLimits()
device_ids = st.from_regex(r"[a-z0-9](?:[a-z0-9._-]{0,6}[a-z0-9])?", fullmatch=True)
texts = st.text(max_size=40)
u32 = st.integers(0, 2**32 - 1)
envelopes = st.builds(
    Envelope,
    st.sampled_from(EnvelopeKind),
    st.binary(min_size=16, max_size=16),
    device_ids,
    device_ids,
    st.binary(max_size=64),
)
frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Challenge, st.binary(min_size=32, max_size=32), texts),
    st.builds(Auth, texts),
    st.builds(AuthOk, device_ids, st.integers(0, 2**64 - 1), st.integers(0, 65535)),
    st.builds(AuthFail, st.sampled_from(AuthFailCode), texts),
    st.just(Refresh()),
    st.just(Ping()),
    st.builds(Envelopes, st.lists(envelopes, min_size=1, max_size=4).map(tuple)),
    st.builds(Deliver, st.lists(envelopes, min_size=1, max_size=4).map(tuple)),
    st.builds(
        Undeliverable,
        st.sampled_from(UndeliverableReason),
        st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=5).map(tuple),
    ),
    st.builds(
        PrekeysPublish,
        u32,
        st.sampled_from(DirectoryKind),
        st.binary(max_size=64),
        st.lists(st.binary(max_size=32), max_size=5).map(tuple),
    ),
    st.builds(PrekeysStored, u32, st.integers(0, 65535)),
    st.builds(PrekeysFetch, u32, st.sampled_from(DirectoryKind), device_ids),
    st.builds(
        Prekeys,
        u32,
        st.sampled_from(DirectoryKind),
        device_ids,
        st.none() | st.binary(max_size=64),
        st.none() | st.binary(max_size=32),
    ),
    st.builds(Error, st.sampled_from(ErrorCode), texts),
)


@given(frames)
def test_round_trip(frame: Frame) -> None:
    assert decode_frame(encode_frame(frame), LIMITS) == frame


def test_challenge_layout() -> None:
    data = encode_frame(Challenge(b"\x07" * 32, "wss://relay"))
    assert data == b"\x01\x01" + b"\x07" * 32 + b"\x00\x0bwss://relay"


def test_undeliverable_layout() -> None:
    data = encode_frame(Undeliverable(UndeliverableReason.OFFLINE, (b"\xaa" * 16,)))
    assert data == b"\x01\x12\x01\x00\x01" + b"\xaa" * 16


@given(st.lists(envelopes, min_size=1, max_size=4).map(tuple))
def test_envelopes_and_deliver_layout(batch: tuple[Envelope, ...]) -> None:
    """Version, type, count, then each envelope as a 4-byte length and its own serialisation (written out here,
    so that encoding the batch without the intermediate copies keeps the bytes)."""
    body = len(batch).to_bytes(2, "big") + b"".join(len(e.serialize()).to_bytes(4, "big") + e.serialize()
                                                    for e in batch)
    assert encode_frame(Envelopes(batch)) == b"\x01\x10" + body
    assert encode_frame(Deliver(batch)) == b"\x01\x11" + body
    for env in batch:
        assert env.serialize() == env.header() + env.ciphertext


def test_large_deliver_is_encoded_with_one_copy_of_its_ciphertext() -> None:
    """The relay re-encodes every routed byte into DELIVER frames (and a gateway its batches into ENVELOPES): the
    encoder's peak allocation stays near one frame, not the 2x of serialise / prefix / join / header in turn."""
    import tracemalloc

    size = 4 << 20
    batch = (Envelope(EnvelopeKind.PAIRWISE_BATCH, b"\x01" * 16, "a", "b", os.urandom(size)),
             Envelope(EnvelopeKind.PAIRWISE_BATCH, b"\x02" * 16, "a", "b", os.urandom(size)))
    for frame in (Deliver(batch), Envelopes(batch)):
        tracemalloc.start()
        try:
            data = encode_frame(frame)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(data) > 2 * size
        assert peak < 1.25 * len(data), f"peak {peak} for a frame of {len(data)} bytes"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "shorter"),
        (b"\x02\x01", "version"),
        (b"\x01\x55", "unknown frame type"),
        (b"\x01\x05\x00", "trailing"),
        (b"\x01\x01" + b"\x00" * 10, "truncated"),
        (b"\x01\x02\xff\xff\xff\xff", "exceeds"),  # token length over the limit: rejected before reading
        (b"\x01\x10\x00\x00", "envelope count"),  # empty batch
        (b"\x01\x12\x07\x00\x01" + b"\x00" * 16, "reason"),
        (b"\x01\x23\x00\x00\x00\x01\x01\x01a\x04", "flags"),
        (b"\x01\x04\x00\x01\x00\x01\xff", "UTF-8"),
    ],
)
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        decode_frame(data, LIMITS)


def test_frame_size_limit() -> None:
    data = encode_frame(Auth("x" * 100))
    with pytest.raises(FrameError, match="exceeds"):
        decode_frame(data, LinkLimits(max_frame_size=50))


def test_one_time_count_limit() -> None:
    data = encode_frame(PrekeysPublish(1, DirectoryKind.PREKEYS, b"", tuple(b"k" for _ in range(5))))
    with pytest.raises(FrameError, match="one-time"):
        decode_frame(data, LinkLimits(max_one_time=4))


def test_batching_respects_limits() -> None:
    envs = [Envelope(EnvelopeKind.PAIRWISE, os.urandom(16), "a", "b", b"x" * 100) for _ in range(50)]
    limits = LinkLimits(max_frame_size=1000, max_envelopes_per_frame=7)
    batches = batch_envelopes(envs, limits)
    assert [e for b in batches for e in b] == envs
    for b in batches:
        assert len(b) <= 7
        assert len(encode_frame(Envelopes(tuple(b)))) <= 1000
    assert len(batches) == 8  # 130 bytes each would allow 7 per 1000-byte frame; count caps at 7: ceil(50/7)
    by_size = batch_envelopes(envs, LinkLimits(max_frame_size=500))
    assert len(by_size) == 17  # (500 - 4) // 130 = 3 per frame: ceil(50/3)


@settings(max_examples=FUZZ_EXAMPLES)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        decode_frame(data, LIMITS)
    except ProtocolError:
        pass


@settings(max_examples=FUZZ_EXAMPLES)
@given(frames, st.data())
def test_fuzz_mutated_frames(frame: Frame, data: st.DataObject) -> None:
    """Valid frames with bytes flipped, cut or inserted: decoding succeeds or raises a ProtocolError only."""
    raw = bytearray(encode_frame(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    try:
        decode_frame(bytes(raw), LIMITS)
    except ProtocolError:
        pass


def test_large_deliver_is_decoded_with_one_copy_of_its_ciphertext() -> None:
    """Decoding copies each ciphertext out of the frame once (the envelopes' own bytes), not twice (the envelope's
    length-prefixed field, then its ciphertext): the peak allocation is about the envelopes decoded."""
    import tracemalloc

    size = 4 << 20
    batch = (Envelope(EnvelopeKind.PAIRWISE_BATCH, b"\x01" * 16, "a", "b", os.urandom(size)),
             Envelope(EnvelopeKind.PAIRWISE_BATCH, b"\x02" * 16, "a", "b", os.urandom(size)))
    limits = LinkLimits(max_frame_size=16 << 20)
    for frame in (Deliver(batch), Envelopes(batch)):
        data = encode_frame(frame)
        tracemalloc.start()
        try:
            decoded = decode_frame(data, limits)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert decoded == frame
        assert type(decoded.envelopes[0].ciphertext) is bytes  # type: ignore[union-attr]
        assert peak < 1.25 * 2 * size, f"peak {peak} for {2 * size} bytes of ciphertext"


def test_envelope_errors_unchanged_when_decoded_from_a_view() -> None:
    env = Envelope(EnvelopeKind.PAIRWISE_BATCH, b"\x01" * 16, "a", "b", b"xyz")
    good = encode_frame(Deliver((env,)))
    assert decode_frame(bytearray(good), LIMITS) == Deliver((env,))
    with pytest.raises(FrameError, match="bad envelope: ciphertext length 4 does not match the 3 bytes present"):
        decode_frame(good[:-7] + b"\x00\x00\x00\x04xyz", LIMITS)
    with pytest.raises(FrameError, match="frame truncated in envelope"):
        decode_frame(good[:-1], LIMITS)
    with pytest.raises(FrameError, match="envelope of 4294967295 bytes exceeds the limit"):
        decode_frame(good[:4] + b"\xff\xff\xff\xff" + good[8:], LIMITS)
