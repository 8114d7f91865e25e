"""The GroupService in process: real stores, fleet credentials and the relay's DeliveryService, with the network
and the broker replaced by in-memory stand-ins. Fast checks of the rules a well-behaved gateway never breaks
and so the integration tests cannot show: a member that is not an admin cannot change the group, a member
cannot send as another agent, and garbage or messages for unknown groups are dropped without harm."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest

from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.identity.delegation import DelegatedKey, delegate
from gateway.protocol.identity.names import AgentName, DeviceName
from gateway.protocol.identity.trust import FleetTrust
from gateway.protocol.link import GroupResultReceived, PrekeysReceived
from gateway.protocol.link_frames import DirectoryKind
from gateway.store import Store
from relay.directory import Directory
from relay.ds import DeliveryService
from tests.relay.conftest import FLEET, Device, Fleet, make_fleet
from tests.store.conftest import SoftStorageKey

if TYPE_CHECKING:
    from gateway.groups import Groups

EVERYONE = ["dev-a/*", "dev-b/*", "dev-c/*"]


class FakeRelay:
    def __init__(self) -> None:
        self.ds = DeliveryService()
        self.directory = Directory()
        self.gateways: dict[str, Groups] = {}


class FakeLink:
    """RelayLink's group calls against the relay's own DeliveryService and Directory; delivery is a task."""

    def __init__(self, relay: FakeRelay, device: str) -> None:
        self.relay, self.device = relay, device
        self.state = SimpleNamespace(value="ready")

    async def group_send(self, devices: list[str], envelope_id: bytes, message: bytes, *, resend: bool = False
                         ) -> GroupResultReceived:
        verdict = self.relay.ds.check(message, resend=resend)
        if verdict.accepted:
            for d in devices:
                env = Envelope(EnvelopeKind.GROUP, envelope_id, self.device, d, message)
                asyncio.get_running_loop().create_task(self.relay.gateways[d].on_envelopes([env]))
        return GroupResultReceived(0, verdict.status, verdict.epoch, ())

    async def publish_key_packages(self, agent: str, last_resort: bytes, kps: list[bytes]) -> int:
        return self.relay.directory.publish_key_packages(self.device, agent, last_resort, tuple(kps))

    async def fetch_key_package(self, device: str, agent: str) -> PrekeysReceived:
        bundle, one = self.relay.directory.fetch_key_package(device, agent)
        return PrekeysReceived(0, DirectoryKind.KEY_PACKAGES, device, bundle, one)


class FakeBridge:
    connected = True
    connects = 1  # (the broker connection an exchange goes out in: gateway/groups_held.py)

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict[str, str]]] = []
        self.on_session_lost: list[Any] = []  # (the real bridge calls these after a CONNACK without our session)

    async def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.published.append((topic, payload, dict(kw.get("user_properties") or ())))

    # The exactly-once hand-over (gateway/bridge.py; with a real broker in tests/e2e/test_exactly_once_publish.py).
    def reserve_packet_id(self) -> int:
        self.last_id = getattr(self, "last_id", 0) + 1
        return self.last_id

    def claim_packet_id(self, packet_id: int) -> None:
        pass

    def free_packet_id(self, packet_id: int) -> None:
        pass

    async def publish_exactly_once(self, packet_id: int, topic: str, payload: bytes, *, on_broker_has: Any,
                                   released: bool = False, **kw: Any) -> None:
        if not released:
            on_broker_has([packet_id])
        await self.publish(topic, payload, **kw)

    def inbox(self, agent: str) -> list[tuple[bytes, str]]:
        return [(p, props["agw:from"]) for t, p, props in self.published if t.startswith(f"agw/{agent}/group/")
                and t.endswith("/in")]


class FakeIdentity:
    def __init__(self, fleet: Fleet, device: Device) -> None:
        self.dev = device
        self.device = DeviceName(FLEET, device.device_id)
        self.trust = FleetTrust(fleet.ca_cert)
        self.certificate = device.cert

    def delegated_key(self, *, agent: str) -> DelegatedKey:
        return delegate(self.dev.signer, self.dev.cert, device=self.device,
                        agent=AgentName(FLEET, self.device.device_id, agent), now=dt.datetime.now(dt.UTC))


async def make_gateway(relay: FakeRelay, fleet: Fleet, tmp: Path, device_id: str, agents: list[str], *,
                       lazy: bool = False, storage_key: SoftStorageKey | None = None) -> Groups:
    """A started group service; with `lazy`, the daemon's (a `GroupKeys` until a group is used). The same
    `storage_key` opens its store again (a restart)."""
    if lazy:
        from gateway.groups_keys import GroupKeys as service
    else:
        from gateway.groups import Groups as service  # type: ignore[assignment]

    store = Store.open(tmp / device_id / "agw.db", storage_key or SoftStorageKey())
    cfg = SimpleNamespace(mqtt=SimpleNamespace(topic_prefix="agw"), paths=SimpleNamespace(state_dir=tmp / device_id),
                          agents={a: SimpleNamespace(allow=EVERYONE) for a in agents})
    gw = service(store, FakeIdentity(fleet, fleet.device(device_id)), FakeLink(relay, device_id),  # type: ignore[arg-type]
                  FakeBridge(), cfg, lambda: int(dt.datetime.now(dt.UTC).timestamp() * 1000))  # type: ignore[arg-type]
    relay.gateways[device_id] = gw
    await gw.start()
    await gw._replenish_all()
    return gw


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


@pytest.fixture
async def trio(tmp_path: Path) -> Any:
    fleet, relay = make_fleet(), FakeRelay()
    gws = [await make_gateway(relay, fleet, tmp_path, d, [a]) for d, a in (("dev-a", "a1"), ("dev-b", "b1"),
                                                                          ("dev-c", "c1"))]
    a, b, c = gws
    a.create("a1", "g")
    await a.change("a1", "g", add=["dev-b/b1", "dev-c/c1"])
    await settle()
    yield a, b, c
    for g in gws:
        for t in list(g._tasks):
            t.cancel()
        g.store.close()


def bridge(gw: Groups) -> FakeBridge:
    assert isinstance(gw.bridge, FakeBridge)
    return gw.bridge


async def test_members_exchange_messages(trio: Any) -> None:
    a, b, c = trio
    assert [g.members[(n, "g")].epoch for g, n in ((a, "a1"), (b, "b1"), (c, "c1"))] == [1, 1, 1]
    b.send("b1", "g", b"hi")  # durable in b's outbox; its delivery loop hands it to the relay
    for _ in range(100):
        if bridge(a).inbox("a1") and bridge(c).inbox("c1"):
            break
        await asyncio.sleep(0.02)
    assert bridge(a).inbox("a1") == [(b"hi", "dev-b/b1")] and bridge(c).inbox("c1") == [(b"hi", "dev-b/b1")]


async def test_a_non_admin_commit_is_not_merged(trio: Any) -> None:
    a, b, c = trio
    g = b.members[("b1", "g")]
    c_leaf = next(i for i, leaf in g.members() if leaf.credential == c.signers["c1"].credential)
    rogue = g.commit(remove=[int(c_leaf)])  # b1 is a member but not an admin
    for target in (a, c):
        target.receive("dev-b", rogue.message.to_bytes())
    assert a.members[("a1", "g")].epoch == 1 and ("c1", "g") in c.members
    assert a.counters.dropped == c.counters.dropped == 1
    # b1 never merged its own rogue commit either; the admin's next commit moves everyone on together
    await a.change("a1", "g", update=True)
    await settle()
    assert b.members[("b1", "g")].epoch == c.members[("c1", "g")].epoch == 2


async def test_a_member_cannot_send_as_another_agent(trio: Any) -> None:
    _, b, c = trio
    forged = b.members[("b1", "g")].encrypt_application(b"I am a1", authenticated_data=b"dev-a/a1")
    c.receive("dev-b", forged.to_bytes())
    await c._flush_inbox()
    assert bridge(c).inbox("c1") == [] and c.counters.dropped == 1


async def test_garbage_and_unknown_groups_are_dropped(trio: Any) -> None:
    a, _, c = trio
    c.receive("dev-a", os.urandom(64))
    other = a.create("a1", "other")
    assert other["epoch"] == 0
    c.receive("dev-a", a.members[("a1", "other")].encrypt_application(b"x", b"dev-a/a1").to_bytes())
    await c._flush_inbox()
    assert bridge(c).inbox("c1") == [] and ("c1", "other") not in c.members
    assert c.members[("c1", "g")].epoch == 1
