"""External joins (RFC 9420 section 12.4.3.2): a new client joins from a published GroupInfo with an external
commit that every member processes; a member can resynchronise by rejoining and removing its old leaf; a
forged external commit changes nothing."""

from __future__ import annotations

import pytest

from gateway.protocol.mls import crypto
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.external_join import join_external
from gateway.protocol.mls.framing import MLSMessage, PublicMessage
from gateway.protocol.mls.welcome_structs import GroupInfo

from .test_group import SUITES, Member, _agree, _data, _deliver, _group, _snapshot


@pytest.mark.parametrize("suite", SUITES)
def test_external_join_and_resync(suite: int) -> None:
    a, b = _group(suite, 2)
    gi = GroupInfo.from_bytes(a.g.group_info().to_bytes())
    c = Member("c", suite)
    c.group, commit = join_external(gi, c.signer, c.credential)
    assert isinstance(commit.body, PublicMessage) and commit.body.membership_tag is None
    _deliver(commit, [a, b])
    _agree([a, b, c])
    assert len(a.g.members()) == 3
    msg = c.g.encrypt_application(b"joined").to_bytes()
    assert _data(a.g.process(msg)) == b"joined"

    # b lost its state: it rejoins with the same identity and removes its stale leaf.
    old_leaf = b.g.own_leaf
    gi = GroupInfo.from_bytes(c.g.group_info().to_bytes())
    b2 = Member("b", suite)
    b2.signer, b2.credential = b.signer, b.credential
    b2.group, commit = join_external(gi, b2.signer, b2.credential, remove_prior=old_leaf)
    _deliver(commit, [a, c])
    _agree([a, b2, c])
    assert len(a.g.members()) == 3


@pytest.mark.parametrize("suite", SUITES)
def test_external_join_needs_external_pub_and_valid_signature(suite: int) -> None:
    a, _b = _group(suite, 2)
    c = Member("c", suite)
    with pytest.raises(MlsError):
        join_external(a.g.group_info(with_external_pub=False), c.signer, c.credential)
    gi = a.g.group_info()
    forged = GroupInfo(gi.group_context, gi.extensions, gi.confirmation_tag, gi.signer, bytes(64))
    with pytest.raises(MlsError):
        join_external(forged, c.signer, c.credential)


@pytest.mark.parametrize("suite", SUITES)
def test_forged_external_commit_changes_nothing(suite: int) -> None:
    a, b = _group(suite, 2)
    c = Member("c", suite)
    _joined, commit = join_external(a.g.group_info(), c.signer, c.credential)
    body = commit.body
    assert isinstance(body, PublicMessage)
    # Another client re-signs nothing but swaps in its own signature bytes: the signature check must fail.
    bad_auth = type(body.auth)(crypto.Ed25519Signer.generate().sign(b"x"), body.auth.confirmation_tag)
    forged = MLSMessage(PublicMessage(body.content, bad_auth, None))
    before = _snapshot(b.g)
    with pytest.raises(MlsError):
        b.g.process(forged.to_bytes())
    assert _snapshot(b.g) == before
    _deliver(commit, [b])


@pytest.mark.parametrize("suite", SUITES)
def test_external_sender_remove_and_group_context_extensions(suite: int) -> None:
    from gateway.protocol.mls.credentials import Credential
    from gateway.protocol.mls.extensions import ExternalSender, ExternalSenders, RequiredCapabilities
    from gateway.protocol.mls.external_join import external_sender_proposal
    from gateway.protocol.mls.group_state import ProposalReceived
    from gateway.protocol.mls.proposals import Remove

    a, b, c = _group(suite, 3)
    ds = crypto.Ed25519Signer.generate()
    exts = (ExternalSenders((ExternalSender(ds.public_key, Credential.basic(b"relay")),)).to_extension(),
            RequiredCapabilities().to_extension())
    pending = a.g.commit(extensions=exts)
    a.g.merge_pending_commit(pending)
    _deliver(pending.message, [b, c])
    _agree([a, b, c])
    assert a.g.context.extensions == exts

    proposal = external_sender_proposal(ds, 0, a.g.context, Remove(c.g.own_leaf))
    for m in (a, b):
        got = m.g.process(proposal.to_bytes())
        assert isinstance(got, ProposalReceived) and got.sender.index == 0
    impostor = external_sender_proposal(crypto.Ed25519Signer.generate(), 0, a.g.context, Remove(b.g.own_leaf))
    before = _snapshot(a.g)
    with pytest.raises(MlsError):
        a.g.process(impostor.to_bytes())
    assert _snapshot(a.g) == before
    pending = b.g.commit()
    b.g.merge_pending_commit(pending)
    _deliver(pending.message, [a])
    _agree([a, b])
    assert len(a.g.members()) == 2
