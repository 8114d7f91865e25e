"""Pairwise sessions end to end: setup from prekeys, Double Ratchet, signatures, replay and out-of-order
handling, forward secrecy, post-compromise security and persistence."""

from __future__ import annotations

import random as pyrandom

import pytest

from gateway.protocol.pairwise import (
    CredentialError,
    Ed25519Signer,
    MessageType,
    PairwiseMessage,
    PairwiseReplayError,
    PairwiseSession,
    PairwiseUsageError,
    PairwiseVerificationError,
    PrekeyError,
    RatchetLimits,
    TooManySkippedError,
    UnexpectedMessageError,
)
from gateway.protocol.pairwise import crypto as crypto_module
from gateway.protocol.pairwise import session as session_module
from gateway.protocol.pairwise.crypto import SIGNATURE_LEN, aead_encrypt
from gateway.protocol.pairwise.testing import ToyAuthority, ToyDevice
from gateway.protocol.pairwise.wire import SIGNATURE_CONTEXT, RatchetHeader, encode_prefix


@pytest.fixture
def authority() -> ToyAuthority:
    return ToyAuthority()


@pytest.fixture
def alice(authority: ToyAuthority) -> ToyDevice:
    return ToyDevice.make(authority, "dev-alice")


@pytest.fixture
def bob(authority: ToyAuthority) -> ToyDevice:
    return ToyDevice.make(authority, "dev-bob")


def initiate(a: ToyDevice, b: ToyDevice, authority: ToyAuthority, **kw: object) -> PairwiseSession:
    bundle = b.prekeys.bundle(device_id=b.device_id, credential=b.credential, signer=b.signer)
    return PairwiseSession.initiate(
        local_device_id=a.device_id, credential=a.credential, signer=a.signer, bundle=bundle,
        verify_credential=authority.verify_credential, **kw,  # type: ignore[arg-type]
    )


def accept(b: ToyDevice, wire: bytes, authority: ToyAuthority, **kw: object) -> tuple[PairwiseSession, bytes]:
    return PairwiseSession.accept(
        wire, local_device_id=b.device_id, signer=b.signer, prekeys=b.prekeys,
        verify_credential=authority.verify_credential, **kw,  # type: ignore[arg-type]
    )


def pair(
    alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority, **kw: object
) -> tuple[PairwiseSession, PairwiseSession]:
    """An established pair: one message each way."""
    a = initiate(alice, bob, authority, **kw)
    b, pt = accept(bob, a.encrypt(b"hello"), authority, **kw)
    assert pt == b"hello"
    assert a.decrypt(b.encrypt(b"hi")) == b"hi"
    return a, b


def test_round_trip_both_ways(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a, b = pair(alice, bob, authority)
    assert a.session_id == b.session_id
    assert (a.peer_device_id, b.peer_device_id) == ("dev-bob", "dev-alice")
    for i in range(20):
        sender, receiver = (a, b) if i % 3 else (b, a)
        msg = f"message {i}".encode() * (i + 1)
        assert receiver.decrypt(sender.encrypt(msg)) == msg


def test_initiator_repeats_setup_until_answered(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a = initiate(alice, bob, authority)
    wires = [a.encrypt(b"m%d" % i) for i in range(3)]
    assert all(PairwiseMessage.parse(w).type == MessageType.PREKEY for w in wires)
    assert not a.established
    b, pt = accept(bob, wires[1], authority)  # the first one to arrive need not be the first sent
    assert pt == b"m1"
    assert b.decrypt(wires[2]) == b"m2"
    assert b.decrypt(wires[0]) == b"m0"
    a.decrypt(b.encrypt(b"ack"))
    assert a.established
    assert PairwiseMessage.parse(a.encrypt(b"x")).type == MessageType.RATCHET


def test_out_of_order_across_chains(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a, b = pair(alice, bob, authority)
    first_chain = [a.encrypt(b"a%d" % i) for i in range(5)]
    assert b.decrypt(first_chain[4]) == b"a4"
    assert a.decrypt(b.encrypt(b"turn")) == b"turn"
    second_chain = [a.encrypt(b"b%d" % i) for i in range(4)]
    order = [second_chain[2], first_chain[1], second_chain[0], first_chain[3], first_chain[0], second_chain[3],
             first_chain[2], second_chain[1]]
    got = sorted(b.decrypt(w) for w in order)
    assert got == sorted([b"a0", b"a1", b"a2", b"a3", b"b0", b"b1", b"b2", b"b3"])
    assert b.ratchet.skipped_count == 0


def test_replay_is_rejected_and_session_unchanged(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a, b = pair(alice, bob, authority)
    w1, w2 = a.encrypt(b"one"), a.encrypt(b"two")
    assert b.decrypt(w2) == b"two"  # w1's key is now a skipped key
    assert b.decrypt(w1) == b"one"
    for w in (w1, w2):
        with pytest.raises(PairwiseReplayError):
            b.decrypt(w)
    assert b.decrypt(a.encrypt(b"three")) == b"three"


def test_replay_into_closed_chain_is_a_replay(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a, b = pair(alice, bob, authority)
    old = a.encrypt(b"old")
    assert b.decrypt(old) == b"old"
    a.decrypt(b.encrypt(b"r1"))
    b.decrypt(a.encrypt(b"new chain"))
    with pytest.raises(PairwiseReplayError):
        b.decrypt(old)


def test_skip_limit_per_chain(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a, b = pair(alice, bob, authority, limits=RatchetLimits(max_skip=10, max_skipped_total=20))
    wires = [a.encrypt(b"%d" % i) for i in range(13)]
    before = b.encode()
    with pytest.raises(TooManySkippedError):
        b.decrypt(wires[11])  # would skip 11 keys
    assert b.encode() == before
    assert b.decrypt(wires[10]) == b"10"  # skips exactly 10: allowed
    assert b.ratchet.skipped_count == 10
    assert b.decrypt(wires[3]) == b"3"


def test_skipped_total_evicts_oldest(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a, b = pair(alice, bob, authority, limits=RatchetLimits(max_skip=5, max_skipped_total=6))
    wires = [a.encrypt(b"%d" % i) for i in range(12)]
    b.decrypt(wires[5])  # skips 0..4
    b.decrypt(wires[11])  # skips 6..10, total 10 > 6: 0..3 evicted
    assert b.ratchet.skipped_count == 6
    with pytest.raises(PairwiseReplayError):
        b.decrypt(wires[0])
    assert b.decrypt(wires[4]) == b"4"
    assert b.decrypt(wires[6]) == b"6"


def test_signature_checked_before_decryption(
    alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair(alice, bob, authority)
    wire = a.encrypt(b"secret")
    calls: list[int] = []
    real = crypto_module.aead_decrypt

    def spy(*args: bytes) -> bytes:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(session_module, "aead_decrypt", spy)
    forged = wire[:-SIGNATURE_LEN] + bytes(SIGNATURE_LEN)
    with pytest.raises(PairwiseVerificationError):
        b.decrypt(forged)
    assert calls == []
    assert b.decrypt(wire) == b"secret"
    assert calls == [1]


@pytest.mark.parametrize("where", ["header", "ciphertext", "signature"])
def test_any_bit_flip_is_rejected(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority, where: str) -> None:
    a, b = pair(alice, bob, authority)
    wire = bytearray(a.encrypt(b"payload bytes"))
    index = {"header": 20, "ciphertext": len(wire) - SIGNATURE_LEN - 3, "signature": len(wire) - 1}[where]
    wire[index] ^= 0x01
    before = b.encode()
    with pytest.raises(PairwiseVerificationError):
        b.decrypt(bytes(wire))
    assert b.encode() == before


def test_validly_signed_garbage_leaves_state_unchanged(
    alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority
) -> None:
    """A peer (or a stolen signing key) without the ratchet keys cannot move the session."""
    a, b = pair(alice, bob, authority)
    header = RatchetHeader(bytes(range(1, 33)), 0, 0, bytes(24))
    aad = encode_prefix(b.session_id, None, header)
    body = aad + aead_encrypt(bytes(32), header.nonce, b"junk", aad)
    forged = body + alice.signer.sign(SIGNATURE_CONTEXT + body)
    before = b.encode()
    with pytest.raises(PairwiseVerificationError):
        b.decrypt(forged)
    assert b.encode() == before
    assert b.decrypt(a.encrypt(b"still fine")) == b"still fine"


def test_forward_secrecy_used_keys_are_gone(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a, b = pair(alice, bob, authority)
    wires = [a.encrypt(b"%d" % i) for i in range(3)]

    def key_of(wire: bytes) -> bytes:
        """The message key, computed on a throwaway copy of Bob's state."""
        probe = PairwiseSession.decode(b.encode(), signer=bob.signer)
        h = PairwiseMessage.parse(wire).header
        return probe.ratchet.prepare_receive(h.dh_public, h.previous_chain_length, h.message_number).message_key

    mk2 = key_of(wires[2])
    assert b.decrypt(wires[2]) == b"2"
    assert not b.ratchet.holds_message_key(mk2)
    assert mk2 not in b.encode()
    mk0 = key_of(wires[0])
    assert b.ratchet.holds_message_key(mk0)  # skipped, so held until used
    assert mk0 in b.encode()
    assert b.decrypt(wires[0]) == b"0"
    assert not b.ratchet.holds_message_key(mk0)
    assert mk0 not in b.encode()
    with pytest.raises(PairwiseReplayError):
        b.decrypt(wires[0])
    with pytest.raises(PairwiseReplayError):
        PairwiseSession.decode(b.encode(), signer=bob.signer).decrypt(wires[2])


def test_post_compromise_security(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a, b = pair(alice, bob, authority)
    stolen = b.encode()  # the attacker copies Bob's whole state (and has his signing key)
    before_heal = a.encrypt(b"sent before healing")
    assert PairwiseSession.decode(stolen, signer=bob.signer).decrypt(before_heal) == b"sent before healing"
    assert b.decrypt(before_heal) == b"sent before healing"
    assert a.decrypt(b.encrypt(b"round")) == b"round"  # a DH ratchet step each way
    after_heal = a.encrypt(b"sent after healing")
    assert b.decrypt(after_heal) == b"sent after healing"
    with pytest.raises(PairwiseVerificationError):
        PairwiseSession.decode(stolen, signer=bob.signer).decrypt(after_heal)


def test_persistence_continues_exactly(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a, b = pair(alice, bob, authority)
    pending = [a.encrypt(b"p%d" % i) for i in range(4)]
    b.decrypt(pending[3])
    a2 = PairwiseSession.decode(a.encode(), signer=alice.signer)
    b2 = PairwiseSession.decode(b.encode(), signer=bob.signer)
    assert a2.encode() == a.encode() and b2.encode() == b.encode()
    assert b2.decrypt(pending[1]) == b"p1"
    assert a2.decrypt(b2.encrypt(b"back")) == b"back"
    assert b2.decrypt(pending[0]) == b"p0"
    assert b2.decrypt(a2.encrypt(b"forth")) == b"forth"
    with pytest.raises(PairwiseReplayError):
        b2.decrypt(pending[3])


def test_persistence_of_unanswered_initiator(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a = initiate(alice, bob, authority)
    w0 = a.encrypt(b"zero")
    a2 = PairwiseSession.decode(a.encode(), signer=alice.signer)
    w1 = a2.encrypt(b"one")
    assert PairwiseMessage.parse(w1).type == MessageType.PREKEY
    b, _ = accept(bob, w1, authority)
    assert b.decrypt(w0) == b"zero"


def test_restore_after_key_rotation_decrypts_but_will_not_send(
    alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority
) -> None:
    a, b = pair(alice, bob, authority)
    in_flight = b.encrypt(b"sent before the rotation")
    rotated = PairwiseSession.decode(a.encode(), signer=Ed25519Signer.generate())
    assert not rotated.can_encrypt
    assert rotated.decrypt(in_flight) == b"sent before the rotation"
    with pytest.raises(PairwiseUsageError, match="open a new session"):
        rotated.encrypt(b"x")
    assert PairwiseSession.decode(a.encode(), signer=alice.signer).can_encrypt


def test_one_time_prekey_consumed_exactly_once(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    bundle = bob.prekeys.bundle(device_id=bob.device_id, credential=bob.credential, signer=bob.signer)
    count = bob.prekeys.one_time_count
    a = PairwiseSession.initiate(local_device_id=alice.device_id, credential=alice.credential, signer=alice.signer,
                                 bundle=bundle, verify_credential=authority.verify_credential)
    first = a.encrypt(b"first")
    accept(bob, first, authority)
    assert bob.prekeys.one_time_count == count - 1
    with pytest.raises(PrekeyError):
        accept(bob, first, authority)  # replayed setup: the one-time prekey is gone
    again = PairwiseSession.initiate(local_device_id=alice.device_id, credential=alice.credential,
                                     signer=alice.signer, bundle=bundle,
                                     verify_credential=authority.verify_credential)
    with pytest.raises(PrekeyError):
        accept(bob, again.encrypt(b"reuse"), authority)  # a directory handing the same key out twice


def test_failed_accept_does_not_consume(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a = initiate(alice, bob, authority)
    wire = a.encrypt(b"x")
    msg = PairwiseMessage.parse(wire)
    body = msg.aad + bytes(len(msg.ciphertext))  # well signed, wrong ciphertext
    forged = body + alice.signer.sign(SIGNATURE_CONTEXT + body)
    count = bob.prekeys.one_time_count
    with pytest.raises(PairwiseVerificationError):
        accept(bob, forged, authority)
    assert bob.prekeys.one_time_count == count
    assert accept(bob, wire, authority)[1] == b"x"


def test_setup_without_one_time_prekey(authority: ToyAuthority) -> None:
    alice = ToyDevice.make(authority, "a", one_time=0)
    bob = ToyDevice.make(authority, "b", one_time=0)
    a = initiate(alice, bob, authority)
    b, pt = accept(bob, a.encrypt(b"no opk"), authority)
    assert pt == b"no opk"
    setup = PairwiseMessage.parse(a.encrypt(b"z")).setup
    assert setup is not None and setup.one_time_prekey_id is None
    assert a.decrypt(b.encrypt(b"reply")) == b"reply"


def test_setup_survives_signed_prekey_rotation(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a = initiate(alice, bob, authority)
    bob.prekeys.rotate_signed_prekey(now_ms=1000)
    assert accept(bob, a.encrypt(b"in flight"), authority)[1] == b"in flight"
    for _ in range(5):
        bob.prekeys.rotate_signed_prekey(now_ms=2000)
    c = initiate(alice, bob, authority)  # fresh bundle after rotations: fine
    assert accept(bob, c.encrypt(b"fresh"), authority)[1] == b"fresh"


def test_rotated_out_signed_prekey_is_refused(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a = initiate(alice, bob, authority)
    bob.prekeys.rotate_signed_prekey(now_ms=1000)
    bob.prekeys.prune_retired(now_ms=10_000, max_retired_age_ms=5000)
    with pytest.raises(PrekeyError):
        accept(bob, a.encrypt(b"too late"), authority)


def test_revoked_credentials_are_refused(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    authority.revoked.add("dev-bob")
    with pytest.raises(CredentialError):
        initiate(alice, bob, authority)
    authority.revoked.clear()
    a = initiate(alice, bob, authority)
    authority.revoked.add("dev-alice")
    with pytest.raises(CredentialError):
        accept(bob, a.encrypt(b"x"), authority)


def test_setup_for_another_device_is_refused(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    carol = ToyDevice.make(authority, "dev-carol")
    a = initiate(alice, bob, authority)
    with pytest.raises(UnexpectedMessageError):
        accept(carol, a.encrypt(b"x"), authority)


def test_stale_bundle_is_named(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a = initiate(alice, bob, authority)
    bob.signer = Ed25519Signer.generate()  # Bob's delegated key rotated after publishing
    with pytest.raises(UnexpectedMessageError, match="stale bundle"):
        accept(bob, a.encrypt(b"x"), authority)


def test_message_from_other_session_is_refused(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a, b = pair(alice, bob, authority)
    a2, _ = pair(alice, bob, authority)
    with pytest.raises(UnexpectedMessageError):
        b.decrypt(a2.encrypt(b"x"))
    with pytest.raises(UnexpectedMessageError):  # an initiator never receives setup messages
        a.decrypt(initiate(bob, alice, authority).encrypt(b"y"))


def test_signer_change_is_a_usage_error(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    class Rotating(Ed25519Signer):
        pass

    signer = Rotating.generate()
    alice.signer = signer
    alice.credential = authority.issue(alice.device_id, signer.verify_key)
    a = initiate(alice, bob, authority)
    signer._verify_key = bytes(32)  # simulate a key swap behind the session's back
    with pytest.raises(PairwiseUsageError):
        a.encrypt(b"x")


def test_injected_randomness_makes_sessions_reproducible(authority: ToyAuthority) -> None:
    def run(seed: int) -> bytes:
        rand = pyrandom.Random(seed).randbytes
        alice = ToyDevice.make(authority, "a", random=rand)
        bob = ToyDevice.make(authority, "b", random=rand)
        a = initiate(alice, bob, authority, random=rand)
        return a.encrypt(b"same")

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_envelope_sender_must_match(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    a = initiate(alice, bob, authority)
    wire = a.encrypt(b"x")
    calls: list[str] = []

    def counting(device_id: str, credential: bytes) -> bytes:
        calls.append(device_id)
        return authority.verify_credential(device_id, credential)

    with pytest.raises(UnexpectedMessageError, match="came from 'dev-mallory'"):
        PairwiseSession.accept(wire, local_device_id=bob.device_id, signer=bob.signer, prekeys=bob.prekeys,
                               verify_credential=counting, sender_device_id="dev-mallory")
    assert calls == []  # refused before the credential check is paid for
    b, _ = PairwiseSession.accept(wire, local_device_id=bob.device_id, signer=bob.signer, prekeys=bob.prekeys,
                                  verify_credential=counting, sender_device_id="dev-alice", now_ms=1234)
    assert b.opened_at_ms == 1234
    assert PairwiseSession.decode(b.encode(), signer=bob.signer).opened_at_ms == 1234
    reply = b.encrypt(b"r")
    with pytest.raises(UnexpectedMessageError):
        a.decrypt(reply, sender_device_id="dev-carol")
    assert a.decrypt(reply, sender_device_id="dev-bob") == b"r"


def test_counter_at_the_limit_is_refused(alice: ToyDevice, bob: ToyDevice, authority: ToyAuthority) -> None:
    """A peer cannot push the receive counter past what the state format can hold."""
    a, b = pair(alice, bob, authority)
    msg = PairwiseMessage.parse(a.encrypt(b"x"))
    header = RatchetHeader(msg.header.dh_public, msg.header.previous_chain_length, 0xFFFFFFFF, msg.header.nonce)
    aad = encode_prefix(b.session_id, None, header)
    body = aad + msg.ciphertext
    before = b.encode()
    with pytest.raises(UnexpectedMessageError):
        b.decrypt(body + alice.signer.sign(SIGNATURE_CONTEXT + body))
    assert b.encode() == before
