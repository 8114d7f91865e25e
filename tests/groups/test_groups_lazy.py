"""The group service is loaded when a group is used (gateway/groups_keys.py). Until then a gateway with agents
keeps their signers and KeyPackages at the relay without importing gateway.groups and the MLS engine (~1-2 MB of
RSS: docs/performance.md, 2026-12-07 07:30 UTC); a Welcome, a group publish or an operator's request loads it and
the service carries on as a `Groups`. (Restarts with memberships in the store: tests/groups/test_groups_e2e.py.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.bridge import AgentMessage
from gateway.groups import Groups
from gateway.groups_keys import GroupKeys
from gateway.store import StoreError
from tests.groups.test_groups_service import FakeRelay, bridge, make_gateway, settle
from tests.relay.conftest import make_fleet

REPO = Path(__file__).resolve().parents[2]

FRESH_GATEWAY = """
import asyncio, sys, tempfile
from pathlib import Path
from tests.groups.test_groups_service import FakeRelay, make_gateway
from tests.relay.conftest import make_fleet

def loaded():
    return sorted(m for m in ('gateway.groups', 'gateway.groups_delivery', 'gateway.groups_membership',
                              'gateway.protocol.mls.group', 'gateway.protocol.mls.framing') if m in sys.modules)

async def main():
    fleet, relay = make_fleet(), FakeRelay()
    with tempfile.TemporaryDirectory() as tmp:
        gw = await make_gateway(relay, fleet, Path(tmp), "dev-a", ["a1"], lazy=True)
        await asyncio.sleep(0.05)
        print(type(gw).__name__, loaded())
        print(relay.directory.fetch_key_package("dev-a", "a1")[1] is not None)
        listed = gw.control({"cmd": "group.list"})
        errors = []
        for req in ({"cmd": "group.show", "agent": "a1", "group": "g"}, {"cmd": "group.op", "op": "x"},
                    {"cmd": "group.show", "agent": "nobody", "group": "g"}):
            try:
                gw.control(req)
            except ValueError as exc:
                errors.append(str(exc))
        print(type(gw).__name__, loaded(), listed, errors)
        gw.control({"cmd": "group.create", "agent": "a1", "group": "g"})
        print(type(gw).__name__, loaded(), sorted(gw.members))
        for t in list(gw._tasks):
            t.cancel()
        gw.store.close()

asyncio.run(main())
"""


def test_a_gateway_whose_agents_use_no_group_does_not_import_the_group_service() -> None:
    out = subprocess.run([sys.executable, "-c", FRESH_GATEWAY], check=True, capture_output=True, text=True,
                         cwd=REPO, timeout=120).stdout.split("\n")
    assert out[0] == "GroupKeys []"
    assert out[1] == "True"  # its agent's one-time KeyPackages are at the relay: a peer can add it to a group
    # The operator's read-only requests are answered without loading it, with the full service's answers.
    assert out[2] == ("GroupKeys [] [] ['a1 is not a member of group g', \"unknown operation 'x'\", "
                      "\"'nobody' is not an agent of this gateway\"]")
    assert out[3].startswith("Groups ['gateway.groups', ")  # loaded by the operator's request
    assert out[3].endswith("[('a1', 'g')]")


async def test_a_welcome_loads_the_group_service_and_the_agent_joins(tmp_path: Path) -> None:
    fleet, relay = make_fleet(), FakeRelay()
    a = await make_gateway(relay, fleet, tmp_path, "dev-a", ["a1"])
    b = await make_gateway(relay, fleet, tmp_path, "dev-b", ["b1"], lazy=True)
    gws: list[Any] = [a, b]
    try:
        assert type(b) is GroupKeys
        a.create("a1", "g")
        await a.change("a1", "g", add=["dev-b/b1"])  # b1's KeyPackage comes from the relay; the Welcome follows
        await settle()
        assert type(b) is Groups and b.members[("b1", "g")].epoch == a.members[("a1", "g")].epoch == 1
        a.send("a1", "g", b"hello")
        for _ in range(100):
            if bridge(b).inbox("b1"):
                break
            await asyncio.sleep(0.02)
        assert bridge(b).inbox("b1") == [(b"hello", "dev-a/a1")]
    finally:
        for g in gws:
            for t in list(g._tasks):
                t.cancel()
            g.store.close()


async def test_an_agents_group_publish_loads_the_group_service(tmp_path: Path) -> None:
    fleet, relay = make_fleet(), FakeRelay()
    a = await make_gateway(relay, fleet, tmp_path, "dev-a", ["a1"], lazy=True)
    try:
        assert type(a) is GroupKeys
        ctl = AgentMessage("agw/a1/group/g/ctl", b'{"op": "create", "id": 1}', 1, 1, False, None, None, None, False,
                           ())
        assert await a.on_agent_messages([ctl]) == []
        await settle()
        assert type(a) is Groups and ("a1", "g") in a.members
    finally:
        for t in list(a._tasks):
            t.cancel()
        a.store.close()


async def test_a_store_error_while_loading_the_group_service_leaves_it_to_load_again(tmp_path: Path) -> None:
    """A store error while the full service restores its boxes fails that use (loudly), and the next use loads the
    service again with its delivery loops, not a half-loaded service that stores group messages and never sends
    them."""
    fleet, relay = make_fleet(), FakeRelay()
    a = await make_gateway(relay, fleet, tmp_path, "dev-a", ["a1"], lazy=True)
    try:
        def failing() -> Any:
            raise StoreError("disk I/O error")

        a.records.outbox = failing  # type: ignore[method-assign]
        ctl = AgentMessage("agw/a1/group/g/ctl", b'{"op": "create", "id": 1}', 1, 1, False, None, None, None, False,
                           ())
        with pytest.raises(StoreError):
            await a.on_agent_messages([ctl])
        assert type(a) is GroupKeys
        del a.records.outbox
        assert await a.on_agent_messages([ctl]) == []
        await settle()
        assert type(a) is Groups and ("a1", "g") in a.members
        names = sorted(t.get_name() for t in a._tasks)
        assert {"groups", "group-inbox"} <= set(names), names
        assert a.bridge.on_session_lost.count(a._broker_lost_session) == 1
    finally:
        for t in list(a._tasks):
            t.cancel()
        a.store.close()


async def test_the_light_services_answers_are_the_full_services(tmp_path: Path) -> None:
    """What `GroupKeys` answers to read-only requests without loading is what a `Groups` without groups answers."""
    fleet, relay = make_fleet(), FakeRelay()
    requests: list[dict[str, Any]] = [
        {"cmd": "group.list"}, {"cmd": "group.list", "agent": "a1"}, {"cmd": "group.show", "agent": "a1", "group": "g"},
        {"cmd": "group.op", "op": "x"}, {"cmd": "group.show", "agent": "nobody", "group": "g"},
        {"cmd": "group.show", "agent": "a1", "group": "no/slash"}]

    def answers(gw: Any) -> list[str]:
        out = []
        for req in requests:
            try:
                out.append(repr(gw.control(req)))
            except Exception as exc:  # (the control server answers each with its message)
                out.append(f"{type(exc).__name__}: {exc}")
        return out

    light = await make_gateway(relay, fleet, tmp_path, "dev-a", ["a1"], lazy=True)
    full = await make_gateway(relay, fleet, tmp_path, "dev-b", ["a1"])
    try:
        got = answers(light)
        assert type(light) is GroupKeys  # still light
        assert got == answers(full)
    finally:
        for gw in (light, full):
            for t in list(gw._tasks):
                t.cancel()
            gw.store.close()
