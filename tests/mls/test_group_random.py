"""Seeded random group histories (in the spirit of the official passive-client-random scenarios): members
add, remove, update, propose by reference, commit with and without path, in both wire formats, and every
member, including a passive one that only processes, ends each epoch with the same authenticator and tree."""

from __future__ import annotations

import random

import pytest

from gateway.protocol.mls.group import GroupConfig
from gateway.protocol.mls.group_state import ProposalReceived, StagedCommit
from gateway.protocol.mls.proposals import Remove
from gateway.protocol.mls.wire import WireFormat

from .test_group import SUITES, Member, _agree, _group


def _process_all(msg: bytes, members: list[Member], sender: Member) -> None:
    for m in members:
        if m is sender:
            continue
        result = m.g.process(msg)
        if isinstance(result, StagedCommit):
            m.g.merge_staged_commit(result)
        else:
            assert isinstance(result, ProposalReceived)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("wire_format", [WireFormat.PUBLIC_MESSAGE, WireFormat.PRIVATE_MESSAGE])
def test_random_history(suite: int, wire_format: WireFormat) -> None:
    rng = random.Random(f"{suite}-{wire_format}")
    config = GroupConfig(handshake_wire_format=wire_format)
    members = _group(suite, 3, config)
    passive = members[1]
    counter = 0
    removals = 0
    for _step in range(30):
        committer = rng.choice(members)
        others = [m for m in members if m is not committer]
        # Some proposals by reference from random members first.
        n_proposals = rng.randint(0, 2)
        for _ in range(n_proposals):
            proposer = rng.choice(members)
            targets = [m for m in members if m is not proposer and m is not passive and m is not committer]
            if rng.random() < 0.5 and proposer is not committer:
                msg = proposer.g.propose_update().to_bytes()
            elif targets and len(members) > 3:
                victim = rng.choice(targets)
                msg = proposer.g.propose(Remove(victim.g.own_leaf)).to_bytes()
            else:
                continue
            _process_all(msg, members, proposer)
        adds = []
        for _ in range(rng.randint(0, 2)):
            counter += 1
            newcomer = Member(f"n{counter}", suite, config)
            newcomer.key_package()
            adds.append(newcomer)
        remove = []
        candidates = [m for m in members if m is not committer and m is not passive]
        if n_proposals == 0 and len(members) > 4 and rng.random() < 0.4:
            remove = [rng.choice(candidates).g.own_leaf]
        pending = committer.g.commit(add=[m.bundle.key_package for m in adds], remove=remove,
                                     force_path=rng.random() < 0.7)
        committer.g.merge_pending_commit(pending)
        for m in others:
            staged = m.g.process(pending.message.to_bytes())
            assert isinstance(staged, StagedCommit)
            m.g.merge_staged_commit(staged)
        n_before = len(members)
        members = [m for m in members if m.g.active]
        removals += n_before - len(members)
        for newcomer in adds:
            assert pending.welcome is not None
            newcomer.join(pending.welcome)
            members.append(newcomer)
        assert passive in members
        _agree(members)
        sender = rng.choice(members)
        msg = sender.g.encrypt_application(b"epoch %d" % sender.g.epoch).to_bytes()
        for m in members:
            if m is not sender:
                got = m.g.process(msg)
                assert getattr(got, "data", None) == b"epoch %d" % sender.g.epoch
    assert removals > 0 and counter > 0 and len(members) > 3  # the history did add and remove members
