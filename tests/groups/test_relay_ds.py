"""The relay as MLS Delivery Service, over real WSS with RelayLink clients: one GROUP_SEND fanned out once per
device, exactly one commit per epoch, resends only of the accepted commit, per-agent KeyPackage directory."""

from __future__ import annotations

import asyncio
import os

import pytest

from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.group_ack import GroupAck, is_group_ack
from gateway.protocol.link import Delivered, GroupStatus, LinkLimits, UndeliverableReason
from gateway.protocol.link_frames import (
    GroupResult,
    GroupSend,
    KeyPackageFetch,
    KeyPackagesPublish,
    decode_frame,
    encode_frame,
)
from gateway.protocol.mls import crypto
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.framing import MLSMessage
from gateway.protocol.mls.group import Group
from gateway.protocol.mls.key_package_bundle import create_key_package
from relay.ds import ContentType, DeliveryService, WireFormat, read_header
from tests.relay.conftest import RelayEnv, next_event


def _two_member_group() -> tuple[Group, Group, MLSMessage]:
    cs = crypto.get_suite(1)
    sa, sb = crypto.Ed25519Signer.generate(), crypto.Ed25519Signer.generate()
    a = Group.create(1, b"team-" + os.urandom(4), sa, Credential.basic(b"a"))
    kb = create_key_package(cs, sb, Credential.basic(b"b"))
    pending = a.commit(add=[kb.key_package])
    a.merge_pending_commit(pending)
    assert pending.welcome is not None
    b = Group.join(pending.welcome.body, kb, sb)  # type: ignore[arg-type]
    return a, b, pending.welcome


def test_header_parsing_reads_group_epoch_and_content_type() -> None:
    a, b, welcome = _two_member_group()
    app = a.encrypt_application(b"hello").to_bytes()
    h = read_header(app)
    assert (h.wire_format, h.group_id, h.epoch, h.content_type) == (
        WireFormat.PRIVATE_MESSAGE, a.group_id, 1, ContentType.APPLICATION)
    commit = b.commit().message.to_bytes()
    h = read_header(commit)
    assert (h.wire_format, h.group_id, h.epoch, h.content_type) == (
        WireFormat.PUBLIC_MESSAGE, a.group_id, 1, ContentType.COMMIT)
    assert read_header(welcome.to_bytes()).group_id is None


def test_exactly_one_commit_per_epoch_and_resend_only_of_the_winner() -> None:
    a, b, _ = _two_member_group()
    ds = DeliveryService()
    ca, cb = a.commit().message.to_bytes(), b.commit().message.to_bytes()
    first = ds.check(ca)
    assert first.accepted and first.epoch == 2
    lost = ds.check(cb)
    assert lost.status is GroupStatus.STALE_EPOCH and lost.epoch == 2
    assert ds.check(ca, resend=True).accepted
    assert ds.check(cb, resend=True).status is GroupStatus.STALE_EPOCH
    assert ds.check(ca).status is GroupStatus.STALE_EPOCH  # not twice as a fresh commit
    assert ds.check(b"\x00\x01garbage").status is GroupStatus.MALFORMED
    assert ds.check(a.encrypt_application(b"x").to_bytes()).accepted  # application data is not ordered
    assert (ds.commits_accepted, ds.commits_refused) == (1, 3)


def test_ds_state_is_bounded() -> None:
    ds = DeliveryService(max_groups=3, epochs_kept=2)
    groups = [_two_member_group()[0] for _ in range(4)]
    for g in groups:
        assert ds.check(g.commit().message.to_bytes()).accepted
    assert len(ds) == 3 and ds.epoch_of(groups[0].group_id) == 0


@pytest.mark.parametrize("frame", [
    GroupSend(7, 1, b"i" * 16, ("dev-a", "dev-b"), b"mls"),
    GroupResult(7, GroupStatus.STALE_EPOCH, 5, (("dev-c", UndeliverableReason.OFFLINE),)),
    KeyPackagesPublish(9, "planner", b"lr", (b"k1", b"k2")),
    KeyPackageFetch(9, "dev-a", "planner"),
])
def test_group_frames_round_trip(frame: object) -> None:
    data = encode_frame(frame)  # type: ignore[arg-type]
    assert decode_frame(data, LinkLimits()) == frame


def test_group_send_layout_byte_by_byte() -> None:
    data = encode_frame(GroupSend(1, 0, b"\xaa" * 16, ("d1",), b"M"))
    assert data.hex() == "0113" + "00000001" + "00" + "aa" * 16 + "0001" + "02" + b"d1".hex() + "00000001" + "4d"


async def test_one_send_fans_out_once_per_device(env: RelayEnv) -> None:
    await env.start()
    la, lb, lc = [await env.link(env.fleet.device(n)) for n in ("dev-a", "dev-b", "dev-c")]
    a, _, _ = _two_member_group()
    msg = a.encrypt_application(b"to all").to_bytes()
    eid = os.urandom(16)
    res = await la.group_send(["dev-b", "dev-c", "dev-b", "dev-a", "dev-off"], eid, msg)
    assert res.status is GroupStatus.ACCEPTED
    assert res.undelivered == (("dev-off", UndeliverableReason.OFFLINE),)
    for link, name in ((lb, "dev-b"), (lc, "dev-c")):
        (got,) = (await next_event(link, Delivered)).envelopes
        assert (got.kind, got.sender, got.recipient, got.envelope_id, got.ciphertext) == (
            EnvelopeKind.GROUP, "dev-a", name, eid, msg)
    with pytest.raises(TimeoutError):  # a duplicate device in the list gets one copy, the sender none
        await next_event(lb, Delivered, timeout=0.3)


async def test_concurrent_commits_one_winner_loser_told(env: RelayEnv) -> None:
    await env.start()
    la, lb, lc = [await env.link(env.fleet.device(n)) for n in ("dev-a", "dev-b", "dev-c")]
    a, b, _ = _two_member_group()
    ca, cb = a.commit(), b.commit()
    ra, rb = await asyncio.gather(la.group_send(["dev-b", "dev-c"], os.urandom(16), ca.message.to_bytes()),
                                  lb.group_send(["dev-a", "dev-c"], os.urandom(16), cb.message.to_bytes()))
    statuses = sorted(r.status for r in (ra, rb))
    assert statuses == [GroupStatus.ACCEPTED, GroupStatus.STALE_EPOCH]
    assert ra.epoch == rb.epoch == 2
    winner = ca if ra.status is GroupStatus.ACCEPTED else cb
    (got,) = (await next_event(lc, Delivered)).envelopes  # the third device sees only the winner
    assert got.ciphertext == winner.message.to_bytes()
    with pytest.raises(TimeoutError):
        await next_event(lc, Delivered, timeout=0.3)


async def test_key_packages_per_agent_one_time_then_last_resort(env: RelayEnv) -> None:
    await env.start()
    la, lb = await env.link(env.fleet.device("dev-a")), await env.link(env.fleet.device("dev-b"))
    assert await la.publish_key_packages("planner", b"last-resort", [b"kp1", b"kp2"]) == 2
    assert await la.publish_key_packages("sensor", b"", [b"kp-s"]) == 1
    got = [await lb.fetch_key_package("dev-a", "planner") for _ in range(3)]
    assert [g.one_time for g in got] == [b"kp1", b"kp2", None]
    assert all(g.bundle == b"last-resort" for g in got)
    s = await lb.fetch_key_package("dev-a", "sensor")
    assert (s.one_time, s.bundle) == (b"kp-s", None)
    assert await la.publish_key_packages("planner", b"", [b"kp3"]) == 1  # the last resort is kept
    assert (await lb.fetch_key_package("dev-a", "planner")).bundle == b"last-resort"


async def test_group_acks_travel_as_group_envelopes_with_the_authenticated_sender(env: RelayEnv) -> None:
    """A GroupAck is an ordinary GROUP envelope in an ENVELOPES frame: the relay routes it unread, and the
    recipient sees the sender the relay authenticated (the sending gateway checks it against the acker)."""
    await env.start()
    la, lb = await env.link(env.fleet.device("dev-a")), await env.link(env.fleet.device("dev-b"))
    ack = GroupAck(b"team", "dev-b/b1", "dev-a", (os.urandom(16),)).signed(crypto.Ed25519Signer.generate())
    await lb.send([Envelope(EnvelopeKind.GROUP, os.urandom(16), "dev-b", "dev-a", ack.to_bytes())])
    (got,) = (await next_event(la, Delivered)).envelopes
    assert (got.kind, got.sender) == (EnvelopeKind.GROUP, "dev-b")
    assert is_group_ack(got.ciphertext) and GroupAck.from_bytes(got.ciphertext) == ack
    assert env.relay is not None and len(env.relay.ds) == 0  # not an MLS message: the DS never saw it
