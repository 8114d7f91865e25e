"""Group scenarios the vectors do not cover: create, add by Welcome, exchange messages, commits with a path from
every member, proposals by reference, PSKs, removal, and the fail-closed rules (replays, forged or corrupt
messages leave the state exactly as it was, a member cannot send as another)."""

from __future__ import annotations

import pytest

from gateway.protocol.mls import crypto
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.errors import MlsError, MlsReplayError, MlsVerificationError
from gateway.protocol.mls.framing import MLSMessage, PrivateMessage, PublicMessage
from gateway.protocol.mls.group import Group, GroupConfig
from gateway.protocol.mls.group_state import ApplicationMessage, ProposalReceived, StagedCommit
from gateway.protocol.mls.key_package_bundle import KeyPackageBundle, create_key_package
from gateway.protocol.mls.proposals import PreSharedKeyID, Remove
from gateway.protocol.mls.welcome_structs import Welcome
from gateway.protocol.mls.wire import WireFormat

SUITES = [1, 3]


class Member:
    def __init__(self, name: str, suite: int, config: GroupConfig | None = None) -> None:
        self.cs = crypto.get_suite(suite)
        self.signer = crypto.Ed25519Signer.generate()
        self.credential = Credential.basic(name.encode())
        self.config = config
        self.group: Group | None = None

    def key_package(self) -> KeyPackageBundle:
        self.bundle = create_key_package(self.cs, self.signer, self.credential)
        return self.bundle

    def join(self, welcome: MLSMessage) -> Group:
        assert isinstance(welcome.body, Welcome)
        self.group = Group.join(welcome.body, self.bundle, self.signer, config=self.config)
        return self.group

    @property
    def g(self) -> Group:
        assert self.group is not None
        return self.group


def _snapshot(g: Group) -> tuple[object, ...]:
    st = g.state
    return (g.epoch, g.epoch_authenticator, st.tree.tree_hash(g.cs), st.interim_transcript_hash,
            repr(st.secret_tree), dict(st.proposals), dict(st.private.keys))


def _group(suite: int, n: int, config: GroupConfig | None = None) -> list[Member]:
    members = [Member(f"m{i}", suite, config) for i in range(n)]
    a = members[0]
    a.group = Group.create(suite, b"group-" + bytes([suite]), a.signer, a.credential, config=config)
    if n > 1:
        pending = a.g.commit(add=[m.key_package().key_package for m in members[1:]])
        a.g.merge_pending_commit(pending)
        assert pending.welcome is not None
        for m in members[1:]:
            m.join(pending.welcome)
    return members


def _data(result: object) -> bytes:
    """The payload of a processed application message (fails the test if it was anything else)."""
    assert isinstance(result, ApplicationMessage)
    return result.data


def _leaf_key(g: Group) -> bytes:
    leaf = g.state.tree.leaf(g.own_leaf)
    assert leaf is not None
    return leaf.encryption_key


def _deliver(commit_msg: MLSMessage, receivers: list[Member]) -> None:
    for m in receivers:
        staged = m.g.process(commit_msg.to_bytes())
        assert isinstance(staged, StagedCommit)
        m.g.merge_staged_commit(staged)


def _agree(members: list[Member]) -> None:
    auth = {m.g.epoch_authenticator for m in members}
    hashes = {m.g.state.tree.tree_hash(m.cs) for m in members}
    assert len(auth) == 1 and len(hashes) == 1
    assert len({m.g.epoch for m in members}) == 1


@pytest.mark.parametrize("suite", SUITES)
def test_create_add_and_exchange_messages(suite: int) -> None:
    a, b = _group(suite, 2)
    _agree([a, b])
    assert a.g.epoch == 1 and [i for i, _ in b.g.members()] == [0, 1]
    msg = a.g.encrypt_application(b"hello bob", b"aad")
    got = b.g.process(msg.to_bytes())
    assert got == ApplicationMessage(a.g.own_leaf, b"hello bob", b"aad", 0, a.g.epoch)
    got = a.g.process(b.g.encrypt_application(b"hi alice").to_bytes())
    assert isinstance(got, ApplicationMessage) and got.data == b"hi alice" and got.sender == b.g.own_leaf
    assert a.g.export_secret(b"label", b"ctx", 32) == b.g.export_secret(b"label", b"ctx", 32)


@pytest.mark.parametrize("suite", SUITES)
def test_replay_rejected_and_bounded_out_of_order(suite: int) -> None:
    a, b = _group(suite, 2, GroupConfig(out_of_order_window=3))
    msgs = [a.g.encrypt_application(f"m{i}".encode()).to_bytes() for i in range(8)]
    assert _data(b.g.process(msgs[0])) == b"m0"
    before = _snapshot(b.g)
    with pytest.raises(MlsReplayError):
        b.g.process(msgs[0])
    assert _snapshot(b.g) == before
    assert _data(b.g.process(msgs[7])) == b"m7"
    for i in (6, 5):  # generations 5..7 are the window of 3 below the next generation (8); 7 is used
        assert _data(b.g.process(msgs[i])) == f"m{i}".encode()
        with pytest.raises(MlsReplayError):
            b.g.process(msgs[i])
    for i in (4, 2):  # older than the window: their keys were never kept
        with pytest.raises(MlsReplayError):
            b.g.process(msgs[i])


@pytest.mark.parametrize("suite", SUITES)
def test_commit_with_path_from_every_member(suite: int) -> None:
    members = _group(suite, 5)
    _agree(members)
    for committer in members:
        before = committer.g.epoch_authenticator
        pending = committer.g.commit()
        committer.g.merge_pending_commit(pending)
        _deliver(pending.message, [m for m in members if m is not committer])
        _agree(members)
        assert committer.g.epoch_authenticator != before
    for sender in members:
        msg = sender.g.encrypt_application(b"x").to_bytes()
        for m in members:
            if m is not sender:
                assert _data(m.g.process(msg)) == b"x"


@pytest.mark.parametrize("suite", SUITES)
def test_add_later_member_then_proposal_by_reference_and_remove(suite: int) -> None:
    a, b = _group(suite, 2)
    c = Member("c", suite)
    pending = b.g.commit(add=[c.key_package().key_package])
    b.g.merge_pending_commit(pending)
    _deliver(pending.message, [a])
    assert pending.welcome is not None
    c.join(pending.welcome)
    _agree([a, b, c])

    proposal = b.g.propose(Remove(c.g.own_leaf))
    for m in (a, c):
        got = m.g.process(proposal.to_bytes())
        assert isinstance(got, ProposalReceived) and got.proposal == Remove(c.g.own_leaf)
    pending = a.g.commit()  # includes the pending Remove by reference
    a.g.merge_pending_commit(pending)
    staged = c.g.process(pending.message.to_bytes())
    assert isinstance(staged, StagedCommit) and staged.self_removed
    c.g.merge_staged_commit(staged)
    assert not c.g.active
    _deliver(pending.message, [b])
    _agree([a, b])
    assert [i for i, _ in a.g.members()] == [0, 1]
    # The removed member can no longer read the group.
    secret = a.g.encrypt_application(b"after removal").to_bytes()
    assert _data(b.g.process(secret)) == b"after removal"
    with pytest.raises(MlsError):
        c.g.process(secret)


@pytest.mark.parametrize("suite", SUITES)
def test_external_psk_commit(suite: int) -> None:
    psks = {b"shared psk id": b"shared psk value"}
    a, b = _group(suite, 2, GroupConfig(external_psks=psks))
    nonce = bytes(range(a.cs.hash_len))
    pending = a.g.commit(psks=[PreSharedKeyID.external(b"shared psk id", nonce)])
    a.g.merge_pending_commit(pending)
    _deliver(pending.message, [b])
    _agree([a, b])
    # A member without the PSK cannot follow, and is left unchanged.
    a2, b2 = _group(suite, 2, GroupConfig(external_psks=psks))
    b2.g.config = GroupConfig()
    pending = a2.g.commit(psks=[PreSharedKeyID.external(b"shared psk id", nonce)])
    before = _snapshot(b2.g)
    with pytest.raises(MlsError):
        b2.g.process(pending.message.to_bytes())
    assert _snapshot(b2.g) == before


def _tamper_public(msg: MLSMessage, **changes: object) -> bytes:
    body = msg.body
    assert isinstance(body, PublicMessage)
    fields = {"content": body.content, "auth": body.auth, "membership_tag": body.membership_tag, **changes}
    return MLSMessage(PublicMessage(**fields)).to_bytes()  # type: ignore[arg-type]


@pytest.mark.parametrize("suite", SUITES)
def test_forged_or_corrupt_commits_leave_state_unchanged(suite: int) -> None:
    a, b, c = _group(suite, 3)
    pending = a.g.commit()
    msg = pending.message
    body = msg.body
    assert isinstance(body, PublicMessage) and body.membership_tag is not None
    auth = body.auth
    assert auth.confirmation_tag is not None
    forgeries = [
        _tamper_public(msg, membership_tag=bytes(len(body.membership_tag))),
        _tamper_public(msg, auth=type(auth)(auth.signature[:-1] + bytes([auth.signature[-1] ^ 1]),
                                              auth.confirmation_tag)),
        msg.to_bytes()[:-5],
        b"\x00" * 40,
    ]
    for forged in forgeries:
        before = _snapshot(b.g)
        with pytest.raises(MlsError):
            b.g.process(forged)
        assert _snapshot(b.g) == before
    # A member (c) re-signs a commit with a wrong confirmation tag: membership tag and signature verify, the
    # confirmation tag does not, and nothing changes.
    bad = c.g.commit()
    cbody = bad.message.body
    assert isinstance(cbody, PublicMessage) and cbody.auth.confirmation_tag is not None
    from gateway.protocol.mls import protection
    from gateway.protocol.mls.framing import AuthenticatedContent, FramedContentAuthData

    ac = AuthenticatedContent(WireFormat.PUBLIC_MESSAGE, cbody.content,
                              FramedContentAuthData(cbody.auth.signature, bytes(a.cs.hash_len)))
    wrong_tag = protection.protect_public(a.cs, ac, c.g.context, c.g.state.secrets.membership_key)
    before = _snapshot(b.g)
    with pytest.raises(MlsVerificationError):
        b.g.process(MLSMessage(wrong_tag).to_bytes())
    assert _snapshot(b.g) == before
    # The genuine commit still processes afterwards.
    a.g.merge_pending_commit(pending)
    _deliver(msg, [b, c])
    _agree([a, b, c])


@pytest.mark.parametrize("suite", SUITES)
def test_member_cannot_send_as_another(suite: int) -> None:
    a, b, c = _group(suite, 3)
    # c builds an application message claiming to come from b: it signs with its own key.
    from gateway.protocol.mls import protection
    from gateway.protocol.mls.framing import FramedContent, Sender

    content = FramedContent(c.g.group_id, c.g.epoch, Sender.member(b.g.own_leaf), b"", b"I am b")
    ac = protection.sign_authenticated_content(c.signer, WireFormat.PRIVATE_MESSAGE, content, c.g.context)
    forged = protection.protect_private(c.cs, ac, c.g.state.secret_tree, c.g.state.secrets.sender_data_secret)
    before = _snapshot(a.g)
    with pytest.raises(MlsVerificationError):
        a.g.process(MLSMessage(forged).to_bytes())
    assert _snapshot(a.g) == before
    # The genuine message from b with the same generation still decrypts: the forgery consumed nothing.
    genuine = b.g.encrypt_application(b"really b").to_bytes()
    assert _data(a.g.process(genuine)) == b"really b"


@pytest.mark.parametrize("suite", SUITES)
def test_private_handshakes_and_stale_staged_commit(suite: int) -> None:
    config = GroupConfig(handshake_wire_format=WireFormat.PRIVATE_MESSAGE)
    a, b = _group(suite, 2, config)
    pending = a.g.commit()
    assert isinstance(pending.message.body, PrivateMessage)
    staged = b.g.process(pending.message.to_bytes())
    assert isinstance(staged, StagedCommit)
    staged_again = b.g.process(pending.message.to_bytes())  # not merged yet: nothing was consumed
    assert isinstance(staged_again, StagedCommit)
    a.g.merge_pending_commit(pending)
    b.g.merge_staged_commit(staged)
    _agree([a, b])
    with pytest.raises(MlsError):
        b.g.merge_staged_commit(staged_again)  # made for the previous epoch
    with pytest.raises(MlsError):
        b.g.process(pending.message.to_bytes())  # old epoch


@pytest.mark.parametrize("suite", SUITES)
def test_own_messages_are_not_processed(suite: int) -> None:
    a, _b = _group(suite, 2)
    with pytest.raises(MlsError):
        a.g.process(a.g.commit().message.to_bytes())


@pytest.mark.parametrize("suite", SUITES)
def test_secrets_never_in_repr(suite: int) -> None:
    a, b = _group(suite, 2, GroupConfig(external_psks={b"id": b"\x11" * 32}))
    c = Member("c", suite)
    bundle = c.key_package()
    pending = a.g.commit(add=[bundle.key_package])
    staged = b.g.process(pending.message.to_bytes())
    st = a.g.state
    secrets = [getattr(st.secrets, f) for f in ("init_secret", "encryption_secret", "exporter_secret",
                                                 "membership_key", "confirmation_key", "sender_data_secret")]
    secrets += [*st.private.keys.values(), bundle.init_priv, bundle.encryption_priv, b"\x11" * 32]
    texts = [repr(x) for x in (a.g, st, staged, pending, a.g.config, bundle, st.secret_tree, st.secrets,
                               a.signer, st.private)]
    for secret in secrets:
        for text in texts:
            assert secret.hex() not in text and repr(secret) not in text


@pytest.mark.parametrize("suite", SUITES)
def test_update_proposal_committed_by_another(suite: int) -> None:
    a, b, c = _group(suite, 3)
    old_key = _leaf_key(b.g)
    upd = b.g.propose_update()
    for m in (a, c):
        assert isinstance(m.g.process(upd.to_bytes()), ProposalReceived)
    pending = a.g.commit()
    a.g.merge_pending_commit(pending)
    _deliver(pending.message, [b, c])
    _agree([a, b, c])
    assert _leaf_key(b.g) != old_key
    # b holds the new leaf key: it can follow a commit whose path secret is encrypted to it.
    pending = c.g.commit()
    c.g.merge_pending_commit(pending)
    _deliver(pending.message, [a, b])
    _agree([a, b, c])


@pytest.mark.parametrize("suite", SUITES)
def test_committer_skips_its_own_update(suite: int) -> None:
    a, b = _group(suite, 2)
    upd = a.g.propose_update()
    b.g.process(upd.to_bytes())
    pending = a.g.commit()  # the path replaces the update; the own Update is not included
    a.g.merge_pending_commit(pending)
    staged = b.g.process(pending.message.to_bytes())
    assert isinstance(staged, StagedCommit) and staged.proposals == ()
    b.g.merge_staged_commit(staged)
    _agree([a, b])


@pytest.mark.parametrize("suite", SUITES)
def test_reinit_closes_the_group(suite: int) -> None:
    from gateway.protocol.mls.proposals import ReInit

    a, b = _group(suite, 2)
    with pytest.raises(MlsError):  # ReInit must be alone
        a.g.commit(add=[Member("c", suite).key_package().key_package], reinit=ReInit(b"new", 1, suite))
    pending = a.g.commit(reinit=ReInit(b"new group", 1, suite), force_path=False)
    a.g.merge_pending_commit(pending)
    _deliver(pending.message, [b])
    _agree([a, b])
    for m in (a, b):
        assert m.g.reinit == ReInit(b"new group", 1, suite)
        with pytest.raises(MlsError):
            m.g.encrypt_application(b"no more")


@pytest.mark.parametrize("suite", SUITES)
def test_late_application_message_from_previous_epoch(suite: int) -> None:
    a, b, c = _group(suite, 3)
    late = c.g.encrypt_application(b"sent before the commit").to_bytes()
    late2 = c.g.encrypt_application(b"second").to_bytes()
    epoch = a.g.epoch
    pending = a.g.commit()
    a.g.merge_pending_commit(pending)
    _deliver(pending.message, [b, c])
    got = b.g.process(late)
    assert isinstance(got, ApplicationMessage) and got.epoch == epoch and got.data == b"sent before the commit"
    with pytest.raises(MlsReplayError):
        b.g.process(late)
    # Handshake messages of a past epoch are refused.
    with pytest.raises(MlsError):
        b.g.process(pending.message.to_bytes())
    # One more epoch and the keys of the first one are deleted.
    pending = a.g.commit()
    a.g.merge_pending_commit(pending)
    _deliver(pending.message, [b, c])
    with pytest.raises(MlsError):
        b.g.process(late2)


@pytest.mark.parametrize("suite", SUITES)
def test_no_past_epochs_when_disabled(suite: int) -> None:
    a, b = _group(suite, 2, GroupConfig(max_past_epochs=0))
    late = a.g.encrypt_application(b"late").to_bytes()
    pending = a.g.commit()
    a.g.merge_pending_commit(pending)
    _deliver(pending.message, [b])
    with pytest.raises(MlsError):
        b.g.process(late)


@pytest.mark.parametrize("suite", SUITES)
def test_key_package_lifetime_checked_when_time_is_given(suite: int) -> None:
    from gateway.protocol.mls.key_package import Lifetime

    a, b = _group(suite, 2)
    c = Member("c", suite)
    expired = create_key_package(c.cs, c.signer, c.credential, lifetime=Lifetime(1000, 2000)).key_package
    with pytest.raises(MlsError):
        a.g.commit(add=[expired], now=5000)
    pending = a.g.commit(add=[expired], now=1500)  # within its lifetime at that time
    before = _snapshot(b.g)
    with pytest.raises(MlsError):
        b.g.process(pending.message.to_bytes(), now=5000)
    assert _snapshot(b.g) == before
    assert isinstance(b.g.process(pending.message.to_bytes(), now=1500), StagedCommit)


@pytest.mark.parametrize("suite", SUITES)
def test_resumption_psk_from_an_earlier_epoch(suite: int) -> None:
    a, b = _group(suite, 2)
    earlier = a.g.epoch
    for _ in range(2):
        pending = a.g.commit()
        a.g.merge_pending_commit(pending)
        _deliver(pending.message, [b])
    from gateway.protocol.mls.wire import ResumptionPskUsage

    pid = PreSharedKeyID.resumption(ResumptionPskUsage.APPLICATION, a.g.group_id, earlier, bytes(a.cs.hash_len))
    pending = a.g.commit(psks=[pid])
    a.g.merge_pending_commit(pending)
    _deliver(pending.message, [b])
    _agree([a, b])
    unknown = PreSharedKeyID.resumption(ResumptionPskUsage.APPLICATION, a.g.group_id, 999, bytes(a.cs.hash_len))
    with pytest.raises(MlsError):
        a.g.commit(psks=[unknown])


@pytest.mark.parametrize("suite", SUITES)
def test_identity_validator_is_applied(suite: int) -> None:
    def no_mallory(credential: Credential, signature_key: bytes) -> None:
        if credential.identity == b"mallory":
            raise MlsError("mallory is not in our fleet")

    a, b = _group(suite, 2)
    mallory = Member("mallory", suite)
    kp = mallory.key_package().key_package
    a.g.config = GroupConfig(identity_validator=no_mallory)
    with pytest.raises(MlsError):
        a.g.commit(add=[kp])
    b.g.config = GroupConfig(identity_validator=no_mallory)
    a.g.config = GroupConfig()
    pending = a.g.commit(add=[kp])  # a's policy lets mallory in; b's refuses the commit, unchanged
    before = _snapshot(b.g)
    with pytest.raises(MlsError):
        b.g.process(pending.message.to_bytes())
    assert _snapshot(b.g) == before


@pytest.mark.parametrize("suite", SUITES)
def test_join_checks_the_tree(suite: int) -> None:
    from gateway.protocol.mls.ratchet_tree import RatchetTree

    a, b = _group(suite, 2)
    c = Member("c", suite)
    pending = a.g.commit(add=[c.key_package().key_package], ratchet_tree_in_welcome=False)
    welcome = pending.welcome
    assert welcome is not None and isinstance(welcome.body, Welcome)
    with pytest.raises(MlsError):  # no tree at all
        Group.join(welcome.body, c.bundle, c.signer)
    with pytest.raises(MlsError):  # the tree of the previous epoch: wrong tree hash
        Group.join(welcome.body, c.bundle, c.signer, ratchet_tree=a.g.tree)
    with pytest.raises(MlsError):  # someone else's signer
        Group.join(welcome.body, c.bundle, b.signer, ratchet_tree=pending.next_state.tree)
    g = Group.join(welcome.body, c.bundle, c.signer, ratchet_tree=RatchetTree.from_wire(
        pending.next_state.tree.to_wire()))
    a.g.merge_pending_commit(pending)
    assert g.epoch_authenticator == a.g.epoch_authenticator


class _CountingSigner:
    """A Signer held 'elsewhere' (here: a `cryptography` key behind the protocol), counting its uses."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._key = Ed25519PrivateKey.generate()
        self.calls = 0

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        return self._key.sign(data)


@pytest.mark.parametrize("suite", SUITES)
def test_any_signer_implementation_works(suite: int) -> None:
    signer = _CountingSigner()
    assert isinstance(signer, crypto.Signer)
    a = Group.create(suite, b"signer group", signer, Credential.basic(b"hsm-held"))
    b = Member("b", suite)
    pending = a.commit(add=[b.key_package().key_package])
    a.merge_pending_commit(pending)
    assert pending.welcome is not None
    b.join(pending.welcome)
    assert _data(b.g.process(a.encrypt_application(b"signed elsewhere").to_bytes())) == b"signed elsewhere"
    assert signer.calls >= 4  # leaf, commit path leaf, commit, GroupInfo, application message
