"""A member rotates its signature key and credential with a commit (RFC 9420 7.5: the UpdatePath's LeafNode may
carry a new signature key; 5.3.1: the new credential must be a valid successor of the old one).

The commit's FramedContent is signed with the key the committer's leaf holds before the commit, its new LeafNode
with the new key; receivers ask the application (`GroupConfig.credential_successor`) whether the new credential
is the same client. Here a basic credential b"<client>#<n>" names client <client>, generation <n>.
"""

from __future__ import annotations

import pytest

from gateway.protocol.mls import crypto
from gateway.protocol.mls.credentials import Credential, MlsCredentialError
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.framing import MLSMessage
from gateway.protocol.mls.group import Group, GroupConfig
from gateway.protocol.mls.group_persist import group_from_bytes, group_to_bytes
from gateway.protocol.mls.group_state import ApplicationMessage, StagedCommit
from gateway.protocol.mls.key_package import LeafNode
from gateway.protocol.mls.key_package_bundle import KeyPackageBundle, create_key_package, sign_leaf_node
from gateway.protocol.mls.proposals import Update
from gateway.protocol.mls.tree_math import LeafIndex
from gateway.protocol.mls.welcome_structs import Welcome
from gateway.protocol.mls.wire import LeafNodeSource

SUITE = 1


def same_client(old: Credential, new: Credential) -> None:
    if old.identity.split(b"#")[0] != new.identity.split(b"#")[0]:
        raise MlsCredentialError(f"{new.identity!r} is not the same client as {old.identity!r}")


STRICT = GroupConfig(credential_successor=same_client)


class Member:
    def __init__(self, name: str, config: GroupConfig) -> None:
        self.name = name
        self.cs = crypto.get_suite(SUITE)
        self.signer = crypto.Ed25519Signer.generate()
        self.credential = Credential.basic(f"{name}#1".encode())
        self.config = config
        self.group: Group | None = None

    def key_package(self) -> KeyPackageBundle:
        self.bundle = create_key_package(self.cs, self.signer, self.credential)
        return self.bundle

    @property
    def g(self) -> Group:
        assert self.group is not None
        return self.group


def _group(n: int = 3, committer_config: GroupConfig = STRICT) -> list[Member]:
    """Member 0 (with `committer_config`) creates the group and adds the others (strict about successors)."""
    members = [Member("m0", committer_config), *(Member(f"m{i}", STRICT) for i in range(1, n))]
    a = members[0]
    a.group = Group.create(SUITE, b"rotation", a.signer, a.credential, config=a.config)
    pending = a.g.commit(add=[m.key_package().key_package for m in members[1:]])
    a.g.merge_pending_commit(pending)
    assert pending.welcome is not None and isinstance(pending.welcome.body, Welcome)
    for m in members[1:]:
        m.group = Group.join(pending.welcome.body, m.bundle, m.signer, config=m.config)
    return members


def _snapshot(g: Group) -> tuple[object, ...]:
    st = g.state
    return (g.epoch, g.epoch_authenticator, st.tree.tree_hash(g.cs), st.interim_transcript_hash,
            repr(st.secret_tree), dict(st.proposals), dict(st.private.keys), g.signature_key)


def _leaf(g: Group, index: int) -> tuple[bytes, Credential]:
    leaf = g.tree.leaf(LeafIndex(index))
    assert leaf is not None
    return leaf.signature_key, leaf.credential


def _rotate(a: Member, others: list[Member], credential: bytes = b"m0#2") -> crypto.Ed25519Signer:
    """Member `a` commits a new key and credential; everyone else processes and merges it; `a` merges last."""
    new, current = crypto.Ed25519Signer.generate(), a.g.signature_key
    pending = a.g.commit(new_signer=new, new_credential=Credential.basic(credential))
    assert a.g.signature_key == current  # not before the merge
    for m in others:
        staged = m.g.process(pending.message.to_bytes())
        assert isinstance(staged, StagedCommit)
        m.g.merge_staged_commit(staged)
    a.g.merge_pending_commit(pending)
    return new


def _read(m: Member, msg: MLSMessage) -> bytes:
    result = m.g.process(msg.to_bytes())
    assert isinstance(result, ApplicationMessage)
    return result.data


def test_rotation_commit_is_accepted_and_the_tree_holds_the_new_key() -> None:
    a, b, c = _group()
    old_epoch = a.g.epoch
    new = _rotate(a, [b, c])
    for m in (a, b, c):
        assert m.g.epoch == old_epoch + 1
        assert _leaf(m.g, 0) == (new.public_key, Credential.basic(b"m0#2"))
    assert a.g.signature_key == new.public_key
    assert a.g.epoch_authenticator == b.g.epoch_authenticator == c.g.epoch_authenticator
    # The tree everyone agrees on is valid as a whole (what a later joiner checks).
    b.g.tree.validate(b.cs, b.g.group_id, b.g.context.extensions, STRICT.identity_validator)


def test_after_the_rotation_the_new_key_signs_and_the_old_key_is_refused() -> None:
    a, b, c = _group()
    old = a.signer
    new = _rotate(a, [b, c])
    assert _read(b, a.g.encrypt_application(b"signed by the new key")) == b"signed by the new key"
    # Both directions: b's messages still reach a.
    assert _read(a, b.g.encrypt_application(b"hello back")) == b"hello back"
    # A message from leaf 0 signed with the retired key (as a thief of that key would send) is refused.
    a.g._signer = old  # test only: make the group sign with the old key
    forged = a.g.encrypt_application(b"signed by the old key")
    before = _snapshot(c.g)
    with pytest.raises(MlsError):
        c.g.process(forged.to_bytes())
    assert _snapshot(c.g) == before
    a.g._signer = new
    assert _read(c, a.g.encrypt_application(b"new key again")) == b"new key again"


def test_a_rotation_to_another_identity_is_refused_and_changes_nothing() -> None:
    # The committer's own check would refuse it; a permissive (malicious) committer sends it anyway.
    a, b, _c = _group(committer_config=GroupConfig())
    pending = a.g.commit(new_signer=crypto.Ed25519Signer.generate(), new_credential=Credential.basic(b"mallory#1"))
    before = _snapshot(b.g)
    with pytest.raises(MlsCredentialError, match="not the same client"):
        b.g.process(pending.message.to_bytes())
    assert _snapshot(b.g) == before
    assert _leaf(b.g, 0) == (a.signer.public_key, a.credential)
    # The honest path: the committer's own validator refuses to create it.
    strict = Group(a.g.cs, a.g.state, a.signer, STRICT)
    with pytest.raises(MlsCredentialError):
        strict.commit(new_signer=crypto.Ed25519Signer.generate(), new_credential=Credential.basic(b"mallory#1"))


class _OldKeySigns:
    """Claims the new public key but signs with the old private key."""

    def __init__(self, claimed: bytes, actual: crypto.Ed25519Signer) -> None:
        self.public_key = claimed
        self._actual = actual

    def sign(self, data: bytes) -> bytes:
        return self._actual.sign(data)


def test_a_new_leaf_signed_by_the_old_key_is_refused() -> None:
    a, b, _c = _group()
    liar = _OldKeySigns(crypto.Ed25519Signer.generate().public_key, a.signer)
    pending = a.g.commit(new_signer=liar, new_credential=Credential.basic(b"m0#2"))
    before = _snapshot(b.g)
    with pytest.raises(MlsError, match="signature"):
        b.g.process(pending.message.to_bytes())
    assert _snapshot(b.g) == before


def test_the_commit_itself_must_be_signed_by_the_current_key() -> None:
    """A rotation commit signed (FramedContent) with the new key instead of the leaf's current one is refused."""
    a, b, _c = _group()
    new = crypto.Ed25519Signer.generate()
    impostor = Group(a.g.cs, a.g.state, new, a.config)  # signs everything with the new key
    pending = impostor.commit(new_signer=new, new_credential=Credential.basic(b"m0#2"))
    before = _snapshot(b.g)
    with pytest.raises(MlsError):
        b.g.process(pending.message.to_bytes())
    assert _snapshot(b.g) == before


def test_a_lost_rotation_keeps_the_old_key() -> None:
    """Our rotation commit lost the epoch to another member's commit: we still sign with the old key."""
    a, b, c = _group()
    a.g.commit(new_signer=crypto.Ed25519Signer.generate(), new_credential=Credential.basic(b"m0#2"))
    winner = b.g.commit()
    b.g.merge_pending_commit(winner)
    for m in (a, c):
        staged = m.g.process(winner.message.to_bytes())
        assert isinstance(staged, StagedCommit)
        m.g.merge_staged_commit(staged)
    assert a.g.signature_key == a.signer.public_key
    assert _leaf(c.g, 0) == (a.signer.public_key, a.credential)
    assert _read(c, a.g.encrypt_application(b"still the old key")) == b"still the old key"
    new = _rotate(a, [b, c])  # the retry wins
    assert _leaf(c.g, 0)[0] == new.public_key


def test_rotation_with_adds_welcomes_new_members_with_the_new_key() -> None:
    """A rotation in the same commit as an Add: the GroupInfo in the Welcome is signed by the new key."""
    a, b = _group(2)
    d = Member("m3", STRICT)
    new = crypto.Ed25519Signer.generate()
    pending = a.g.commit(add=[d.key_package().key_package], new_signer=new,
                         new_credential=Credential.basic(b"m0#2"))
    staged = b.g.process(pending.message.to_bytes())
    assert isinstance(staged, StagedCommit)
    b.g.merge_staged_commit(staged)
    a.g.merge_pending_commit(pending)
    assert pending.welcome is not None and isinstance(pending.welcome.body, Welcome)
    d.group = Group.join(pending.welcome.body, d.bundle, d.signer, config=d.config)
    assert _leaf(d.g, 0)[0] == new.public_key
    assert d.g.epoch_authenticator == a.g.epoch_authenticator
    assert _read(d, a.g.encrypt_application(b"welcome")) == b"welcome"


def test_save_and_restore_across_the_rotation() -> None:
    a, b, c = _group()
    old = a.signer
    new = crypto.Ed25519Signer.generate()
    pending = a.g.commit(new_signer=new, new_credential=Credential.basic(b"m0#2"))
    # Saved with the commit in flight: the leaf still holds the old key.
    before_merge = group_to_bytes(a.g)
    assert group_from_bytes(before_merge, [new, old], STRICT).signature_key == old.public_key
    for m in (b, c):
        staged = m.g.process(pending.message.to_bytes())
        assert isinstance(staged, StagedCommit)
        m.g.merge_staged_commit(staged)
    a.g.merge_pending_commit(pending)
    saved_a, saved_b = group_to_bytes(a.g), group_to_bytes(b.g)
    with pytest.raises(MlsError, match="signer"):
        group_from_bytes(saved_a, old, STRICT)
    a.group = group_from_bytes(saved_a, [old, new], STRICT)
    b.group = group_from_bytes(saved_b, b.signer, STRICT)
    assert a.g.signature_key == new.public_key
    assert _leaf(b.g, 0)[0] == new.public_key
    assert _read(b, a.g.encrypt_application(b"after restart")) == b"after restart"
    assert _read(a, b.g.encrypt_application(b"and back")) == b"and back"
    # The restored group keeps rotating: a second rotation from the restored state.
    newer = _rotate(a, [b, c], b"m0#3")
    assert _leaf(c.g, 0) == (newer.public_key, Credential.basic(b"m0#3"))


def _update_leaf(a: Member, signer: crypto.Ed25519Signer, credential: Credential) -> LeafNode:
    old = a.g.tree.leaf(a.g.own_leaf)
    assert old is not None
    _, enc_pub = a.cs.derive_key_pair(b"\x07" * 32)
    return sign_leaf_node(signer, LeafNode(enc_pub, signer.public_key, credential, old.capabilities,
                                           LeafNodeSource.UPDATE, None, None, old.extensions),
                          a.g.group_id, a.g.own_leaf)


@pytest.mark.parametrize(("credential", "accepted"), [(b"m0#2", True), (b"mallory#1", False)])
def test_an_update_proposal_changing_the_credential_is_checked_too(credential: bytes, accepted: bool) -> None:
    """The same successor rule for an Update proposal whose leaf has a new key and credential (RFC 9420 5.3.1):
    the member committing it, and every member processing that commit, apply it."""
    a, b, c = _group()
    new = crypto.Ed25519Signer.generate()
    proposal = a.g._send_proposal(Update(_update_leaf(a, new, Credential.basic(credential))), b"")  # test only
    for m in (b, c):
        m.g.process(proposal.to_bytes())
    if not accepted:
        with pytest.raises(MlsCredentialError, match="not the same client"):
            b.g.commit()
        # A permissive committer includes it anyway: c refuses the commit and stays as it was.
        cheat = Group(b.g.cs, b.g.state, b.signer, GroupConfig())
        pending = cheat.commit()
        before = _snapshot(c.g)
        with pytest.raises(MlsCredentialError, match="not the same client"):
            c.g.process(pending.message.to_bytes())
        assert _snapshot(c.g) == before
        return
    pending = b.g.commit()
    staged = c.g.process(pending.message.to_bytes())
    assert isinstance(staged, StagedCommit)
    c.g.merge_staged_commit(staged)
    assert _leaf(c.g, 0) == (new.public_key, Credential.basic(credential))
