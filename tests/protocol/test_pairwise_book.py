"""SessionBook: routing between several sessions per peer (setup, simultaneous opens, key rotation, bounds)."""

from __future__ import annotations

import pytest

from gateway.protocol.errors import ProtocolError
from gateway.protocol.pairwise import (
    Ed25519Signer,
    NoSessionError,
    PairwiseSession,
    PrekeyBundle,
    SessionBook,
    SessionState,
    UnexpectedMessageError,
    UnknownSessionError,
)
from gateway.protocol.pairwise.testing import ToyAuthority, ToyDevice


class Side:
    def __init__(self, authority: ToyAuthority, device_id: str) -> None:
        self.authority = authority
        self.device = ToyDevice.make(authority, device_id, one_time=10)
        self.book = SessionBook(
            local_device_id=device_id, credential=self.device.credential, signer=self.device.signer,
            prekeys=self.device.prekeys, verify_credential=authority.verify_credential, max_sessions_per_peer=3,
        )

    @property
    def id(self) -> str:
        return self.device.device_id

    def bundle(self) -> PrekeyBundle:
        return self.book.prekeys.bundle(device_id=self.id, credential=self.book.credential, signer=self.book.signer)


@pytest.fixture
def sides() -> tuple[Side, Side]:
    authority = ToyAuthority()
    return Side(authority, "dev-a"), Side(authority, "dev-b")


def send(frm: Side, to: Side, text: bytes, now_ms: int = 0) -> bytes:
    sent = frm.book.encrypt(to.id, text)
    return to.book.decrypt(sent.wire, sender_device_id=frm.id, now_ms=now_ms).plaintext


def test_open_send_accept_reply(sides: tuple[Side, Side]) -> None:
    a, b = sides
    with pytest.raises(NoSessionError):
        a.book.encrypt(b.id, b"x")
    session, dropped = a.book.open(b.bundle(), now_ms=10)
    assert dropped == () and session.state is SessionState.PENDING
    wire = a.book.encrypt(b.id, b"hello").wire
    received = b.book.decrypt(wire, sender_device_id=a.id, now_ms=11)
    assert received.plaintext == b"hello" and received.new_session
    assert received.session.state is SessionState.ESTABLISHED
    assert received.session.session_id == session.session_id
    assert send(b, a, b"hi") == b"hi"
    assert send(a, b, b"again") == b"again"
    assert len(a.book) == len(b.book) == 1


def test_simultaneous_open_works_both_ways(sides: tuple[Side, Side]) -> None:
    a, b = sides
    a.book.open(b.bundle(), now_ms=1)
    b.book.open(a.bundle(), now_ms=1)
    wa = a.book.encrypt(b.id, b"from a").wire
    wb = b.book.encrypt(a.id, b"from b").wire
    assert b.book.decrypt(wa, sender_device_id=a.id, now_ms=2).plaintext == b"from a"
    assert a.book.decrypt(wb, sender_device_id=b.id, now_ms=2).plaintext == b"from b"
    assert len(a.book.sessions_with(b.id)) == 2
    for i in range(4):
        assert send(a, b, b"a%d" % i, now_ms=3 + i) == b"a%d" % i
        assert send(b, a, b"b%d" % i, now_ms=3 + i) == b"b%d" % i


def test_key_rotation_opens_new_sessions_old_ones_still_decrypt(sides: tuple[Side, Side]) -> None:
    a, b = sides
    a.book.open(b.bundle(), now_ms=1)
    assert send(a, b, b"x") == b"x" and send(b, a, b"y") == b"y"
    in_flight = b.book.encrypt(a.id, b"sent under the old session").wire
    old_session = a.book.sending_session(b.id)
    assert old_session is not None
    states = [old_session.state]
    new_signer = Ed25519Signer.generate()
    a.book.rotate_signer(new_signer, a.authority.issue(a.id, new_signer.verify_key))
    states.append(old_session.state)
    assert states == [SessionState.ESTABLISHED, SessionState.RECEIVE_ONLY]
    with pytest.raises(NoSessionError):
        a.book.encrypt(b.id, b"z")
    assert a.book.decrypt(in_flight, sender_device_id=b.id, now_ms=5).plaintext == b"sent under the old session"
    a.book.open(b.bundle(), now_ms=10)
    assert send(a, b, b"after rotation", now_ms=11) == b"after rotation"
    newest = b.book.sending_session(a.id)
    assert newest is not None and newest.peer_verifier.raw == new_signer.verify_key
    assert send(b, a, b"reply on the new session") == b"reply on the new session"


def test_sessions_per_peer_are_bounded(sides: tuple[Side, Side]) -> None:
    a, b = sides
    ids = [a.book.open(b.bundle(), now_ms=t)[0].session_id for t in range(3)]
    fourth, dropped = a.book.open(b.bundle(), now_ms=3)
    assert dropped == (ids[0],)
    assert [s.session_id for s in a.book.sessions_with(b.id)] == [*ids[1:], fourth.session_id]
    assert a.book.get(ids[0]) is None


def test_restored_sessions_keep_their_order(sides: tuple[Side, Side]) -> None:
    a, b = sides
    old, _ = a.book.open(b.bundle(), now_ms=5)
    new, _ = a.book.open(b.bundle(), now_ms=9)
    fresh = SessionBook(local_device_id=a.id, credential=a.book.credential, signer=a.book.signer,
                        prekeys=a.book.prekeys, verify_credential=a.authority.verify_credential)
    for s in (new, old):  # restored in any order
        fresh.add(PairwiseSession.decode(s.encode(), signer=a.book.signer))
    chosen = fresh.sending_session(b.id)
    assert chosen is not None and chosen.session_id == new.session_id


def test_unknown_session_and_wrong_sender(sides: tuple[Side, Side]) -> None:
    a, b = sides
    a.book.open(b.bundle(), now_ms=1)
    setup_wire = a.book.encrypt(b.id, b"x").wire
    with pytest.raises(UnexpectedMessageError):
        b.book.decrypt(setup_wire, sender_device_id="dev-c", now_ms=1)
    b.book.decrypt(setup_wire, sender_device_id=a.id, now_ms=1)
    send(b, a, b"y")
    ratchet_wire = a.book.encrypt(b.id, b"z").wire
    amnesiac = Side(a.authority, "dev-b")
    with pytest.raises(UnknownSessionError) as info:
        amnesiac.book.decrypt(ratchet_wire, sender_device_id=a.id, now_ms=2)
    assert isinstance(info.value, ProtocolError)
