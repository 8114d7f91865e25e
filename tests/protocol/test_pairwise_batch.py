"""Pairwise v2 batches: one signature over N ratchet messages, verified before anything is decrypted; a bad
signature rejects the whole batch, a bad message inside a verified batch rejects only itself; replay and
reordering are the ratchet's business, as for single messages."""

from __future__ import annotations

import pytest

from gateway.protocol.errors import ProtocolError
from gateway.protocol.pairwise import (
    MessageSigner,
    PairwiseBatch,
    PairwiseDecodeError,
    PairwiseError,
    PairwiseReplayError,
    PairwiseSession,
    PairwiseUsageError,
    PairwiseVerificationError,
    UnexpectedMessageError,
)
from gateway.protocol.pairwise import batch as v2
from gateway.protocol.pairwise.crypto import SIGNATURE_LEN
from gateway.protocol.pairwise.testing import ToyAuthority, ToyDevice
from tests.protocol.test_pairwise_session import initiate, pair


@pytest.fixture
def authority() -> ToyAuthority:
    return ToyAuthority()


@pytest.fixture
def sessions(authority: ToyAuthority) -> tuple[PairwiseSession, PairwiseSession]:
    return pair(ToyDevice.make(authority, "dev-alice"), ToyDevice.make(authority, "dev-bob"), authority)


def _texts(n: int, tag: bytes = b"m") -> list[bytes]:
    return [tag + b"%d" % i * (i + 1) for i in range(n)]


def _resign(wire: bytes, device: ToyDevice, sender: str, recipient: str) -> bytes:
    """A batch body signed again by `device` (what a peer with a valid key could send)."""
    body = wire[:-SIGNATURE_LEN]
    return body + device.signer.sign(v2.signed_data(sender, recipient, body))


def test_batch_round_trip_both_ways(sessions: tuple[PairwiseSession, PairwiseSession]) -> None:
    a, b = sessions
    for sender, receiver in ((a, b), (b, a), (a, b), (a, b), (b, a)):
        msgs = _texts(7)
        assert receiver.decrypt_batch(sender.encrypt_batch(msgs), sender_device_id=sender.local_device_id) == msgs
    # v1 messages and v2 batches share the ratchet: they interleave freely.
    assert b.decrypt(a.encrypt(b"single")) == b"single"
    assert b.decrypt_batch(a.encrypt_batch([b"x", b"y"])) == [b"x", b"y"]


class _CountingSigner:
    def __init__(self, inner: MessageSigner) -> None:
        self.inner = inner
        self.signed: list[bytes] = []

    @property
    def verify_key(self) -> bytes:
        return self.inner.verify_key

    def sign(self, data: bytes) -> bytes:
        self.signed.append(data)
        return self.inner.sign(data)


def test_one_signature_per_batch(sessions: tuple[PairwiseSession, PairwiseSession]) -> None:
    a, _b = sessions
    counting = _CountingSigner(a._signer)
    a.use_signer(counting)
    signs = counting.signed
    wire = a.encrypt_batch(_texts(100))
    assert len(signs) == 1
    assert signs[0].startswith(v2.BATCH_SIGNATURE_CONTEXT + b"\x09dev-alice\x07dev-bob")
    assert signs[0].endswith(wire[:-SIGNATURE_LEN])
    parsed = PairwiseBatch.parse(wire)
    assert len(parsed.items) == 100 and parsed.session_id == a.session_id
    assert len(wire) == v2.BATCH_OVERHEAD + sum(len(t) + v2.ITEM_OVERHEAD for t in _texts(100))
    assert len({i.header.nonce for i in parsed.items}) == 100
    assert [i.header.message_number for i in parsed.items] == list(range(parsed.items[0].header.message_number,
                                                                         parsed.items[0].header.message_number + 100))


def test_bad_signature_rejects_the_whole_batch_without_state_change(
    sessions: tuple[PairwiseSession, PairwiseSession],
) -> None:
    a, b = sessions
    wire = a.encrypt_batch(_texts(5))
    before = b.encode()
    for i in (0, 5, 30, len(wire) - 100, len(wire) - 1):  # head, a header, a ciphertext, the signature
        bad = bytearray(wire)
        bad[i] ^= 1
        with pytest.raises(ProtocolError):
            b.decrypt_batch(bytes(bad))
        assert b.encode() == before
    assert b.decrypt_batch(wire) == _texts(5)


def test_truncated_or_reordered_batch_is_rejected(sessions: tuple[PairwiseSession, PairwiseSession]) -> None:
    a, b = sessions
    msgs = [b"one", b"two"]
    wire = a.encrypt_batch(msgs)
    items = PairwiseBatch.parse(wire)
    before = b.encode()
    for cut in (1, 20, v2.BATCH_OVERHEAD, len(wire) // 2, len(wire) - 1):
        with pytest.raises(PairwiseDecodeError):
            b.decrypt_batch(wire[:cut])
    # Swap the two messages (and fix the count): the signature no longer matches.
    one = v2.encode_item(items.items[0].header_bytes, items.items[0].ciphertext)
    two = v2.encode_item(items.items[1].header_bytes, items.items[1].ciphertext)
    head = v2.encode_head(a.session_id, 2)
    with pytest.raises(PairwiseVerificationError):
        b.decrypt_batch(head + two + one + items.signature)
    # Drop a message: same.
    with pytest.raises(PairwiseVerificationError):
        b.decrypt_batch(v2.encode_head(a.session_id, 1) + one + items.signature)
    assert b.encode() == before
    assert b.decrypt_batch(wire) == msgs


def test_signature_binds_sender_and_recipient(authority: ToyAuthority) -> None:
    alice, bob, carol = (ToyDevice.make(authority, d) for d in ("dev-alice", "dev-bob", "dev-carol"))
    a, b = pair(alice, bob, authority)
    wire = a.encrypt_batch([b"for bob"])
    with pytest.raises(UnexpectedMessageError):
        b.decrypt_batch(wire, sender_device_id="dev-carol")  # relayed as if carol sent it
    # A batch signed by alice's key for another recipient does not verify at bob.
    with pytest.raises(PairwiseVerificationError):
        b.decrypt_batch(_resign(wire, alice, "dev-alice", "dev-carol"))
    # Signed by anyone but alice's delegated key: rejected.
    with pytest.raises(PairwiseVerificationError):
        b.decrypt_batch(_resign(wire, carol, "dev-alice", "dev-bob"))
    # Another session (alice <-> carol) refuses it by id before any key is used.
    a2, c = pair(ToyDevice.make(authority, "dev-alice"), carol, authority)
    del a2
    with pytest.raises(UnexpectedMessageError):
        c.decrypt_batch(wire)
    assert b.decrypt_batch(wire) == [b"for bob"]


def test_bad_message_inside_a_valid_batch_rejects_only_itself(authority: ToyAuthority) -> None:
    alice, bob = ToyDevice.make(authority, "dev-alice"), ToyDevice.make(authority, "dev-bob")
    a, b = pair(alice, bob, authority)
    wire = a.encrypt_batch([b"first", b"second", b"third"])
    parsed = PairwiseBatch.parse(wire)
    items = [v2.encode_item(i.header_bytes, i.ciphertext) for i in parsed.items]
    broken = bytearray(items[1])
    broken[-1] ^= 1  # the tag of the second message
    body = v2.encode_head(a.session_id, 3) + items[0] + bytes(broken) + items[2]
    # Validly signed by alice's key (a buggy or malicious peer): the signature verifies, message 2 does not.
    out = b.decrypt_batch(body + alice.signer.sign(v2.signed_data("dev-alice", "dev-bob", body)))
    assert out[0] == b"first" and out[2] == b"third"
    assert isinstance(out[1], PairwiseVerificationError)
    # Its key was not consumed: the genuine batch delivers it; the two others are replays now.
    out = b.decrypt_batch(wire)
    assert isinstance(out[0], PairwiseReplayError) and out[1] == b"second" and isinstance(out[2], PairwiseReplayError)


def test_replayed_batch_yields_only_errors(sessions: tuple[PairwiseSession, PairwiseSession]) -> None:
    a, b = sessions
    wire = a.encrypt_batch(_texts(4))
    assert b.decrypt_batch(wire) == _texts(4)
    state = b.encode()
    assert all(isinstance(r, PairwiseReplayError) for r in b.decrypt_batch(wire))
    assert b.encode() == state


def test_batches_out_of_order(sessions: tuple[PairwiseSession, PairwiseSession]) -> None:
    a, b = sessions
    w1, w2, w3 = (a.encrypt_batch(_texts(3, tag)) for tag in (b"a", b"b", b"c"))
    assert b.decrypt_batch(w3) == _texts(3, b"c")
    assert b.decrypt_batch(w1) == _texts(3, b"a")
    assert b.decrypt_batch(w2) == _texts(3, b"b")
    # A ratchet step in between: batches of the previous chain still decrypt from the skipped keys.
    w4 = a.encrypt_batch([b"late"])
    assert a.decrypt_batch(b.encrypt_batch([b"reply"])) == [b"reply"]
    w5 = a.encrypt_batch([b"new chain"])
    assert b.decrypt_batch(w5) == [b"new chain"]
    assert b.decrypt_batch(w4) == [b"late"]


def test_batches_need_an_established_session(authority: ToyAuthority) -> None:
    alice, bob = ToyDevice.make(authority, "dev-alice"), ToyDevice.make(authority, "dev-bob")
    a = initiate(alice, bob, authority)
    with pytest.raises(PairwiseUsageError):
        a.encrypt_batch([b"too early"])  # setup messages go one by one, carrying the setup
    a2, b = pair(alice, ToyDevice.make(authority, "dev-carol"), authority)
    with pytest.raises(PairwiseUsageError):
        a2.encrypt_batch([])
    with pytest.raises(PairwiseUsageError):
        a2.encrypt_batch([b"x"] * (v2.MAX_BATCH_COUNT + 1))
    del b


def test_restored_session_continues_batches(sessions: tuple[PairwiseSession, PairwiseSession]) -> None:
    a, b = sessions
    wire = a.encrypt_batch(_texts(3))
    restored = PairwiseSession.decode(b.encode(), signer=b._signer)
    assert restored.decrypt_batch(wire) == _texts(3)


@pytest.mark.parametrize("data", [
    b"", b"\x02", b"\x02\x03" + bytes(16), b"\x02\x03" + bytes(16) + b"\x00\x00" + bytes(64),
    b"\x02\x03" + bytes(16) + b"\x04\x01" + bytes(64), b"\x01\x03" + bytes(82), b"\x02\x02" + bytes(82),
    b"\x02\x03" + bytes(16) + b"\x00\x01" + bytes(64) + bytes(64),
])
def test_malformed_batches_raise_decode_errors(data: bytes) -> None:
    with pytest.raises(PairwiseDecodeError):
        PairwiseBatch.parse(data)


def test_trailing_bytes_and_size_limit(sessions: tuple[PairwiseSession, PairwiseSession]) -> None:
    a, _ = sessions
    wire = a.encrypt_batch([b"x"])
    body = wire[:-SIGNATURE_LEN]
    with pytest.raises(PairwiseDecodeError):
        PairwiseBatch.parse(body + b"\x00" + wire[-SIGNATURE_LEN:])
    with pytest.raises(PairwiseDecodeError):
        PairwiseBatch.parse(wire, max_size=len(wire) - 1)
    assert PairwiseBatch.is_batch(wire) and not PairwiseBatch.is_batch(a.encrypt(b"v1"))


def _reference_batch(s: PairwiseSession, plaintexts: list[bytes]) -> bytes:
    """`encrypt_batch` as it was built before its batch-level shortcuts: one `next_send`, `encode_header`,
    `item_aad` and `encode_item` per message."""
    from gateway.protocol.pairwise.crypto import NONCE_LEN, aead_encrypt
    from gateway.protocol.pairwise.wire import encode_header

    nonces = s._random(NONCE_LEN * len(plaintexts))
    parts = [v2.encode_head(s.session_id, len(plaintexts))]
    for i, plaintext in enumerate(plaintexts):
        dh_public, pn, n, mk = s._ratchet.next_send()
        header = encode_header(dh_public, pn, n, nonces[i * NONCE_LEN:(i + 1) * NONCE_LEN])
        parts.append(v2.encode_item(header, aead_encrypt(mk, header[-NONCE_LEN:], plaintext,
                                                         v2.item_aad(s.session_id, header))))
    body = b"".join(parts)
    return body + s._signer.sign(v2.signed_data(s.local_device_id, s.peer_device_id, body))


@pytest.mark.parametrize("count", [1, 2, 7, 256])
def test_batch_bytes_and_state_are_those_of_the_per_message_construction(
        sessions: tuple[PairwiseSession, PairwiseSession], count: int) -> None:
    a, b = sessions
    a.encrypt_batch(_texts(3))  # not at the chain's start
    fixed = bytes(range(256)) * 100

    def clone() -> PairwiseSession:
        return PairwiseSession.decode(a.encode(), signer=a._signer, random=lambda n: fixed[:n])

    fast, slow = clone(), clone()
    texts = _texts(count, b"x")
    wire = fast.encrypt_batch(texts)
    assert wire == _reference_batch(slow, texts)
    assert fast.encode() == slow.encode()
    assert b.decrypt_batch(wire) == texts


def test_next_send_many_is_next_send_repeated_up_to_exhaustion(
        sessions: tuple[PairwiseSession, PairwiseSession]) -> None:
    from gateway.protocol.pairwise.errors import SessionExhaustedError
    from gateway.protocol.pairwise.ratchet import MAX_COUNTER, RatchetState

    a, _ = sessions
    a.encrypt_batch(_texts(2))

    def ratchet() -> RatchetState:
        return PairwiseSession.decode(a.encode(), signer=a._signer)._ratchet

    many, one = ratchet(), ratchet()
    dh, pn, first, keys = many.next_send_many(5)
    assert [(dh, pn, first + i, k) for i, k in enumerate(keys)] == [one.next_send() for _ in range(5)]
    assert many.encode() == one.encode()
    many._ns = one._ns = MAX_COUNTER - 2  # two left
    import gateway.protocol.pairwise.ratchet as ratchet_module

    wiped: list[bytes] = []
    real_wipe = ratchet_module.wipe
    ratchet_module.wipe = lambda secret: (wiped.append(bytes(secret)), real_wipe(secret))[1]  # type: ignore[assignment]
    try:
        with pytest.raises(SessionExhaustedError):
            many.next_send_many(5)
    finally:
        ratchet_module.wipe = real_wipe
    assert len(wiped) == 2  # the two keys derived before the exhaustion, never handed out, are overwritten
    one.next_send(), one.next_send()
    with pytest.raises(SessionExhaustedError):
        one.next_send()
    assert many.encode() == one.encode()


def _receiving_states() -> list[tuple[str, object]]:
    """Ratchet states as a receiver holds them, some only a store or a lowered limit makes: (name, maker)."""
    from collections import OrderedDict

    from gateway.protocol.pairwise.ratchet import MAX_COUNTER, RatchetState

    dhr, other, ckr, root = (bytes([i]) * 32 for i in (7, 8, 9, 10))
    private = bytes(range(32))

    def make(nr: int = 5, ckr_: bytes | None = ckr, skipped: dict[tuple[bytes, int], bytes] | None = None,
             previous: list[bytes] | None = None, total: int = 2000) -> RatchetState:
        return RatchetState(root_key=root, dhs_private=private, dhr=dhr, cks=bytes(32),
                            ckr=ckr_, nr=nr, ns=3, pn=2, previous_dhr=list(previous or []),
                            skipped=OrderedDict(skipped or {}), max_skipped_total=total)

    def lowered() -> RatchetState:
        s = make(skipped={(other, i): bytes([i]) * 32 for i in range(4)})
        s.max_skipped_total = 2  # (a limit lowered in place: the next commit evicts down to it)
        return s

    return [
        ("plain", make),
        ("chain start", lambda: make(nr=0)),
        ("skipped keys of another chain", lambda: make(skipped={(other, 1): b"\x01" * 32, (dhr, 2): b"\x02" * 32})),
        ("a stored key for the next number itself", lambda: make(skipped={(dhr, 5): b"\x05" * 32})),
        ("no receiving chain", lambda: make(ckr_=None)),
        ("counter at the limit", lambda: make(nr=MAX_COUNTER)),
        ("counter one below the limit", lambda: make(nr=MAX_COUNTER - 1)),
        ("previous peer keys", lambda: make(previous=[other])),
        ("limit lowered below the skipped keys", lowered),
    ]


@pytest.mark.parametrize("name_maker", _receiving_states(), ids=lambda nm: nm[0])
def test_next_in_chain_is_prepare_receive_for_the_next_message_only(name_maker: tuple[str, object]) -> None:
    """`next_in_chain` + `commit_next` (the batch's fast path) give the key and the state `prepare_receive` +
    `commit` give, for the header of the chain's next message, and stand aside (None) for every other header,
    where the plan would skip, use a stored key, step the DH ratchet or raise."""
    from gateway.protocol.pairwise.ratchet import MAX_COUNTER

    _, make = name_maker
    fixed = bytes(range(256))
    base = make()  # type: ignore[operator]
    dhr, nr = base._dhr, base._nr
    other, fresh = bytes([8]) * 32, bytes([11]) * 32
    headers = [(dh, pn, n) for dh in (dhr, other, fresh) for pn in (0, 2)
               for n in {0, 1, nr - 1, nr, nr + 1, nr + 3, MAX_COUNTER - 1, MAX_COUNTER} if n >= 0]
    used = 0
    for dh, pn, n in headers:
        generic, fast = make(), make()  # type: ignore[operator]
        try:
            plan = generic.prepare_receive(dh, pn, n, random=lambda k: fixed[:k])
        except Exception:
            plan = None
        step = fast.next_in_chain(dh, n)
        plain_next = plan is not None and not plan.dh_step and plan.used_skipped is None and not plan.new_skipped
        assert (step is not None) == plain_next, (dh == dhr, pn, n)
        if step is None:
            assert fast.encode() == make().encode()  # type: ignore[operator]  # (nothing changed)
            continue
        assert plan is not None and step == (plan.ckr, plan.message_key) and plan.nr == n + 1
        generic.commit(plan)
        fast.commit_next(*step)
        assert fast.encode() == generic.encode()
        assert fast._skipped == generic._skipped and fast.max_skipped_total == generic.max_skipped_total
        used += 1
    assert used == (0 if base._ckr is None or nr >= MAX_COUNTER or (dhr, nr) in base._skipped else 2)


def test_decrypt_batch_is_the_per_item_path(authority: ToyAuthority, monkeypatch: pytest.MonkeyPatch) -> None:
    """`decrypt_batch` (the next-in-chain fast path for most items) returns what `_open_item` per item returns,
    overwrites as many used keys and leaves the same state, over in-order, out-of-order, replayed and tampered
    batches across DH steps (every kind is checked to have run)."""
    import random as pyrandom

    import gateway.protocol.pairwise.ratchet as ratchet_module

    wiped: list[int] = []
    real_wipe = ratchet_module.wipe
    monkeypatch.setattr(ratchet_module, "wipe", lambda secret: (wiped.append(1), real_wipe(secret))[1])
    kinds: dict[str, int] = {"new": 0, "held": 0, "replay": 0, "tampered": 0, "reply": 0}
    alice, bob = ToyDevice.make(authority, "dev-a"), ToyDevice.make(authority, "dev-b")
    a, b = pair(alice, bob, authority)
    rng = pyrandom.Random(7)

    def clone(seed: int) -> PairwiseSession:  # (both copies draw the same DH keys)
        return PairwiseSession.decode(b.encode(), signer=bob.signer, random=pyrandom.Random(seed).randbytes)

    def per_item(s: PairwiseSession, wire: bytes) -> list[object]:
        batch = v2.PairwiseBatch.parse(wire)
        out: list[object] = []
        for item in batch.items:
            try:
                out.append(s._open_item(item))
            except PairwiseError as exc:
                out.append(type(exc))
        return out

    def shape(results: list[bytes | PairwiseError]) -> list[object]:
        return [r if isinstance(r, bytes) else type(r) for r in results]

    sent: list[bytes] = []
    for round_ in range(50):
        choice = 0.75 if round_ % 7 == 3 else rng.random()  # (a tampered batch every 7 rounds, whatever the draws)
        if choice < 0.5 or not sent:
            wire = a.encrypt_batch(_texts(rng.randint(1, 9), b"r%d" % round_))
            sent.append(wire)
            if rng.random() < 0.3:
                kinds["held"] += 1
                continue  # held back: a later batch skips its keys, and it arrives out of order
            kinds["new"] += 1
        elif choice < 0.7:
            wire = rng.choice(sent)  # a replay or a late one
            kinds["replay"] += 1
        elif choice < 0.8:
            wire = a.encrypt_batch(_texts(3, b"t%d" % round_))
            tampered = bytearray(wire)
            tampered[-SIGNATURE_LEN - 1] ^= 1  # the last item's tag (then the batch signed again, as a peer could)
            wire = _resign(bytes(tampered), alice, "dev-a", "dev-b")
            kinds["tampered"] += 1
        else:
            assert a.decrypt(b.encrypt(b"reply %d" % round_)) == b"reply %d" % round_  # a DH step next
            kinds["reply"] += 1
            continue
        seed = rng.getrandbits(64)
        fast, slow = clone(seed), clone(seed)
        wiped.clear()
        got = fast.decrypt_batch(wire)
        fast_wipes = len(wiped)
        wiped.clear()
        assert shape(got) == per_item(slow, wire)
        assert fast_wipes == len(wiped)  # every used key overwritten, as on the generic path
        assert fast.encode() == slow.encode()
        b = fast
    assert b.ratchet.skipped_count > 0  # (the scenario did skip keys)
    assert all(kinds.values()), kinds


def test_parsed_items_are_those_the_constructors_build(sessions: tuple[PairwiseSession, PairwiseSession]) -> None:
    """`parse` builds its items without the dataclasses' `__init__` (`batch._item`): they are the same values,
    equal and hashed alike, frozen, and the checks it skips hold by `_ITEM`'s layout."""
    import dataclasses

    from gateway.protocol.pairwise.crypto import KEY_LEN, NONCE_LEN
    from gateway.protocol.pairwise.wire import RatchetHeader

    a, _ = sessions
    wire = a.encrypt_batch(_texts(5))
    parsed = v2.PairwiseBatch.parse(wire)
    pos = 20
    for item in parsed.items:
        dh_public, pn, n, nonce, length = v2._ITEM.unpack_from(wire, pos)
        built = v2.BatchItem(RatchetHeader(dh_public, pn, n, nonce), wire[pos:pos + v2.ITEM_HEADER_LEN - 4],
                             wire[pos + v2.ITEM_HEADER_LEN:pos + v2.ITEM_HEADER_LEN + length])
        pos += v2.ITEM_HEADER_LEN + length
        assert item == built and hash(item) == hash(built) and item.header == built.header
        assert dataclasses.astuple(item.header) == dataclasses.astuple(built.header)
        assert type(item) is v2.BatchItem and type(item.header) is RatchetHeader
        assert item.header.encode() == item.header_bytes
        with pytest.raises(dataclasses.FrozenInstanceError):
            item.header.message_number = 0  # type: ignore[misc]
    assert [i.header.message_number for i in parsed.items] == list(range(5))  # (a new chain: `pair` answered)
    assert v2._ITEM.format == f">{KEY_LEN}sII{NONCE_LEN}sI"  # the sizes and ranges RatchetHeader checks
