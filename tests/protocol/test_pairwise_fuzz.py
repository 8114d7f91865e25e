"""Fuzzing: every pairwise decoder, `accept` and `decrypt` raise only `PairwiseError` on any input.

Random bytes and mutations of valid encodings (byte flips, truncation, extension). Default runs are short;
set AGW_FUZZ_EXAMPLES=20000 for a long run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocol.errors import ProtocolError
from gateway.protocol.pairwise import (
    PairwiseError,
    PairwiseMessage,
    PairwiseSession,
    PrekeyBundle,
    PrekeyStore,
)
from gateway.protocol.pairwise.testing import ToyAuthority, ToyDevice

EXAMPLES = int(os.environ.get("AGW_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

AUTHORITY = ToyAuthority()
ALICE = ToyDevice.make(AUTHORITY, "dev-alice")
BOB = ToyDevice.make(AUTHORITY, "dev-bob")
BUNDLE = BOB.prekeys.bundle(device_id=BOB.device_id, credential=BOB.credential, signer=BOB.signer)
INITIATOR = PairwiseSession.initiate(local_device_id=ALICE.device_id, credential=ALICE.credential,
                                     signer=ALICE.signer, bundle=BUNDLE, verify_credential=AUTHORITY.verify_credential)
SETUP_WIRE = INITIATOR.encrypt(b"setup message")
RESPONDER, _ = PairwiseSession.accept(SETUP_WIRE, local_device_id=BOB.device_id, signer=BOB.signer,
                                      prekeys=PrekeyStore.decode(BOB.prekeys.encode()),
                                      verify_credential=AUTHORITY.verify_credential)
INITIATOR.decrypt(RESPONDER.encrypt(b"reply"))
RATCHET_WIRE = INITIATOR.encrypt(b"ratchet message" * 3)
SAMPLES = {
    "bundle": BUNDLE.encode(),
    "store": BOB.prekeys.encode(),
    "session": RESPONDER.encode(),
    "setup": SETUP_WIRE,
    "ratchet": RATCHET_WIRE,
}


@st.composite
def mutated(draw: st.DrawFn, sample: bytes) -> bytes:
    data = bytearray(sample)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "delete"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "extend":
            data += draw(st.binary(max_size=64))
        elif op == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


def inputs(kind: str) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), mutated(SAMPLES[kind]))


def only_pairwise_errors(fn: Callable[[], object]) -> None:
    try:
        fn()
    except PairwiseError:
        pass


def fresh_responder() -> PairwiseSession:
    return PairwiseSession.decode(SAMPLES["session"], signer=BOB.signer)


def test_pairwise_errors_are_protocol_errors() -> None:
    assert issubclass(PairwiseError, ProtocolError)


@FUZZ
@given(inputs("bundle"))
def test_bundle_decode_and_verify(data: bytes) -> None:
    def run() -> None:
        PrekeyBundle.decode(data).verify(AUTHORITY.verify_credential)

    only_pairwise_errors(run)


@FUZZ
@given(inputs("store"))
def test_store_decode(data: bytes) -> None:
    only_pairwise_errors(lambda: PrekeyStore.decode(data).encode())


@FUZZ
@given(inputs("session"))
def test_session_decode(data: bytes) -> None:
    def run() -> None:
        s = PairwiseSession.decode(data, signer=BOB.signer)
        s.decrypt(RATCHET_WIRE)

    only_pairwise_errors(run)


@FUZZ
@given(st.one_of(inputs("ratchet"), inputs("setup")))
def test_message_parse_and_decrypt(data: bytes) -> None:
    only_pairwise_errors(lambda: PairwiseMessage.parse(data))
    only_pairwise_errors(lambda: fresh_responder().decrypt(data))


@FUZZ
@given(inputs("setup"))
def test_accept(data: bytes) -> None:
    def run() -> None:
        PairwiseSession.accept(data, local_device_id=BOB.device_id, signer=BOB.signer,
                               prekeys=PrekeyStore.decode(SAMPLES["store"]),
                               verify_credential=AUTHORITY.verify_credential)

    only_pairwise_errors(run)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_samples_are_valid(kind: str) -> None:
    """The mutation seeds themselves decode, so the fuzzers start from meaningful input."""
    decoders: dict[str, Callable[[bytes], object]] = {
        "bundle": PrekeyBundle.decode,
        "store": PrekeyStore.decode,
        "session": lambda b: PairwiseSession.decode(b, signer=BOB.signer),
        "setup": PairwiseMessage.parse,
        "ratchet": lambda b: fresh_responder().decrypt(b),
    }
    decoders[kind](SAMPLES[kind])


def resign(data: bytes) -> bytes:
    """A mutated message signed again by Alice: what a malicious but authenticated peer can send."""
    from gateway.protocol.pairwise.wire import SIGNATURE_CONTEXT

    body = data[:-64] if len(data) > 64 else data
    return body + ALICE.signer.sign(SIGNATURE_CONTEXT + body)


@FUZZ
@given(st.one_of(mutated(SAMPLES["ratchet"]), mutated(SAMPLES["setup"])))
def test_authenticated_peer_sending_garbage(data: bytes) -> None:
    """Past the signature check: headers, counters, setup fields and ciphertexts chosen by the peer."""
    wire = resign(data)
    responder = fresh_responder()
    before = responder.encode()
    try:
        responder.decrypt(wire)
    except PairwiseError:
        assert responder.encode() == before  # a failed message never changes the session

    def run() -> None:
        PairwiseSession.accept(wire, local_device_id=BOB.device_id, signer=BOB.signer,
                               prekeys=PrekeyStore.decode(SAMPLES["store"]),
                               verify_credential=AUTHORITY.verify_credential)

    only_pairwise_errors(run)


@FUZZ
@given(inputs("ratchet"))
def test_fast_ratchet_parser_equals_general_parser(data: bytes) -> None:
    """The fixed-offset parser for RATCHET messages accepts and refuses exactly what the general one does."""
    if data[:2] != b"\x01\x02":
        data = b"\x01\x02" + data[2:]
    results: list[PairwiseMessage | None] = []
    for parse in (PairwiseMessage._parse_ratchet, PairwiseMessage._parse_general):
        try:
            results.append(parse(data))
        except PairwiseError:
            results.append(None)
    assert results[0] == results[1]
