"""Agent groups with real processes: a relay (the MLS Delivery Service), 3 gateways with SoftHSM tokens and
their own Mosquitto brokers, 6 agents, a group of 5. The tests run in order on one fleet, each building on the
group state the previous one left (a scenario, step by step).

The shipped ACL template does not yet let agents publish on agw/<agent>/group/...; the brokers here get the two
extra patterns that template needs (reported to its owner), applied with SIGHUP.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.client import AgentClient, AgentClientError, MessageRefused
from gateway.protocol.receipts import decode_ids
from gateway.testbed import Testbed

PW = "agent-secret"
GROUP = "team"
AGENTS = {"gw1": ["a1", "a2"], "gw2": ["b1", "b2"], "gw3": ["c1", "c2"]}
EVERYONE = ["gw1/*", "gw2/*", "gw3/*"]


class Agent:
    """An MQTT 5 agent: publishes to its group topics, collects what arrives on .../group/<g>/in."""

    def __init__(self, gw: str, name: str, port: int) -> None:
        self.gw, self.name = gw, name
        self.got: list[tuple[str, bytes, dict[str, str]]] = []
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{name}", protocol=mqtt.MQTTv5)
        c.username_pw_set(name, PW)
        c.on_message = self._on_message
        self._subacked: set[int] = set()
        c.on_subscribe = lambda _c, _u, mid, *_: self._subacked.add(mid)
        c.connect("127.0.0.1", port)
        c.loop_start()
        c.subscribe(f"agw/{name}/group/+/in", qos=1)
        c.subscribe(f"agw/{name}/group/+/events", qos=1)
        self.client = c

    @property
    def address(self) -> str:
        return f"{self.gw}/{self.name}"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = dict(getattr(msg.properties, "UserProperty", None) or [])
        with self._lock:
            if msg.topic.endswith("/events"):
                self.events.append(json.loads(msg.payload))
            else:
                self.got.append((msg.topic, bytes(msg.payload), props))

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p for _, p, _ in self.got]

    def subscribe(self, topic: str, timeout: float = 10.0) -> None:
        """Subscribe, and return once the broker acknowledged it (what is published before may not arrive)."""
        mid = self.client.subscribe(topic, qos=1)[1]
        wait_for(lambda: mid in self._subacked, timeout=timeout, what=f"{self.name}'s subscription to {topic}")

    def publish(self, group: str, payload: bytes, verb: str = "out", user: list[tuple[str, str]] | None = None
                ) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if user:
            props.UserProperty = user
        info = self.client.publish(f"agw/{self.name}/group/{group}/{verb}", payload, qos=1, properties=props)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_for(pred: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tb = Testbed(tmp_path_factory.mktemp("groups"))
    tb.start_relay()
    for gw, names in AGENTS.items():
        # c2 accepts groups only from gw1/a1: a group add by anyone else needs its operator's consent.
        tb.add_gateway(gw, agents={n: (["gw1/a1"] if n == "c2" else EVERYONE) for n in names})
    for gw in tb.gateways.values():
        gw.start()
    for gw in tb.gateways.values():
        gw.wait_ready()
    agents = {n: Agent(gw, n, tb.gateways[gw].broker.port) for gw, names in AGENTS.items() for n in names}
    tb.agents = agents  # type: ignore[attr-defined]
    yield tb
    for a in agents.values():
        a.close()
    tb.close()


def agw(tb: Testbed, gw: str, *args: str) -> Any:
    out = tb.gateways[gw].agw("group", *args)
    return json.loads(out.stdout)


def show(tb: Testbed, gw: str, agent: str) -> dict[str, Any] | None:
    out = tb.gateways[gw].agw("group", "show", "--agent", agent, "--group", GROUP, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def views(tb: Testbed, names: list[str]) -> dict[str, dict[str, Any] | None]:
    agents = tb.agents  # type: ignore[attr-defined]
    return {n: show(tb, agents[n].gw, n) for n in names}


def converged(tb: Testbed, names: list[str], epoch: int) -> bool:
    v = views(tb, names)
    return all(x is not None and x["epoch"] == epoch for x in v.values()) and len(
        {(x["epoch_authenticator"], tuple(x["members"])) for x in v.values() if x}) == 1


FIVE = ["a1", "a2", "b1", "b2", "c1"]


def test_create_and_add_four_members_in_one_commit(bed: Testbed) -> None:
    created = agw(bed, "gw1", "create", "--agent", "a1", "--group", GROUP, "--admin", "gw2/b1")
    assert created["epoch"] == 0 and created["members"] == ["gw1/a1"]
    assert created["admins"] == ["gw1/a1", "gw2/b1"]
    res = agw(bed, "gw1", "add", "--agent", "a1", "--group", GROUP, "--member", "gw1/a2", "--member", "gw2/b1",
              "--member", "gw2/b2", "--member", "gw3/c1")
    assert res["epoch"] == 1 and res["members"] == ["gw1/a1", "gw1/a2", "gw2/b1", "gw2/b2", "gw3/c1"]
    wait_for(lambda: converged(bed, FIVE, 1), what="all five members at epoch 1 with one view")
    joined = bed.agents["b2"].events  # type: ignore[attr-defined]
    assert any(e.get("op") == "joined" and e.get("by") == "gw1/a1" for e in joined)


def test_messages_reach_every_other_member_once(bed: Testbed) -> None:
    agents = bed.agents  # type: ignore[attr-defined]
    agents["a1"].publish(GROUP, b"hello from a1")
    agents["c1"].publish(GROUP, b"hello from c1")
    for n in FIVE:
        expect = {b"hello from a1", b"hello from c1"} - ({b"hello from a1"} if n == "a1" else set()) - (
            {b"hello from c1"} if n == "c1" else set())
        wait_for(lambda n=n, expect=expect: expect <= set(agents[n].payloads()), what=f"{n} receives")
    time.sleep(1.0)
    for n in FIVE:
        assert sorted(agents[n].payloads()) == sorted(set(agents[n].payloads())), f"{n} got a duplicate"
    topic, _, props = next(m for m in agents["b2"].got if m[1] == b"hello from c1")
    assert topic == f"agw/b2/group/{GROUP}/in"
    assert props["agw:from"] == "gw3/c1" and props["agw:group"] == GROUP and props["agw:epoch"] == "1"
    assert agents["c2"].payloads() == []  # not a member


def test_an_sdk_group_send_is_receipted_and_a_retransmission_taken_once(bed: Testbed) -> None:
    """What the SDK does, step by step with a raw client: each publish with an `agw:sdk-id` gets a receipt once the
    gateway has it queued for the group; a retransmission (same id) is receipted again but not sent again, while
    the same bytes under a new id are a new message."""
    agents = bed.agents  # type: ignore[attr-defined]
    a1, payload = agents["a1"], b"sent twice, taken once"
    receipts: list[bytes] = []
    a1.client.message_callback_add("agw/a1/receipt", lambda _c, _u, msg: receipts.append(bytes(msg.payload)))
    a1.subscribe("agw/a1/receipt")
    once, other = os.urandom(16), os.urandom(16)
    for sdk_id in (once, once, other):
        a1.publish(GROUP, payload, user=[("agw:sdk-id", sdk_id.hex())])
    wait_for(lambda: sum(len(decode_ids(r)) for r in receipts) >= 3, what="three receipts")
    ids = [i for r in receipts for i in decode_ids(r)]
    assert sorted(ids) == sorted([once, once, other])
    others = ["a2", "b1", "b2", "c1"]
    wait_for(lambda: all(agents[n].payloads().count(payload) >= 2 for n in others), what="delivery")
    time.sleep(1.5)  # a third copy would arrive now
    assert {n: agents[n].payloads().count(payload) for n in others} == dict.fromkeys(others, 2)
    assert agents["a1"].payloads().count(payload) == 0


def test_concurrent_commits_from_two_devices_one_winner_no_divergence(bed: Testbed) -> None:
    """a1 (gw1) removes b2 while b1 (gw2) commits a key update, both in epoch 1: the relay is paused while both
    commits are made, so both reach it for the same epoch. It accepts one; the other gateway processes the
    winner and commits again in epoch 2. Every remaining member ends with one view of epoch 3."""
    gws = bed.gateways
    assert bed.relay_proc is not None
    bed.relay_proc.send_signal(signal.SIGSTOP)
    try:
        procs = [subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "group", *cmd, "--group", GROUP, "--config", str(gws[gw].config)],
            env=gws[gw].env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for gw, cmd in (
            ("gw1", ["remove", "--agent", "a1", "--member", "gw2/b2"]), ("gw2", ["update", "--agent", "b1"]))]
        time.sleep(4.0)  # both CLIs asked their daemons, which made their commits and wait for the relay
    finally:
        bed.relay_proc.send_signal(signal.SIGCONT)
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert sorted(json.loads(out)["epoch"] for out, _ in results) == [2, 3]

    def counters() -> list[dict[str, int]]:
        return [bed.gateways[g].status()["groups"]["counters"] for g in ("gw1", "gw2")]  # type: ignore[index]

    wait_for(lambda: sum(c["commits"] for c in counters()) == 3, what="status.json to show all 3 commits")
    assert sum(c["commits_lost"] for c in counters()) == 1  # one loser, which retried and won the next epoch
    remaining = ["a1", "a2", "b1", "c1"]
    wait_for(lambda: converged(bed, remaining, 3), what="one view at epoch 3")
    view = show(bed, "gw1", "a1")
    assert view is not None and view["members"] == ["gw1/a1", "gw1/a2", "gw2/b1", "gw3/c1"]
    assert show(bed, "gw2", "b2") is None  # removed


def test_join_needs_the_operators_consent(bed: Testbed) -> None:
    """c2's operator allowed only gw1/a1: when b1 (an admin) adds c2, c2's gateway holds the Welcome as a consent
    request, and joins when the operator allows b1."""
    res = agw(bed, "gw2", "add", "--agent", "b1", "--group", GROUP, "--member", "gw3/c2")
    assert res["epoch"] == 4
    wait_for(lambda: "group.join_refused" in bed.gateways["gw3"].agw("audit", "list").stdout, what="refusal")
    assert show(bed, "gw3", "c2") is None
    assert "gw2/b1" in bed.gateways["gw3"].agw("audit", "list").stdout
    pending = bed.gateways["gw3"].agw("consent", "list", "--agent", "c2", "--json").stdout
    assert "gw2/b1" in pending and "pending" in pending
    # The operator allows it: the held Welcome is used, and c2 joins at the current epoch.
    bed.gateways["gw3"].agw("consent", "allow", "--agent", "c2", "--peer", "gw2/b1")
    wait_for(lambda: converged(bed, ["a1", "a2", "b1", "c1", "c2"], 4), what="c2 joins once allowed")


def test_removed_agent_receives_nothing_more(bed: Testbed) -> None:
    agents = bed.agents  # type: ignore[attr-defined]
    before = len(agents["b2"].payloads())
    agents["a2"].publish(GROUP, b"after the removal")
    for n in ("a1", "b1", "c1"):
        wait_for(lambda n=n: b"after the removal" in agents[n].payloads(), what=f"{n} receives")
    time.sleep(1.0)
    assert len(agents["b2"].payloads()) == before
    assert any(e.get("op") == "removed" for e in agents["b2"].events)


def test_admin_removes_and_readds_with_consent(bed: Testbed) -> None:
    agents = bed.agents  # type: ignore[attr-defined]
    agw(bed, "gw1", "remove", "--agent", "a1", "--group", GROUP, "--member", "gw3/c2")
    res = agw(bed, "gw1", "add", "--agent", "a1", "--group", GROUP, "--member", "gw3/c2")
    assert res["epoch"] == 6
    members = ["a1", "a2", "b1", "c1", "c2"]
    wait_for(lambda: converged(bed, members, 6), what="c2 joined at epoch 6")
    agents["b1"].publish(GROUP, b"welcome c2")
    wait_for(lambda: b"welcome c2" in agents["c2"].payloads(), what="c2 receives")
    # a non-admin cannot change membership
    a2 = bed.gateways["gw1"].agw("group", "remove", "--agent", "a2", "--group", GROUP, "--member", "gw3/c2",
                                 check=False)
    assert a2.returncode == 1 and "not an admin" in a2.stderr


def test_gateway_restart_keeps_the_group(bed: Testbed) -> None:
    agents = bed.agents  # type: ignore[attr-defined]
    gw2 = bed.gateways["gw2"]
    before = show(bed, "gw2", "b1")
    assert gw2.stop() == 0
    gw2.start()
    gw2.wait_ready()
    after = show(bed, "gw2", "b1")
    assert after == before
    agents["b1"].publish(GROUP, b"b1 is back")
    agents["a1"].publish(GROUP, b"to b1 after restart")
    wait_for(lambda: b"b1 is back" in agents["c2"].payloads(), what="members receive from b1")
    wait_for(lambda: b"to b1 after restart" in agents["b1"].payloads(), what="b1 receives")


async def test_sdk_create_add_send_receive_remove(bed: Testbed) -> None:
    port1, port2 = bed.gateways["gw1"].broker.port, bed.gateways["gw2"].broker.port
    async with AgentClient("b2", port=port2, password=PW) as b2, AgentClient("a2", port=port1, password=PW) as a2:
        assert (await b2.create_group("sdk"))["members"] == ["gw2/b2"]
        added = await b2.add("sdk", "gw1/a2")
        assert added["epoch"] == 1 and added["members"] == ["gw1/a2", "gw2/b2"]

        async def first() -> Any:
            async for msg in a2.group_messages("sdk"):
                return msg

        receiver = asyncio.create_task(first())
        await asyncio.sleep(1.0)  # a2's group session subscribes
        await b2.send_group("sdk", b"via the sdk")
        msg = await asyncio.wait_for(receiver, 30)
        assert (msg.sender, msg.payload, msg.topic) == ("gw2/b2", b"via the sdk", "agw/a2/group/sdk/in")
        assert (await b2.remove("sdk", "gw1/a2"))["members"] == ["gw2/b2"]
        gw1 = bed.gateways["gw1"]  # learns of the removal from the relay, after gw2: wait for it
        wait_for(lambda: gw1.agw("group", "show", "--agent", "a2", "--group", "sdk", check=False).returncode != 0,
                 what="gw1 to process the removal")
        with pytest.raises(MessageRefused, match="not a member"):
            await a2.send_group("sdk", b"after the removal")  # refused at once, not resent forever
        with pytest.raises(AgentClientError, match=r"not an admin|not a member"):
            await a2.add("sdk", "gw3/c1")


def test_member_device_offline_for_three_epochs_catches_up(bed: Testbed) -> None:
    agents = bed.agents  # type: ignore[attr-defined]
    gw3 = bed.gateways["gw3"]
    assert gw3.stop() == 0
    epoch = show(bed, "gw1", "a1")["epoch"]  # type: ignore[index]
    for _ in range(3):
        epoch = agw(bed, "gw1", "update", "--agent", "a1", "--group", GROUP)["epoch"]
    agents["a1"].publish(GROUP, b"while gw3 was away")
    wait_for(lambda: b"while gw3 was away" in agents["b1"].payloads(), what="b1 receives")
    gw3.start()
    gw3.wait_ready()
    wait_for(lambda: converged(bed, ["a1", "a2", "b1", "c1", "c2"], epoch), timeout=60, what="gw3 catches up")
    for n in ("c1", "c2"):
        wait_for(lambda n=n: b"while gw3 was away" in agents[n].payloads(), what=f"{n} gets the late message")


def test_agent_added_while_its_device_is_offline_joins_when_back(bed: Testbed) -> None:
    """b2's gateway is down: a1 adds b2 from the relay's KeyPackage directory, c1 (another device) commits an
    update, a1 sends. Back online, gw2 gets both senders' kept messages, joins and catches up in order."""
    agents = bed.agents  # type: ignore[attr-defined]
    gw2 = bed.gateways["gw2"]
    assert gw2.stop() == 0
    added = agw(bed, "gw1", "add", "--agent", "a1", "--group", GROUP, "--member", "gw2/b2")
    epoch = agw(bed, "gw3", "update", "--agent", "c1", "--group", GROUP)["epoch"]
    assert epoch == added["epoch"] + 1
    agents["a1"].publish(GROUP, b"hello b2")
    gw2.start()
    gw2.wait_ready()
    everyone = ["a1", "a2", "b1", "b2", "c1", "c2"]
    wait_for(lambda: converged(bed, everyone, epoch), timeout=60, what="gw2 catches up and b2 joins")
    wait_for(lambda: b"hello b2" in agents["b2"].payloads(), what="b2 receives")
    wait_for(lambda: b"hello b2" in agents["b1"].payloads(), what="b1 receives")


def test_burst_reaches_every_member_once_in_order(bed: Testbed) -> None:
    agents = bed.agents  # type: ignore[attr-defined]
    others = ["a2", "b1", "b2", "c1", "c2"]
    start = {n: len(agents[n].payloads()) for n in others}
    burst = [f"burst {i}".encode() for i in range(300)]
    t0 = time.monotonic()
    for p in burst:
        agents["a1"].publish(GROUP, p)
    for n in others:
        wait_for(lambda n=n: len(agents[n].payloads()) - start[n] >= len(burst), timeout=60, what=f"{n} burst")
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    for n in others:
        assert agents[n].payloads()[start[n]:] == burst, f"{n}: lost, duplicated or reordered"
    assert elapsed < 60


def test_revoked_device_is_removed_from_the_group(bed: Testbed) -> None:
    """The fleet CA revokes gw3; once gw1 has the new CRL, its admin agent commits the removal of gw3's agents,
    and the other members follow. (Last: gw3 stays revoked.)"""
    before = show(bed, "gw1", "a1")
    assert before is not None and {"gw3/c1", "gw3/c2"} <= set(before["members"])
    bed.revoke("gw3")
    shutil.copy(bed.ca_dir / "crl.pem", bed.gateways["gw1"].root / "state" / "crl.pem")
    rest = ["a1", "a2", "b1", "b2"]
    wait_for(lambda: converged(bed, rest, before["epoch"] + 1), what="the revoked device's agents removed")
    after = show(bed, "gw1", "a1")
    assert after is not None and after["members"] == ["gw1/a1", "gw1/a2", "gw2/b1", "gw2/b2"]
