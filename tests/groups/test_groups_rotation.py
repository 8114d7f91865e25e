"""An agent's MLS leaf follows its delegated key, with real processes: a relay, two gateways (SoftHSM tokens, their
own Mosquitto brokers), a group across both. The operator renews an agent's delegated key with
`agw keys delegate --agent NAME --force` (while the gateway runs, or while it is down); the gateway commits the
new key into every group the agent is in. The tests run in order on one fleet, each building on the previous.

Keys are compared by the fingerprint `agw group show` prints for each member (SHA-256 of the leaf's signature
key, 16 hex digits) against the delegated certificate the operator's command wrote.

First, in process with a real fleet CA: the gateway's successor rule (same agent, fleet chain, not older; a
verdict that does not depend on the receiver's clock or CRL) as the MLS engine applies it to a rotation commit;
then the group service in process (real stores and the relay's DeliveryService, in-memory network as in
test_groups_service.py): a key renewed near its expiry, and a rotation commit that loses its epoch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.groups import Groups
from gateway.groups_identity import SUITE, AgentSigner, agent_of, capabilities, fleet_successor, fleet_validator
from gateway.protocol.identity.delegation import DelegatedKey, delegate
from gateway.protocol.identity.names import AgentName, DeviceName
from gateway.protocol.identity.trust import FleetTrust
from gateway.protocol.mls.credentials import MlsCredentialError
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.group import Group, GroupConfig
from gateway.protocol.mls.group_state import StagedCommit
from gateway.protocol.mls.key_package_bundle import create_key_package
from gateway.protocol.mls.welcome_structs import Welcome
from gateway.store import Store
from gateway.testbed import Gateway, Testbed
from tests.groups.test_groups_e2e import Agent, wait_for
from tests.groups.test_groups_service import FakeBridge, FakeIdentity, FakeLink, FakeRelay, bridge
from tests.relay.conftest import FLEET, Device, Fleet, make_fleet
from tests.store.conftest import SoftStorageKey

GROUP = "rot"
AGENTS = {"gw1": ["a1"], "gw2": ["b1", "b2"]}
EVERYONE = ["gw1/*", "gw2/*"]


# --- the successor rule, in process ---------------------------------------------------------------------------

NOW = dt.datetime.now(dt.UTC)


def delegated(device: Device, agent: str, issued: dt.datetime = NOW) -> AgentSigner:
    key = delegate(device.signer, device.cert, device=DeviceName(FLEET, device.device_id),
                   agent=AgentName(FLEET, device.device_id, agent), now=issued)
    chain = (key.certificate.public_bytes(Encoding.DER), device.cert.public_bytes(Encoding.DER))
    return AgentSigner(agent, key.raw_private_key(), chain)


@pytest.fixture(scope="module")
def ca() -> Fleet:
    return make_fleet()


def fleet_config(ca: Fleet, crl: bytes | None = None) -> GroupConfig:
    trust = FleetTrust.from_pem(ca.ca_pem, crl)
    return GroupConfig(identity_validator=fleet_validator(lambda: trust, lambda: NOW),
                       credential_successor=fleet_successor(lambda: trust, lambda: NOW))


def two_members(ca: Fleet, first: AgentSigner) -> tuple[Group, Group]:
    second = delegated(ca.device("dev-2"), "b1")
    a = Group.create(SUITE, b"rot", first.signer, first.credential, capabilities=capabilities(),
                     config=fleet_config(ca))
    bundle = create_key_package(a.cs, second.signer, second.credential, capabilities=capabilities())
    pending = a.commit(add=[bundle.key_package])
    a.merge_pending_commit(pending)
    assert pending.welcome is not None and isinstance(pending.welcome.body, Welcome)
    return a, Group.join(pending.welcome.body, bundle, second.signer, config=fleet_config(ca))


def test_a_renewed_key_of_the_same_agent_is_accepted(ca: Fleet) -> None:
    old = delegated(ca.device("dev-1"), "a1", NOW - dt.timedelta(hours=1))
    a, b = two_members(ca, old)
    new = delegated(ca.device("dev-1"), "a1")
    pending = a.commit(new_signer=new.signer, new_credential=new.credential)
    staged = b.process(pending.message.to_bytes())
    assert isinstance(staged, StagedCommit)
    b.merge_staged_commit(staged)
    a.merge_pending_commit(pending)
    leaf = b.tree.leaf(a.own_leaf)
    assert leaf is not None and leaf.signature_key == new.public_key and leaf.credential == new.credential


REASONS = {"another agent": "cannot change its credential to dev-1/a9", "another device": "to dev-3/a1",
           "older certificate": "older than the one it replaces", "another fleet": "not signed by"}


@pytest.mark.parametrize("case", ["another agent", "another device", "older certificate", "another fleet"])
def test_a_rotation_the_fleet_does_not_vouch_for_is_refused(ca: Fleet, case: str) -> None:
    """A committer that holds valid fleet credentials tries to move its leaf to one that is not its successor
    (it builds the commit with a permissive policy); the receiver refuses it and stays as it was."""
    old = delegated(ca.device("dev-1"), "a1", NOW - dt.timedelta(hours=1))
    a, b = two_members(ca, old)
    crl = None
    if case == "another agent":
        new = delegated(ca.device("dev-1"), "a9")
    elif case == "another device":
        new = delegated(ca.device("dev-3"), "a1")
    elif case == "older certificate":
        new = delegated(ca.device("dev-1"), "a1", NOW - dt.timedelta(hours=2))
    else:
        new = delegated(make_fleet().device("dev-1"), "a1")  # same names, another fleet CA
    try:
        cheat = Group(a.cs, a.state, a._signer, GroupConfig())  # test only: no checks on the sending side
        pending = cheat.commit(new_signer=new.signer, new_credential=new.credential)
        receiver = Group(b.cs, b.state, b._signer, fleet_config(ca, crl)) if crl else b
        epoch, tree_hash = receiver.epoch, receiver.state.tree.tree_hash(receiver.cs)
        with pytest.raises(MlsCredentialError, match=REASONS[case]):
            receiver.process(pending.message.to_bytes())
        assert (receiver.epoch, receiver.state.tree.tree_hash(receiver.cs)) == (epoch, tree_hash)
    finally:
        ca.revoked.clear()


def test_the_verdict_on_a_rotation_does_not_depend_on_the_receivers_clock(ca: Fleet) -> None:
    """A member device certifies its agent's new key with a start 30 s in the future (its clock is ahead): members
    whose clocks are behind it, or a few minutes ahead, must all reach the same verdict (the relay already ordered
    the commit; a split verdict would fork the group)."""
    device = ca.device("dev-5")
    a, b = two_members(ca, delegated(device, "a1", NOW - dt.timedelta(hours=1)))
    new = delegated(device, "a1", NOW + dt.timedelta(seconds=30))
    pending = a.commit(new_signer=new.signer, new_credential=new.credential)
    verdicts = []
    trust = FleetTrust.from_pem(ca.ca_pem)
    for clock in (NOW, NOW + dt.timedelta(minutes=3), NOW - dt.timedelta(minutes=2)):
        config = GroupConfig(identity_validator=fleet_validator(lambda: trust, lambda c=clock: c),
                             credential_successor=fleet_successor(lambda: trust, lambda c=clock: c))
        receiver = Group(b.cs, b.state, b._signer, config)
        verdicts.append(type(receiver.process(pending.message.to_bytes())).__name__)
    assert verdicts == ["StagedCommit"] * 3


def test_an_external_commit_is_refused_by_the_gateways_policy(ca: Fleet) -> None:
    """A member device (valid fleet credentials, holds the epoch's secrets) builds the GroupInfo itself and sends
    an external commit that removes another member and puts its own agent in that leaf. The gateway's groups
    never use external joins, so they refuse any; the engine also checks, where they are allowed, that a resync
    replaces only the joiner's own former leaf (RFC 9420 12.2)."""
    from gateway.protocol.mls.external_join import join_external

    a, b = two_members(ca, delegated(ca.device("dev-1"), "a1", NOW - dt.timedelta(hours=1)))
    mallory = delegated(ca.device("dev-6"), "m1")
    gi = a.group_info()
    _, message = join_external(gi, mallory.signer, mallory.credential, remove_prior=b.own_leaf,
                               ratchet_tree=a.tree, config=GroupConfig())
    epoch = a.epoch
    gateway_policy = Group(a.cs, a.state, a._signer, dataclasses.replace(fleet_config(ca),
                                                                        allow_external_commits=False))
    with pytest.raises(MlsError, match="does not accept external commits"):
        gateway_policy.process(message.to_bytes())
    with pytest.raises(MlsCredentialError, match="cannot change its credential"):
        a.process(message.to_bytes())  # external commits allowed, but the removed leaf is not the joiner's
    assert a.epoch == epoch


# --- the group service in process: renewal near expiry, lost races ------------------------------------------


class RenewingIdentity(FakeIdentity):
    """FakeIdentity with the delegated key file of DeviceIdentity kept in memory: `delegated_key` renews a key
    within `renew_before` of its expiry, as the real one does; `delegated_stamp` changes when it does."""

    def __init__(self, fleet: Fleet, device: Device) -> None:
        super().__init__(fleet, device)
        self.renew_before = dt.timedelta(days=1)
        self.keys: dict[str, DelegatedKey] = {}
        self.renewals = 0

    def delegated_key(self, *, agent: str) -> DelegatedKey:
        now = dt.datetime.now(dt.UTC)
        key = self.keys.get(agent)
        if key is None or key.not_after - now < self.renew_before:
            key = self.keys[agent] = super().delegated_key(agent=agent)
            self.renewals += 1
        return key

    def delegated_certificate(self, agent: str) -> x509.Certificate | None:
        key = self.keys.get(agent)
        return key.certificate if key else None

    def delegated_stamp(self, agent: str) -> tuple[int, int] | None:
        return (self.renewals, 0)


async def service(relay: FakeRelay, fleet: Fleet, tmp: Path, device_id: str, agents: list[str]) -> Groups:
    store = Store.open(tmp / device_id / "agw.db", SoftStorageKey())
    cfg = SimpleNamespace(mqtt=SimpleNamespace(topic_prefix="agw"), paths=SimpleNamespace(state_dir=tmp / device_id),
                          agents={a: SimpleNamespace(allow=["dev-a/*", "dev-b/*"]) for a in agents})
    gw = Groups(store, RenewingIdentity(fleet, fleet.device(device_id)), FakeLink(relay, device_id),  # type: ignore[arg-type]
                FakeBridge(), cfg, lambda: int(dt.datetime.now(dt.UTC).timestamp() * 1000))  # type: ignore[arg-type]
    relay.gateways[device_id] = gw
    await gw.start()
    await gw._replenish_all()
    return gw


async def eventually(pred: Any, what: str) -> None:
    for _ in range(300):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    """dev-a/a1 (admin) and dev-b/b1 in groups g1 and g2."""
    fleet, relay = make_fleet(), FakeRelay()
    a = await service(relay, fleet, tmp_path, "dev-a", ["a1"])
    b = await service(relay, fleet, tmp_path, "dev-b", ["b1"])
    for group in ("g1", "g2"):
        a.create("a1", group)
        await a.change("a1", group, add=["dev-b/b1"])
    await eventually(lambda: all(("b1", g) in b.members for g in ("g1", "g2")), "b1 joins both groups")
    yield a, b
    for gw in (a, b):
        for t in list(gw._tasks):
            t.cancel()
        gw.store.close()


def leaf_key(gw: Groups, agent: str, group: str, of: str) -> bytes:
    g = gw.members[(agent, group)]
    return next(leaf.signature_key for _, leaf in g.members() if agent_of(leaf.credential) == of)


async def test_a_key_near_expiry_is_renewed_and_every_group_follows(pair: Any) -> None:
    a, b = pair
    old = a.signers["a1"].public_key
    identity = a.identity
    assert isinstance(identity, RenewingIdentity)
    identity.renew_before = dt.timedelta(days=30)  # every key is now "near expiry"
    assert await a._refresh_signer("a1")
    identity.renew_before = dt.timedelta(days=1)
    new = a.signers["a1"].public_key
    assert new != old and identity.keys["a1"].raw_public_key() == new
    # New KeyPackages (the last-resort one first) carry the new key; the old key is retired, not forgotten.
    assert a.records.last_resort("a1").key_package.leaf_node.signature_key == new
    assert a._new_bundle("a1").key_package.leaf_node.signature_key == new
    assert a.signer_for("a1", old) is not None
    # Not yet committed: both memberships still sign with the old key.
    assert {a.members[("a1", g)].signature_key for g in ("g1", "g2")} == {old}
    a._start_rotations()
    await eventually(lambda: all(leaf_key(b, "b1", g, "dev-a/a1") == new for g in ("g1", "g2")),
                     "b1 sees a1's new key in both groups")
    for g in ("g1", "g2"):
        assert a.members[("a1", g)].signature_key == new
        assert a.members[("a1", g)].epoch == b.members[("b1", g)].epoch == 2
        a.send("a1", g, f"to {g} on the new key".encode())
    await eventually(lambda: len(bridge(b).inbox("b1")) == 2, "b1 receives in both groups")
    assert sorted(bridge(b).inbox("b1")) == [(b"to g1 on the new key", "dev-a/a1"),
                                             (b"to g2 on the new key", "dev-a/a1")]


async def test_a_rotation_that_loses_the_epoch_is_retried(pair: Any) -> None:
    """b1 commits an update in the same epoch as a1's rotation commit and reaches the relay first: a1's commit
    is refused (stale epoch); a1 processes the winner and commits its new key in the next epoch."""
    a, b = pair
    identity = a.identity
    assert isinstance(identity, RenewingIdentity)
    identity.renew_before = dt.timedelta(days=30)
    assert await a._refresh_signer("a1")
    identity.renew_before = dt.timedelta(days=1)
    new = a.signers["a1"].public_key
    await asyncio.gather(b.change("b1", "g1", update=True), a._rotate("a1", "g1"))
    assert a.counters.commits_lost == 1 and b.counters.commits_lost == 0
    await eventually(lambda: leaf_key(b, "b1", "g1", "dev-a/a1") == new and b.members[("b1", "g1")].epoch == 3,
                     "both commits land, the rotation included")
    assert a.members[("a1", "g1")].epoch == 3 and a.members[("a1", "g1")].signature_key == new
    assert a.members[("a1", "g1")].epoch_authenticator == b.members[("b1", "g1")].epoch_authenticator


# --- real processes -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tb = Testbed(tmp_path_factory.mktemp("rotation"))
    tb.start_relay()
    for gw, names in AGENTS.items():
        tb.add_gateway(gw, agents={n: EVERYONE for n in names})
    for gw in tb.gateways.values():
        gw.start()
    for gw in tb.gateways.values():
        gw.wait_ready()
    tb.agents = {n: Agent(gw, n, tb.gateways[gw].broker.port) for gw, names in AGENTS.items()  # type: ignore[attr-defined]
                 for n in names}
    yield tb
    for a in tb.agents.values():  # type: ignore[attr-defined]
        a.close()
    tb.close()


def show(tb: Testbed, agent: str) -> dict[str, Any] | None:
    gw = tb.gateways["gw1" if agent.startswith("a") else "gw2"]
    out = gw.agw("group", "show", "--agent", agent, "--group", GROUP, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def disk_fingerprint(gw: Gateway, agent: str) -> str:
    """Fingerprint of the agent's delegated key as the operator's command left it on disk (certificate only)."""
    record = json.loads((gw.root / "state" / f"delegated-{agent}.json").read_text())
    cert = x509.load_pem_x509_certificate(record["certificate"].encode())
    raw = cert.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def renew(gw: Gateway, agent: str) -> str:
    out = gw.agw("keys", "delegate", "--agent", agent, "--force")
    assert "valid until" in out.stdout
    return disk_fingerprint(gw, agent)


def agreed(tb: Testbed, names: list[str], epoch: int, member: str, fingerprint: str) -> bool:
    """Every named member is at `epoch`, with one view, in which `member`'s leaf holds `fingerprint`."""
    views = [show(tb, n) for n in names]
    return all(v is not None and v["epoch"] == epoch and v["keys"].get(member) == fingerprint for v in views) and len(
        {(v["epoch_authenticator"], json.dumps(v["keys"], sort_keys=True)) for v in views if v}) == 1


def exchange(tb: Testbed, a: str, b: str, tag: str) -> None:
    agents = tb.agents  # type: ignore[attr-defined]
    agents[a].publish(GROUP, f"{tag}: {a} to {b}".encode())
    agents[b].publish(GROUP, f"{tag}: {b} to {a}".encode())
    wait_for(lambda: f"{tag}: {a} to {b}".encode() in agents[b].payloads(), what=f"{b} receives {tag}")
    wait_for(lambda: f"{tag}: {b} to {a}".encode() in agents[a].payloads(), what=f"{a} receives {tag}")


def test_group_across_two_gateways(bed: Testbed) -> None:
    gw1 = bed.gateways["gw1"]
    created = json.loads(gw1.agw("group", "create", "--agent", "a1", "--group", GROUP).stdout)
    assert created["keys"] == {"gw1/a1": disk_fingerprint(gw1, "a1")}
    res = json.loads(gw1.agw("group", "add", "--agent", "a1", "--group", GROUP, "--member", "gw2/b1").stdout)
    assert res["epoch"] == 1
    wait_for(lambda: agreed(bed, ["a1", "b1"], 1, "gw1/a1", disk_fingerprint(gw1, "a1")), what="both at epoch 1")
    exchange(bed, "a1", "b1", "before")


def test_operator_renews_the_key_and_the_leaf_follows(bed: Testbed) -> None:
    gw1 = bed.gateways["gw1"]
    old = disk_fingerprint(gw1, "a1")
    new = renew(gw1, "a1")  # the daemon runs: it notices the renewed key and commits it
    assert new != old
    wait_for(lambda: agreed(bed, ["a1", "b1"], 2, "gw1/a1", new), what="the rotation commit at epoch 2 everywhere")
    assert show(bed, "b1")["keys"]["gw2/b1"] == disk_fingerprint(bed.gateways["gw2"], "b1")  # type: ignore[index]
    exchange(bed, "a1", "b1", "after renewal")
    log = gw1.log_text()
    assert "a1's leaf now holds its renewed delegated key" in log
    assert "delegated key of a1 renewed" in log


def test_the_rotated_group_survives_a_restart(bed: Testbed) -> None:
    gw1 = bed.gateways["gw1"]
    before = show(bed, "a1")
    assert gw1.stop() == 0
    gw1.start()
    gw1.wait_ready()
    assert show(bed, "a1") == before  # restored with the new signer; no further commit
    exchange(bed, "a1", "b1", "after restart")
    assert show(bed, "a1")["epoch"] == 2  # type: ignore[index]


def test_a_key_renewed_while_the_gateway_was_down_is_committed_at_start(bed: Testbed) -> None:
    gw1 = bed.gateways["gw1"]
    assert gw1.stop() == 0
    new = renew(gw1, "a1")
    gw1.start()
    gw1.wait_ready()
    wait_for(lambda: agreed(bed, ["a1", "b1"], 3, "gw1/a1", new), what="the start-up rotation at epoch 3")
    exchange(bed, "a1", "b1", "after offline renewal")


def test_an_agent_added_from_a_key_package_older_than_its_key_joins_then_rotates(bed: Testbed) -> None:
    """b2's key is renewed while the relay still holds one-time KeyPackages signed by its old key: a1 adds b2
    from one of those; b2 joins with the old key (kept as a retired signer) and at once commits its new one."""
    gw2 = bed.gateways["gw2"]
    new = renew(gw2, "b2")
    wait_for(lambda: "delegated key of b2 renewed" in gw2.log_text(), what="gw2 adopts b2's new key")
    res = json.loads(bed.gateways["gw1"].agw("group", "add", "--agent", "a1", "--group", GROUP, "--member",
                                             "gw2/b2").stdout)
    assert res["epoch"] == 4 and res["members"] == ["gw1/a1", "gw2/b1", "gw2/b2"]
    assert res["keys"]["gw2/b2"] != new  # added from a KeyPackage made before the renewal
    wait_for(lambda: agreed(bed, ["a1", "b1", "b2"], 5, "gw2/b2", new), what="b2's rotation at epoch 5")
    exchange(bed, "a1", "b2", "b2 on its new key")
