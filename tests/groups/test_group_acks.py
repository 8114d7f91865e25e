"""End-to-end group acknowledgements, in process (real stores, fleet credentials, MLS and the relay's
DeliveryService; the network is the in-memory stand-in of test_groups_service, here also carrying the GroupAck
envelopes a member gateway sends back). The real-process fault runs are in test_groups_faults.py.

Promised: a sender keeps a group message for each member device until that device acknowledges it; what the
"relay" lost is resent to that device only; a resend is delivered once and acknowledged again; an ack that does
not verify (forged by the relay or another device) is refused and audited and releases nothing; a malicious
member's forged commit or replayed message is refused, audited and changes no member's state.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.groups import Groups
from gateway.groups_identity import SUITE, capabilities
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.group_ack import GroupAck, GroupAckError, message_id
from gateway.protocol.link import GroupResultReceived
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.crypto import Ed25519Signer
from gateway.protocol.mls.group import Group, GroupConfig
from gateway.protocol.mls.group_persist import group_from_bytes
from tests.groups.test_groups_service import FakeLink, FakeRelay, bridge, make_gateway, settle
from tests.relay.conftest import make_fleet


class AckLink(FakeLink):
    """FakeLink plus `send` (GroupAck envelopes) and a switch that loses group sends to chosen devices."""

    lose_to: set[str]
    sent_to: list[str]

    async def group_send(self, devices: list[str], envelope_id: bytes, message: bytes, *, resend: bool = False
                         ) -> GroupResultReceived:
        self.sent_to.extend(devices)
        kept = [d for d in devices if d not in self.lose_to]
        return await super().group_send(kept, envelope_id, message, resend=resend) if kept else \
            GroupResultReceived(0, self.relay.ds.check(message, resend=resend).status, 0, ())

    async def send(self, envelopes: list[Envelope]) -> None:
        for env in envelopes:
            asyncio.get_running_loop().create_task(self.relay.gateways[env.recipient].on_envelopes([env]))


@pytest.fixture
async def trio(tmp_path: Path) -> Any:
    fleet, relay = make_fleet(), FakeRelay()
    gws = []
    for d, a in (("dev-a", "a1"), ("dev-b", "b1"), ("dev-c", "c1")):
        gw = await make_gateway(relay, fleet, tmp_path, d, [a])
        link = AckLink(relay, d)
        link.lose_to, link.sent_to = set(), []
        gw.link = link  # type: ignore[assignment]
        gws.append(gw)
    a, b, c = gws
    a.create("a1", "g")
    await a.change("a1", "g", add=["dev-b/b1", "dev-c/c1"])
    await until(lambda: not a.outbox)
    yield a, b, c
    for g in gws:
        for t in list(g._tasks):
            t.cancel()
        g.store.close()


async def until(cond: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def link(gw: Groups) -> AckLink:
    assert isinstance(gw.link, AckLink)
    return gw.link


def audit_types(gw: Groups) -> list[str]:
    return [json.loads(json.dumps(e.event))["type"] for e in gw.store.audit.entries()]


async def test_outbox_entry_lives_until_every_device_acked(trio: Any) -> None:
    a, b, c = trio
    a.send("a1", "g", b"one")
    assert len(a.outbox) == 1
    entry = next(iter(a.outbox.values()))
    assert sorted(entry.devices) == ["dev-b", "dev-c"]
    await until(lambda: not a.outbox)  # both acked: gone from memory and from the store
    assert a.records.outbox() == []
    assert a.counters.acks_received >= 2 and b.counters.acks_sent >= 1 and c.counters.acks_sent >= 1
    assert bridge(b).inbox("b1")[-1] == (b"one", "dev-a/a1") and bridge(c).inbox("c1")[-1] == (b"one", "dev-a/a1")


async def test_lost_by_the_relay_is_resent_to_that_device_only_and_delivered_once(trio: Any) -> None:
    a, b, c = trio
    link(a).lose_to = {"dev-c"}
    a.send("a1", "g", b"two")
    await until(lambda: bridge(b).inbox("b1")[-1:] == [(b"two", "dev-a/a1")])
    entry = next(iter(a.outbox.values()))
    assert entry.devices == ["dev-c"]  # b acked, c never got it
    link(a).lose_to = set()
    link(a).sent_to.clear()
    entry.next_ms = 0  # the backoff elapsed, and dev-c has been silent since
    a._dstate.last_ack_ms.clear()
    a._wake.set()
    await until(lambda: not a.outbox)
    assert link(a).sent_to == ["dev-c"]
    assert [p for p, _ in bridge(c).inbox("c1")].count(b"two") == 1
    assert [p for p, _ in bridge(b).inbox("b1")].count(b"two") == 1


async def test_a_resend_is_a_duplicate_dropped_and_acked_again(trio: Any) -> None:
    a, b, _ = trio
    a.send("a1", "g", b"three")
    entry = next(iter(a.outbox.values()))
    msg = entry.message
    await until(lambda: not a.outbox)
    acks_before = b.counters.acks_sent
    for _ in range(3):  # the sender did not see the ack (say) and resends
        await b.on_envelopes([Envelope(EnvelopeKind.GROUP, entry.entry_id, "dev-a", "dev-b", msg)])
        await b._flush_acks()  # (acks of one id queued together go out once)
    await b._flush_inbox()
    await settle()
    assert [p for p, _ in bridge(b).inbox("b1")].count(b"three") == 1
    assert b.counters.duplicates == 3 and b.counters.acks_sent == acks_before + 3


async def test_forged_acks_release_nothing_and_are_audited(trio: Any) -> None:
    a, _b, c = trio
    link(a).lose_to = {"dev-b", "dev-c"}  # nothing arrives, so nothing is genuinely acked
    a.send("a1", "g", b"four")
    await settle()
    entry = next(iter(a.outbox.values()))
    ids = (entry.msg_id,)
    # The relay (or dev-c) claims dev-b acked: signed by a key that is not b1's leaf key
    relay_made = GroupAck(b"g", "dev-b/b1", "dev-a", ids).signed(Ed25519Signer(bytes(32)))
    a.receive("dev-b", relay_made.to_bytes())
    # dev-c signs with its own genuine leaf key but names b1
    c_made = GroupAck(b"g", "dev-b/b1", "dev-a", ids).signed(c.signers["c1"].signer)
    a.receive("dev-b", c_made.to_bytes())
    # a genuine ack from c, but the envelope claims dev-b sent it
    genuine_c = GroupAck(b"g", "dev-c/c1", "dev-a", ids).signed(c.signers["c1"].signer)
    a.receive("dev-b", genuine_c.to_bytes())
    # an ack for another device's messages
    a.receive("dev-c", GroupAck(b"g", "dev-c/c1", "dev-b", ids).signed(c.signers["c1"].signer).to_bytes())
    a.receive("dev-c", b"GA\x01garbage")
    assert sorted(entry.devices) == ["dev-b", "dev-c"] and entry.entry_id in a.outbox
    assert a.counters.acks_refused == 5 and audit_types(a).count("group.ack_refused") == 5
    # the genuine ack from the right envelope sender releases dev-c
    a.receive("dev-c", genuine_c.to_bytes())
    assert entry.devices == ["dev-b"]


async def test_devices_that_leave_are_not_waited_for(trio: Any) -> None:
    a, _, c = trio
    link(a).lose_to = {"dev-c"}
    a.send("a1", "g", b"five")
    await until(lambda: [e.devices for e in a.outbox.values()] == [["dev-c"]])
    link(a).lose_to = set()
    await a.change("a1", "g", remove=["dev-c/c1"])
    await until(lambda: ("c1", "g") not in c.members)
    for e in a.outbox.values():
        e.next_ms = 0
    a._dstate.last_ack_ms.clear()
    a._wake.set()
    await until(lambda: not a.outbox)
    assert [p for p, _ in bridge(c).inbox("c1")].count(b"five") == 0


async def test_a_device_that_keeps_acking_is_not_resent_to_on_a_timer_but_its_gaps_are(trio: Any) -> None:
    a, _, c = trio
    link(a).lose_to = {"dev-c"}
    a.send("a1", "g", b"six")
    await until(lambda: [e.devices for e in a.outbox.values()] == [["dev-c"]])
    link(a).sent_to.clear()
    entry = next(iter(a.outbox.values()))
    a._dstate.last_ack_ms["dev-c"] = a.now_ms()  # dev-c acknowledged something just now: alive, maybe busy
    entry.next_ms = 0
    a._wake.set()
    await settle()
    assert link(a).sent_to == []  # no resend on the timer; postponed
    link(a).lose_to = set()
    a.send("a1", "g", b"seven")  # dev-c acks it: "six", older and unacknowledged, was lost: resent at once
    await until(lambda: not a.outbox, timeout=3.0)
    assert link(a).sent_to.count("dev-c") == 2
    assert [p for p, _ in bridge(c).inbox("c1")][-2:] == [b"seven", b"six"]


def test_group_ack_layout_byte_by_byte() -> None:
    ack = GroupAck(b"g", "dev-b/b1", "dev-a", (bytes(range(16)),), b"S" * 64)
    assert ack.to_bytes() == (b"GA\x01" + b"\x01g" + b"\x08dev-b/b1" + b"\x05dev-a" + b"\x00\x01" + bytes(range(16))
                              + b"\x00\x40" + b"S" * 64)
    assert GroupAck.from_bytes(ack.to_bytes()) == ack
    for bad in (b"", b"GA", b"GA\x02", ack.to_bytes()[:-1], ack.to_bytes() + b"\x00",
                ack.to_bytes().replace(b"dev-b/b1", b"dev-b-b1")):
        with pytest.raises(GroupAckError):
            GroupAck.from_bytes(bad)
    assert message_id(b"x") == message_id(b"x") != message_id(b"y")


# -- a malicious member device ------------------------------------------------------------------------------------
def _states(*pairs: tuple[Groups, str]) -> list[tuple[int, bytes]]:
    return [(gw.members[(agent, "g")].epoch, gw.members[(agent, "g")].epoch_authenticator) for gw, agent in pairs]


async def test_malicious_member_forged_commits_and_replays_are_refused(trio: Any) -> None:
    a, b, c = trio  # b plays the malicious member device (b1 is a member, not an admin)
    a.send("a1", "g", b"genuine")
    await until(lambda: not a.outbox)
    genuine = bridge(c).inbox("c1")[-1]
    before = _states((a, "a1"), (c, "c1"))
    refused_before = audit_types(a).count("group.message_refused"), audit_types(c).count("group.message_refused")

    # 1. A commit that claims the admin a1's leaf but is signed by b1's key: a1's state loaded with b1's signer.
    raw = a.records.member("a1", "g")
    assert raw is not None
    as_a1 = group_from_bytes(raw, a.signers["a1"].signer, a.mls_config)
    as_a1._signer = b.signers["b1"].signer  # b knows the epoch's secrets (membership key) but not a1's key
    forged_sig = as_a1.commit(now=int(dt.datetime.now(dt.UTC).timestamp())).message.to_bytes()
    # 2. A commit from a non-member: a group of its own with the same id and epoch, a stranger's key.
    stranger = Ed25519Signer(bytes(range(32)))
    outsider = Group.create(SUITE, b"g", stranger, Credential.basic(b"dev-a/a1"), capabilities=capabilities(),
                            config=GroupConfig())
    for _ in range(a.members[("a1", "g")].epoch):
        outsider.merge_pending_commit(outsider.commit())
    non_member = outsider.commit().message.to_bytes()
    # 3. A replay, from b's device, of the application message a1 sent (b captured it as a member).
    replay = _last_app_from(b, "dev-a")

    for target in (a, c):
        for data in (forged_sig, non_member, replay):
            await target.on_envelopes([Envelope(EnvelopeKind.GROUP, bytes(16), "dev-b", target.device, data)])
    await c._flush_inbox()
    assert _states((a, "a1"), (c, "c1")) == before
    assert bridge(c).inbox("c1")[-1] == genuine and [p for p, _ in bridge(c).inbox("c1")].count(b"genuine") == 1
    assert audit_types(a).count("group.message_refused") - refused_before[0] == 3
    assert audit_types(c).count("group.message_refused") - refused_before[1] == 3
    # the group still works: the admin's next commit and message reach everyone
    await a.change("a1", "g", update=True)
    a.send("a1", "g", b"after")
    await until(lambda: not a.outbox and bridge(c).inbox("c1")[-1] == (b"after", "dev-a/a1"))
    assert b.members[("b1", "g")].epoch == c.members[("c1", "g")].epoch == a.members[("a1", "g")].epoch


def _last_app_from(gw: Groups, device: str) -> bytes:
    recent = gw._recent.get("g")
    assert recent, "the member kept no recent group messages"
    return recent[-1]
