"""Agent credentials in MLS with a real fleet: the IdentityValidator (chain, CRL, agent name, key binding), the
admins extension, and a removed member that cannot read what follows; plus the group records' encodings."""

from __future__ import annotations

import datetime as dt
import os

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.groups_identity import (
    SUITE,
    AgentSigner,
    admins_extension,
    admins_of,
    agent_of,
    capabilities,
    fleet_validator,
)
from gateway.groups_store import GroupIndex, InEntry, OutEntry, bundle_from_bytes, bundle_to_bytes
from gateway.protocol.identity.delegation import delegate
from gateway.protocol.identity.names import AgentName, DeviceName
from gateway.protocol.identity.trust import FleetTrust
from gateway.protocol.mls.credentials import Credential, MlsCredentialError
from gateway.protocol.mls.crypto import Ed25519Signer, get_suite
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.framing import MLSMessage
from gateway.protocol.mls.group import Group, GroupConfig
from gateway.protocol.mls.group_persist import group_from_bytes, group_to_bytes
from gateway.protocol.mls.group_state import ApplicationMessage, StagedCommit
from gateway.protocol.mls.key_package_bundle import create_key_package
from gateway.protocol.mls.welcome_structs import Welcome
from tests.relay.conftest import FLEET, Device, Fleet, make_fleet

NOW = dt.datetime.now(dt.UTC)


def agent_signer(device: Device, agent: str | None) -> AgentSigner:
    name = AgentName(FLEET, device.device_id, agent) if agent else None
    key = delegate(device.signer, device.cert, device=DeviceName(FLEET, device.device_id), agent=name, now=NOW)
    chain = (key.certificate.public_bytes(Encoding.DER), device.cert.public_bytes(Encoding.DER))
    return AgentSigner(agent or "-", key.raw_private_key(), chain)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return make_fleet()


def validator(fleet: Fleet, crl: bytes | None = None) -> GroupConfig:
    trust = FleetTrust.from_pem(fleet.ca_pem, crl)
    return GroupConfig(identity_validator=fleet_validator(lambda: trust, lambda: NOW), max_past_epochs=1)


def test_agent_credential_accepted_and_named(fleet: Fleet) -> None:
    s = agent_signer(fleet.device("dev-1"), "planner")
    validator(fleet).identity_validator(s.credential, s.signer.public_key)
    assert agent_of(s.credential) == "dev-1/planner"


def test_device_credential_wrong_key_other_fleet_and_revoked_are_refused(fleet: Fleet) -> None:
    dev = fleet.device("dev-2")
    cfg = validator(fleet)
    device_only = agent_signer(dev, None)
    with pytest.raises(MlsCredentialError, match="agent"):
        cfg.identity_validator(device_only.credential, device_only.signer.public_key)
    s = agent_signer(dev, "sensor")
    with pytest.raises(MlsCredentialError, match="different key"):
        cfg.identity_validator(s.credential, Ed25519Signer.generate().public_key)
    stranger = agent_signer(make_fleet().device("dev-2"), "sensor")
    with pytest.raises(MlsCredentialError, match="rejected"):
        cfg.identity_validator(stranger.credential, stranger.signer.public_key)
    fleet.revoked.append(dev.cert.serial_number)
    try:
        revoked = validator(fleet, fleet.crl_pem())
        with pytest.raises(MlsCredentialError, match="revoked"):
            revoked.identity_validator(s.credential, s.signer.public_key)
    finally:
        fleet.revoked.clear()


def test_group_with_fleet_credentials_and_removed_member_cannot_read_on(fleet: Fleet) -> None:
    cs = get_suite(SUITE)
    cfg = validator(fleet)
    a = agent_signer(fleet.device("dev-a"), "a1")
    b = agent_signer(fleet.device("dev-b"), "b1")
    c = agent_signer(fleet.device("dev-c"), "c1")
    ga = Group.create(SUITE, b"team", a.signer, a.credential, capabilities=capabilities(),
                      extensions=(admins_extension(["dev-a/a1"]),), config=cfg)
    kb = create_key_package(cs, b.signer, b.credential, capabilities=capabilities())
    kc = create_key_package(cs, c.signer, c.credential, capabilities=capabilities())
    pending = ga.commit(add=[kb.key_package, kc.key_package])
    ga.merge_pending_commit(pending)
    assert pending.welcome is not None and isinstance(pending.welcome.body, Welcome)
    gb = Group.join(pending.welcome.body, kb, b.signer, config=cfg)
    gc = Group.join(pending.welcome.body, kc, c.signer, config=cfg)
    assert admins_of(gc.context.extensions) == ["dev-a/a1"]
    assert sorted(agent_of(leaf.credential) for _, leaf in gc.members()) == ["dev-a/a1", "dev-b/b1", "dev-c/c1"]
    c_before_removal = group_to_bytes(gc)
    removal = ga.commit(remove=[int(gc.own_leaf)])
    ga.merge_pending_commit(removal)
    for g in (gb, gc):
        staged = g.process(removal.message)
        assert isinstance(staged, StagedCommit)
        g.merge_staged_commit(staged)
    assert not gc.active
    secret = ga.encrypt_application(b"after removal", authenticated_data=b"dev-a/a1")
    got = gb.process(secret)
    assert isinstance(got, ApplicationMessage) and got.data == b"after removal"
    with pytest.raises(MlsError):
        gc.process(secret)
    stale = group_from_bytes(c_before_removal, c.signer, cfg)  # even a copy that ignored the removal
    with pytest.raises(MlsError):
        stale.process(MLSMessage.from_bytes(secret.to_bytes()))


def test_a_key_package_from_another_fleet_cannot_be_added(fleet: Fleet) -> None:
    cfg = validator(fleet)
    a = agent_signer(fleet.device("dev-a"), "a1")
    x = agent_signer(make_fleet().device("dev-x"), "x1")
    ga = Group.create(SUITE, b"g", a.signer, a.credential, capabilities=capabilities(), config=cfg)
    kx = create_key_package(get_suite(SUITE), x.signer, x.credential, capabilities=capabilities())
    with pytest.raises(MlsError):
        ga.commit(add=[kx.key_package])


def test_records_round_trip() -> None:
    s = AgentSigner("planner", os.urandom(32), (b"leaf", b"device"))
    assert AgentSigner.from_bytes(s.to_bytes()) == s and "seed" not in repr(s)
    bundle = create_key_package(get_suite(SUITE), s.signer, Credential.basic(b"x"))
    assert bundle_from_bytes(bundle_to_bytes(bundle)) == bundle
    out = OutEntry(os.urandom(16), b"mls", ["d1", "d2"], True, 123)
    back = OutEntry.from_bytes(out.entry_id, out.to_bytes())
    assert (back.message, back.devices, back.resend, back.expires_ms) == (b"mls", ["d1", "d2"], True, 123)
    inn = InEntry(os.urandom(16), "a", "g", "d/b", 4, b"\x00payload", 9)
    assert InEntry.from_bytes(inn.entry_id, inn.to_bytes()) == inn
    idx = GroupIndex({("a", "g")}, {b"\x01" * 16}, {b"\x02" * 16})
    assert GroupIndex.from_bytes(idx.to_bytes()) == idx
    assert admins_of((admins_extension(["d/a", "e/b"]),)) == ["d/a", "e/b"] and admins_of(()) == []


def test_self_updates_fall_due_per_membership() -> None:
    from gateway.groups import due_for_update

    keys = [("a", "g1"), ("a", "g2"), ("b", "g1")]
    last = {("a", "g1"): 100.0, ("b", "g1"): 10.0}
    assert due_for_update(last, keys, now=105.0, started=0.0, interval=50.0) == [("a", "g2"), ("b", "g1")]
    assert due_for_update(last, keys, now=150.0, started=120.0, interval=50.0) == [("a", "g1"), ("b", "g1")]
    assert due_for_update({}, keys, now=10.0, started=0.0, interval=50.0) == []
