"""`protection.seal_application` / `open_application` (every application message of a group) against the generic
path they replace: `sign_authenticated_content` + `protect_private` to send, `unprotect_private` to receive.
Sending must give the same message byte for byte (Ed25519 is deterministic; the reuse guard is fixed here) and
leave the secret tree in the same state; receiving must give the same result, or the same error type and
message, for genuine and damaged messages alike, and consume nothing (the whole encoded tree compared, skipped
keys included). The group-level tests check that `Group.process` still refuses its own leaf before consuming, and
that `encrypt_application` and `process` take the fast path.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from gateway.protocol.mls import crypto, protection
from gateway.protocol.mls.codec import Writer
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.errors import MlsDecodeError, MlsError, MlsReplayError, MlsVerificationError
from gateway.protocol.mls.framing import (
    FRAMED_CONTENT_SIGN_LABEL,
    FramedContent,
    MLSMessage,
    PrivateMessage,
    Sender,
    private_content_aad,
    sender_data_aad,
)
from gateway.protocol.mls.group import Group, GroupConfig
from gateway.protocol.mls.group_persist import group_from_bytes, group_to_bytes
from gateway.protocol.mls.group_state import ApplicationMessage
from gateway.protocol.mls.key_package_bundle import create_key_package
from gateway.protocol.mls.secret_tree import RatchetType, SecretTree, sender_data_key_nonce
from gateway.protocol.mls.tree_math import LeafIndex
from gateway.protocol.mls.welcome_structs import GroupContext
from gateway.protocol.mls.wire import ContentType, WireFormat

APP = RatchetType.APPLICATION
SUITES = [1, 3]


class _Env:
    def __init__(self, suite: int, group_id: bytes = b"group", epoch: int = 5, n_leaves: int = 4) -> None:
        self.cs = crypto.get_suite(suite)
        self.context = GroupContext(1, suite, group_id, epoch, os.urandom(32), os.urandom(32))
        self.encryption_secret = os.urandom(32)
        self.sender_data_secret = os.urandom(32)
        self.n_leaves = n_leaves
        self.signers = [crypto.Ed25519Signer.generate() for _ in range(n_leaves)]

    def tree(self, n_leaves: int | None = None) -> SecretTree:
        return SecretTree(self.cs, self.encryption_secret, n_leaves or self.n_leaves)

    def key_of(self, leaf: LeafIndex) -> bytes:
        if leaf == 2:
            raise MlsError(f"sender leaf {leaf} is not a member")  # a blank leaf
        return self.signers[leaf].public_key

    def generic_seal(self, tree: SecretTree, leaf: int, data: bytes, aad: bytes, padding_block: int,
                     guard: bytes) -> PrivateMessage:
        content = FramedContent(self.context.group_id, self.context.epoch, Sender.member(leaf), aad, data)
        ac = protection.sign_authenticated_content(self.signers[leaf], WireFormat.PRIVATE_MESSAGE, content,
                                                   self.context)
        return protection.protect_private(self.cs, ac, tree, self.sender_data_secret, padding_block=padding_block,
                                          reuse_guard=guard)

    def fast_seal(self, tree: SecretTree, leaf: int, data: bytes, aad: bytes, padding_block: int,
                  guard: bytes) -> PrivateMessage:
        return protection.seal_application(self.cs, self.signers[leaf], self.context, tree, self.sender_data_secret,
                                           LeafIndex(leaf), data, aad, padding_block=padding_block, reuse_guard=guard)

    def generic_open(self, msg: PrivateMessage, tree: SecretTree) -> tuple[object, ...]:
        try:
            opened = protection.unprotect_private(self.cs, msg, self.context, tree, self.sender_data_secret,
                                                  lambda s: self.key_of(LeafIndex(s.index or 0)), consume=False)
        except Exception as e:
            return type(e), str(e)
        content = opened.content.content
        assert opened.ratchet == APP and not opened.consumed and content.content_type == ContentType.APPLICATION
        return opened.leaf, opened.generation, content.content, content.authenticated_data

    def fast_open(self, msg: PrivateMessage, tree: SecretTree) -> tuple[object, ...]:
        try:
            leaf, generation, data = protection.open_application(self.cs, msg, self.context, tree,
                                                                 self.sender_data_secret, self.key_of)
        except Exception as e:
            return type(e), str(e)
        return leaf, generation, data, msg.authenticated_data


@pytest.mark.parametrize("suite", SUITES)
def test_seal_application_matches_the_generic_path(suite: int) -> None:
    for gid in (b"", b"g", os.urandom(64)):
        env = _Env(suite, gid, epoch=2**64 - 1 if gid else 0)
        generic_tree, fast_tree = env.tree(), env.tree()
        for size in (0, 1, 63, 64, 1024, 16383, 16384, 70000):
            for aad in (b"", b"ad", os.urandom(64)):
                for padding_block in (0, 1, 16, 32):
                    for leaf in (0, 3):
                        guard = os.urandom(4)
                        data = os.urandom(size)
                        want = env.generic_seal(generic_tree, leaf, data, aad, padding_block, guard)
                        got = env.fast_seal(fast_tree, leaf, data, aad, padding_block, guard)
                        assert got == want
                        assert MLSMessage(got).to_bytes() == MLSMessage(want).to_bytes()
        # the same keys consumed and deleted: the two trees are the same tree
        w1, w2 = Writer(), Writer()
        generic_tree.encode(w1)
        fast_tree.encode(w2)
        assert w1.bytes() == w2.bytes()
        assert fast_tree.generation(LeafIndex(3), APP) == 8 * 3 * 4


@pytest.mark.parametrize("suite", SUITES)
def test_seal_application_refuses_a_bad_reuse_guard_as_before(suite: int) -> None:
    env = _Env(suite)
    for guard in (b"", b"abc", b"abcde"):
        with pytest.raises(ValueError, match="reuse_guard") as generic:
            env.generic_seal(env.tree(), 0, b"x", b"", 0, guard)
        with pytest.raises(ValueError, match="reuse_guard") as fast:
            env.fast_seal(env.tree(), 0, b"x", b"", 0, guard)
        assert str(fast.value) == str(generic.value)


def _reseal(env: _Env, msg: PrivateMessage, *, leaf: int, generation: int, plaintext: bytes,
            tree: SecretTree) -> PrivateMessage:
    """A message whose content plaintext is chosen by the test (padding, structure), under the right keys."""
    kn = tree.key_for(LeafIndex(leaf), APP, generation)
    guard = b"\x00\x00\x00\x00"
    aad = private_content_aad(msg.group_id, msg.epoch, msg.content_type, msg.authenticated_data)
    ciphertext = env.cs.aead_seal(kn.key, kn.nonce, aad, plaintext)
    key, nonce = sender_data_key_nonce(env.cs, env.sender_data_secret, ciphertext)
    sd = leaf.to_bytes(4, "big") + generation.to_bytes(4, "big") + guard
    esd = env.cs.aead_seal(key, nonce, sender_data_aad(msg.group_id, msg.epoch, msg.content_type), sd)
    return PrivateMessage(msg.group_id, msg.epoch, msg.content_type, msg.authenticated_data, esd, ciphertext)


def _flip(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 1]) + b[i + 1:]


def _encoded(tree: SecretTree) -> bytes:
    """The tree's whole state (ratchets, skipped keys), as stored."""
    w = Writer()
    tree.encode(w)
    return w.bytes()


def _with_skipped_keys(env: _Env) -> Callable[[], SecretTree]:
    def make() -> SecretTree:
        tree = env.tree()
        tree.consume(LeafIndex(0), APP, 6)  # generations 0-5 of leaf 0 kept as skipped keys
        return tree
    return make


@pytest.mark.parametrize("suite", SUITES)
def test_open_application_matches_the_generic_path(suite: int) -> None:
    env = _Env(suite)
    sender = env.tree()
    msgs = []
    for i, size in enumerate((0, 1, 63, 64, 1024, 16384, 70000)):
        msgs.append(env.fast_seal(sender, i % 2, os.urandom(size), os.urandom(i * 20), 16 * (i % 3), os.urandom(4)))
    blank = env.fast_seal(sender, 2, b"from a blank leaf", b"", 0, os.urandom(4))
    late = env.fast_seal(sender, 0, b"far ahead", b"", 0, os.urandom(4))

    cases: list[tuple[str, PrivateMessage, Callable[[], SecretTree]]] = []
    for i, m in enumerate(msgs):
        cases.append((f"genuine {i}", m, env.tree))
    m = msgs[4]
    ct, esd = m.ciphertext, m.encrypted_sender_data
    cases += [
        ("blank leaf", blank, env.tree),
        ("leaf outside the tree", msgs[1], lambda: env.tree(1)),
        ("ciphertext flipped", PrivateMessage(m.group_id, m.epoch, m.content_type, m.authenticated_data, esd,
                                              _flip(ct, 40)), env.tree),
        ("tag flipped", PrivateMessage(m.group_id, m.epoch, m.content_type, m.authenticated_data, esd,
                                       _flip(ct, len(ct) - 1)), env.tree),
        ("sender data flipped", PrivateMessage(m.group_id, m.epoch, m.content_type, m.authenticated_data,
                                               _flip(esd, 3), ct), env.tree),
        ("aad changed", PrivateMessage(m.group_id, m.epoch, m.content_type, m.authenticated_data + b"!", esd, ct),
         env.tree),
        ("group id changed", PrivateMessage(b"other", m.epoch, m.content_type, m.authenticated_data, esd, ct),
         env.tree),
        ("epoch changed", PrivateMessage(m.group_id, m.epoch + 1, m.content_type, m.authenticated_data, esd, ct),
         env.tree),
    ]
    # the sender's generation 0 of leaf 0 already consumed: a replay
    used = env.tree()
    used.consume(LeafIndex(0), APP, 0)
    cases.append(("replay", msgs[0], lambda: used))
    # a blank leaf whose key is also gone: the membership check comes first, as in the generic path
    blank_used = env.tree()
    blank_used.consume(LeafIndex(2), APP, 0)
    cases.append(("blank leaf, replayed", blank, lambda: blank_used))
    # more than max_forward ahead
    far = env.tree()
    far.max_forward = 2
    cases.append(("too far ahead", late, lambda: far))
    # chosen plaintexts under the right keys: padding, truncation, trailing signature bytes, a wrong signature
    good = env.tree()
    leaf0 = env.signers[0]
    fc = FramedContent(m.group_id, m.epoch, Sender.member(0), m.authenticated_data, b"chosen")
    sig = protection.sign_content(leaf0, WireFormat.PRIVATE_MESSAGE, fc, env.context)
    body = b"\x06chosen\x40\x40" + sig
    for name, plaintext in (("zero padding", body + bytes(7)), ("non-zero padding", body + b"\x00\x01"),
                            ("truncated signature", body[:-1]), ("truncated data", b"\x10chosen"),
                            ("bad varint", b"\xc0" + body[1:]), ("empty", b""),
                            ("wrong signature", body[:-1] + bytes([body[-1] ^ 1])),
                            ("signed as another wire format", b"\x06chosen\x40\x40" + protection.sign_content(
                                leaf0, WireFormat.PUBLIC_MESSAGE, fc, env.context))):
        resealed = _reseal(env, m, leaf=0, generation=5, plaintext=plaintext, tree=good)
        cases.append((name, resealed, env.tree))
        # the same under a tree that holds generation 5 as a skipped key (generation 6 came first): a refused
        # message must leave that key for the genuine late message (any member can seal under it; only the
        # signature tells the sender apart)
        cases.append((f"{name}, its key skipped", resealed, _with_skipped_keys(env)))

    outcomes = set()
    for name, msg, make_tree in cases:
        t1, t2 = make_tree(), make_tree()
        before = _encoded(t1)
        want = env.generic_open(msg, t1)
        got = env.fast_open(msg, t2)
        assert got == want, name
        assert _encoded(t2) == before, name  # nothing consumed: every ratchet and skipped key still there
        outcomes.add(want[0] if isinstance(want[0], type) else "ok")
    # successes and every kind of refusal were exercised
    assert outcomes == {"ok", MlsError, MlsDecodeError, MlsVerificationError, MlsReplayError}, outcomes


def test_open_application_refuses_other_content_types() -> None:
    env = _Env(1)
    m = env.fast_seal(env.tree(), 0, b"x", b"", 0, os.urandom(4))
    for ct in (ContentType.PROPOSAL, ContentType.COMMIT):
        bad = PrivateMessage(m.group_id, m.epoch, ct, m.authenticated_data, m.encrypted_sender_data, m.ciphertext)
        with pytest.raises(MlsError, match="application messages only"):
            protection.open_application(env.cs, bad, env.context, env.tree(), env.sender_data_secret, env.key_of)


def test_signature_covers_the_generic_framed_content_tbs() -> None:
    env = _Env(1)
    m = env.fast_seal(env.tree(), 1, b"payload", b"ad", 0, os.urandom(4))
    opened = protection.unprotect_private(env.cs, m, env.context, env.tree(), env.sender_data_secret,
                                          lambda s: env.signers[1].public_key)
    tbs = protection.framed_content_tbs(WireFormat.PRIVATE_MESSAGE, opened.content.content, env.context)
    assert crypto.verify_with_label(env.cs, env.signers[1].public_key, FRAMED_CONTENT_SIGN_LABEL, tbs,
                                    opened.content.auth.signature)


# --- the group ----------------------------------------------------------------------------------------------


def _pair(suite: int, config: GroupConfig | None = None
          ) -> tuple[Group, Group, crypto.Ed25519Signer, crypto.Ed25519Signer]:
    cs = crypto.get_suite(suite)
    sa, sb = crypto.Ed25519Signer.generate(), crypto.Ed25519Signer.generate()
    a = Group.create(suite, b"pair", sa, Credential.basic(b"a"), config=config)
    bundle = create_key_package(cs, sb, Credential.basic(b"b"))
    pending = a.commit(add=[bundle.key_package])
    a.merge_pending_commit(pending)
    assert pending.welcome is not None
    b = Group.join(pending.welcome.body, bundle, sb, config=config)  # type: ignore[arg-type]
    return a, b, sa, sb


@pytest.mark.parametrize("suite", SUITES)
def test_group_round_trip_and_generic_equivalence(suite: int, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, _, sb = _pair(suite, GroupConfig(padding_block=32))
    calls: list[str] = []
    for name in ("seal_application", "open_application"):
        real = getattr(protection, name)
        monkeypatch.setattr(protection, name,
                            lambda *args, _real=real, _name=name, **kw: (calls.append(_name), _real(*args, **kw))[1])
    got = a.process(b.encrypt_application(b"hello", b"ad").to_bytes())
    assert got == ApplicationMessage(b.own_leaf, b"hello", b"ad", 0, a.epoch)
    assert calls == ["seal_application", "open_application"]  # the group takes the fast path both ways
    # input that is not bytes keeps the generic path, which decides what it accepts, as before: authenticated
    # data as a bytearray is sent; data as a bytearray is not application data there and fails before any key
    # is used
    got = a.process(b.encrypt_application(b"again", bytearray(b"ad2")).to_bytes())
    assert got == ApplicationMessage(b.own_leaf, b"again", b"ad2", 1, a.epoch)
    with pytest.raises(AttributeError):
        b.encrypt_application(bytearray(b"not bytes"))  # type: ignore[arg-type]
    assert b.state.secret_tree.generation(b.own_leaf, APP) == 2
    # a fixed reuse guard: the group's message equals the generic one made from a copy of the state
    monkeypatch.setattr(protection.os, "urandom", lambda n: b"\x01\x02\x03\x04"[:n])
    copy = group_from_bytes(group_to_bytes(b), sb)
    fast = b.encrypt_application(b"same bytes", b"x")
    ac = protection.sign_authenticated_content(sb, WireFormat.PRIVATE_MESSAGE,
                                               copy._framed(b"same bytes", b"x"), copy.state.context)
    assert fast.to_bytes() == copy._protect(ac).to_bytes()


@pytest.mark.parametrize("suite", SUITES)
def test_group_refuses_its_own_leaf_before_consuming(suite: int) -> None:
    a, b, sa, _ = _pair(suite)
    saved = group_to_bytes(a)
    msg = a.encrypt_application(b"mine").to_bytes()
    twin = group_from_bytes(saved, sa)  # the state from before the send: generation 0 is still there
    before = repr(twin.state.secret_tree), twin.state.secret_tree.generation(twin.own_leaf, APP)
    with pytest.raises(MlsError, match="own leaf"):
        twin.process(msg)
    assert (repr(twin.state.secret_tree), twin.state.secret_tree.generation(twin.own_leaf, APP)) == before
    assert b.process(msg) == ApplicationMessage(a.own_leaf, b"mine", b"", 0, b.epoch)
    with pytest.raises(MlsError):
        b.process(msg)  # consumed: a replay
