"""A 1,000-member group: one commit adds 999 members, a new member joins from the Welcome, follows a commit
with path from the creator, and both exchange messages. (Timings are measured in bench/, not asserted here.)"""

from __future__ import annotations

from gateway.protocol.mls import crypto
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.group import Group
from gateway.protocol.mls.group_state import StagedCommit
from gateway.protocol.mls.key_package_bundle import create_key_package
from gateway.protocol.mls.welcome_structs import Welcome

from .test_group import _data

N = 1000


def test_thousand_member_group() -> None:
    cs = crypto.get_suite(1)
    creator = crypto.Ed25519Signer.generate()
    a = Group.create(1, b"large group", creator, Credential.basic(b"creator"))
    joiners = []
    for i in range(N - 1):
        signer = crypto.Ed25519Signer.generate()
        joiners.append((signer, create_key_package(cs, signer, Credential.basic(b"member-%d" % i))))
    pending = a.commit(add=[bundle.key_package for _, bundle in joiners])
    a.merge_pending_commit(pending)
    assert len(a.members()) == N and a.tree.n_leaves == 1024
    assert pending.welcome is not None and isinstance(pending.welcome.body, Welcome)
    assert len(pending.welcome.body.secrets) == N - 1

    signer, bundle = joiners[N // 2]
    b = Group.join(pending.welcome.body, bundle, signer)
    assert b.epoch_authenticator == a.epoch_authenticator and b.own_leaf == N // 2 + 1  # creator is leaf 0

    path_commit = a.commit()
    a.merge_pending_commit(path_commit)
    staged = b.process(path_commit.message.to_bytes())
    assert isinstance(staged, StagedCommit)
    b.merge_staged_commit(staged)
    assert b.epoch_authenticator == a.epoch_authenticator

    msg = b.encrypt_application(b"x" * 1024)
    assert _data(a.process(msg.to_bytes())) == b"x" * 1024
