"""Randomised delivery schedules: both sides send at will; messages are delivered late, out of order,
duplicated or never. Every message delivered decrypts to what was sent, exactly once; duplicates are refused
as replays; sessions survive a save/restore at any point."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.pairwise import PairwiseReplayError, PairwiseSession, PrekeyStore
from gateway.protocol.pairwise.testing import ToyAuthority, ToyDevice

EXAMPLES = int(os.environ.get("AGW_FUZZ_EXAMPLES", "60"))

AUTHORITY = ToyAuthority()
ALICE = ToyDevice.make(AUTHORITY, "dev-a", one_time=200)
BOB = ToyDevice.make(AUTHORITY, "dev-b", one_time=200)

step = st.one_of(
    st.tuples(st.just("send"), st.sampled_from("ab"), st.integers(1, 4)),
    st.tuples(st.just("deliver"), st.sampled_from("ab"), st.integers(0, 10**6)),
    st.tuples(st.just("replay"), st.sampled_from("ab"), st.integers(0, 10**6)),
    st.tuples(st.just("drop"), st.sampled_from("ab"), st.integers(0, 10**6)),
    st.tuples(st.just("restore"), st.sampled_from("ab"), st.just(0)),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(step, max_size=60))
def test_random_schedules(steps: list[tuple[str, str, int]]) -> None:
    bundle = BOB.prekeys.bundle(device_id=BOB.device_id, credential=BOB.credential, signer=BOB.signer)
    bundle = bundle.with_one_time_prekeys(bundle.one_time_prekeys[:1])
    sessions: dict[str, PairwiseSession | None] = {
        "a": PairwiseSession.initiate(local_device_id=ALICE.device_id, credential=ALICE.credential,
                                      signer=ALICE.signer, bundle=bundle,
                                      verify_credential=AUTHORITY.verify_credential),
        "b": None,  # Bob's session appears when the first setup message reaches him
    }
    signers = {"a": ALICE.signer, "b": BOB.signer}
    in_flight: dict[str, list[tuple[bytes, bytes]]] = {"a": [], "b": []}  # sent by side -> (wire, plaintext)
    delivered: dict[str, list[tuple[bytes, bytes]]] = {"a": [], "b": []}
    counter = 0
    prekeys = PrekeyStore.decode(BOB.prekeys.encode())

    def deliver(side: str, wire: bytes) -> bytes:
        other = "b" if side == "a" else "a"
        receiver = sessions[other]
        if receiver is not None:
            return receiver.decrypt(wire)
        receiver, got = PairwiseSession.accept(
            wire, local_device_id=BOB.device_id, signer=BOB.signer, prekeys=prekeys,
            verify_credential=AUTHORITY.verify_credential,
        )
        sessions[other] = receiver
        return got

    for op, side, arg in steps:
        other = "b" if side == "a" else "a"
        session = sessions[side]
        if op == "send":
            if session is None or not session.ratchet.can_send:
                continue
            for _ in range(arg):
                counter += 1
                plaintext = b"%s-%d" % (side.encode(), counter)
                in_flight[side].append((session.encrypt(plaintext), plaintext))
        elif op == "drop" and in_flight[side]:
            in_flight[side].pop(arg % len(in_flight[side]))
        elif op == "deliver" and in_flight[side]:
            wire, plaintext = in_flight[side].pop(arg % len(in_flight[side]))
            assert deliver(side, wire) == plaintext
            delivered[side].append((wire, plaintext))
        elif op == "replay" and delivered[side]:
            wire, _ = delivered[side][arg % len(delivered[side])]
            receiver = sessions[other]
            assert receiver is not None
            before = receiver.encode()
            try:
                receiver.decrypt(wire)
            except PairwiseReplayError:
                pass
            else:
                raise AssertionError("a delivered message decrypted twice")
            assert receiver.encode() == before
        elif op == "restore" and session is not None:
            sessions[side] = PairwiseSession.decode(session.encode(), signer=signers[side])

    # Everything still in flight is deliverable (at most 240 messages: within the default windows).
    for side in "ab":
        for wire, plaintext in in_flight[side]:
            assert deliver(side, wire) == plaintext
