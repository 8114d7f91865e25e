"""Group state persistence: a restored member continues the group exactly (same epoch, tree hash, secrets and
consumed keys), and a corrupt blob is refused with our own error type."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.mls.errors import MlsError, MlsReplayError
from gateway.protocol.mls.group import Group
from gateway.protocol.mls.group_persist import group_from_bytes, group_to_bytes
from gateway.protocol.mls.group_state import StagedCommit
from gateway.protocol.mls.proposals import Remove

from .test_group import SUITES, _agree, _data, _deliver, _group


@pytest.mark.parametrize("suite", SUITES)
def test_restored_member_continues_exactly(suite: int) -> None:
    a, b, c = _group(suite, 3)
    old = [a.g.encrypt_application(b"m%d" % i).to_bytes() for i in range(3)]
    assert _data(b.g.process(old[0])) == b"m0"
    assert _data(b.g.process(old[2])) == b"m2"  # generation 1 skipped, kept
    proposal = c.g.propose(Remove(a.g.own_leaf))
    b.g.process(proposal.to_bytes())
    a.g.process(proposal.to_bytes())

    blob = group_to_bytes(b.g)
    restored = group_from_bytes(blob, b.signer, b.g.config)
    assert group_to_bytes(restored) == blob
    assert restored.epoch == b.g.epoch and restored.epoch_authenticator == b.g.epoch_authenticator
    assert restored.state.tree.tree_hash(b.cs) == b.g.state.tree.tree_hash(b.cs)
    assert restored.state.proposals == b.g.state.proposals
    b.group = restored

    with pytest.raises(MlsReplayError):  # consumed before the restart, still consumed after
        b.g.process(old[0])
    assert _data(b.g.process(old[1])) == b"m1"  # the skipped key survived the restart
    pending = c.g.commit()  # commits the cached Remove by reference
    c.g.merge_pending_commit(pending)
    _deliver(pending.message, [b])
    staged = a.g.process(pending.message.to_bytes())
    assert isinstance(staged, StagedCommit) and staged.self_removed
    _agree([b, c])
    late = group_from_bytes(group_to_bytes(b.g), b.signer, b.g.config)  # past epoch restored too
    assert sorted(late.past_epochs()) == [b.g.epoch - 1]
    msg = c.g.encrypt_application(b"after restart").to_bytes()
    assert _data(b.g.process(msg)) == b"after restart"


@pytest.mark.parametrize("suite", SUITES)
def test_restore_refuses_the_wrong_signer(suite: int) -> None:
    a, b = _group(suite, 2)
    with pytest.raises(MlsError):
        group_from_bytes(group_to_bytes(b.g), a.signer, b.g.config)


_BLOB: dict[int, tuple[bytes, object]] = {}


def _blob() -> tuple[bytes, object]:
    if not _BLOB:
        _a, b = _group(1, 2)
        _BLOB[0] = (group_to_bytes(b.g), b.signer)
    return _BLOB[0]


@settings(max_examples=int(os.environ.get("MLS_FUZZ_EXAMPLES", "150")), deadline=None)
@given(st.data())
def test_corrupt_blob_raises_mls_error_or_restores(data: st.DataObject) -> None:
    blob, signer = _blob()
    pos = data.draw(st.integers(0, len(blob) - 1))
    mode = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if mode == "flip":
        bad = blob[:pos] + bytes([blob[pos] ^ data.draw(st.integers(1, 255))]) + blob[pos + 1:]
    elif mode == "truncate":
        bad = blob[:pos]
    else:
        bad = blob + data.draw(st.binary(min_size=1, max_size=8))
    try:
        g = group_from_bytes(bad, signer)  # type: ignore[arg-type]
    except MlsError:
        return
    assert isinstance(g, Group)  # a flip in a secret value still decodes; the structure must be sound
    assert group_to_bytes(g) == bad


@pytest.mark.parametrize("suite", SUITES)
def test_closed_and_pending_update_state_survive_restart(suite: int) -> None:
    from gateway.protocol.mls.proposals import ReInit

    a, b = _group(suite, 2)
    upd = b.g.propose_update()
    a.g.process(upd.to_bytes())
    restored = group_from_bytes(group_to_bytes(b.g), b.signer, b.g.config)
    assert restored.state.pending_update_keys == b.g.state.pending_update_keys
    b.group = restored
    pending = a.g.commit()
    a.g.merge_pending_commit(pending)
    _deliver(pending.message, [b])  # b needs the update's private key it held across the restart
    _agree([a, b])
    pending = a.g.commit(reinit=ReInit(b"next", 1, suite), force_path=False)
    a.g.merge_pending_commit(pending)
    _deliver(pending.message, [b])
    again = group_from_bytes(group_to_bytes(b.g), b.signer, b.g.config)
    assert again.reinit == ReInit(b"next", 1, suite)
    with pytest.raises(MlsError):
        again.encrypt_application(b"closed")
