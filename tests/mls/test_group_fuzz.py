"""Fuzzing `Group.process` with corrupted copies of genuine messages (application, proposal, commit, in both
wire formats): every input is either accepted as what it claims to be or refused with an `MlsError`, and a
refused input leaves the member's state exactly as it was. Longer runs: MLS_FUZZ_EXAMPLES=5000."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.group import GroupConfig
from gateway.protocol.mls.proposals import Remove
from gateway.protocol.mls.wire import WireFormat

from .test_group import Member, _group, _snapshot

_CACHE: dict[str, list[tuple[Member, bytes]]] = {}


def _fixture() -> list[tuple[Member, bytes]]:
    if not _CACHE:
        public = _group(1, 3)
        private = _group(3, 3, GroupConfig(handshake_wire_format=WireFormat.PRIVATE_MESSAGE))
        msgs: list[tuple[Member, bytes]] = []
        for a, b, c in (public, private):
            msgs.append((b, a.g.encrypt_application(b"payload", b"aad").to_bytes()))
            msgs.append((b, c.g.propose(Remove(a.g.own_leaf)).to_bytes()))
            msgs.append((b, a.g.commit(include_pending=False).message.to_bytes()))
        _CACHE["msgs"] = msgs
    return _CACHE["msgs"]


@settings(max_examples=int(os.environ.get("MLS_FUZZ_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_messages_are_refused_without_side_effects(data: st.DataObject) -> None:
    msgs = _fixture()
    receiver, msg = data.draw(st.sampled_from(msgs))
    pos = data.draw(st.integers(0, len(msg) - 1))
    mode = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if mode == "flip":
        bad = msg[:pos] + bytes([msg[pos] ^ data.draw(st.integers(1, 255))]) + msg[pos + 1:]
    elif mode == "truncate":
        bad = msg[:pos]
    elif mode == "extend":
        bad = msg + data.draw(st.binary(min_size=1, max_size=16))
    else:
        bad = msg[:pos] + data.draw(st.binary(max_size=16)) + msg[pos:]
    assume(bad != msg)
    before = _snapshot(receiver.g)
    try:
        receiver.g.process(bad)
    except MlsError:
        assert _snapshot(receiver.g) == before
        return
    # Every byte of both wire formats is authenticated or strictly parsed, so nothing corrupted may pass.
    raise AssertionError(f"a corrupted message was accepted ({mode} at {pos})")


_WELCOME: dict[str, tuple[Member, bytes]] = {}


def _welcome_fixture() -> tuple[Member, bytes]:
    if not _WELCOME:
        a, _b = _group(1, 2)
        c = Member("c", 1)
        pending = a.g.commit(add=[c.key_package().key_package])
        assert pending.welcome is not None
        _WELCOME["w"] = (c, pending.welcome.to_bytes())
    return _WELCOME["w"]


@settings(max_examples=int(os.environ.get("MLS_FUZZ_EXAMPLES", "100")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_welcome_is_refused(data: st.DataObject) -> None:
    from gateway.protocol.mls.framing import MLSMessage
    from gateway.protocol.mls.group import Group
    from gateway.protocol.mls.welcome_structs import Welcome

    joiner, raw = _welcome_fixture()
    pos = data.draw(st.integers(0, len(raw) - 1))
    bad = raw[:pos] + bytes([raw[pos] ^ data.draw(st.integers(1, 255))]) + raw[pos + 1:]
    try:
        msg = MLSMessage.from_bytes(bad)
        if not isinstance(msg.body, Welcome):
            return  # the flip turned it into another (valid) message type: not a Welcome to join from
        Group.join(msg.body, joiner.bundle, joiner.signer)
    except MlsError:
        return
    raise AssertionError(f"a corrupted Welcome was accepted (byte {pos})")
