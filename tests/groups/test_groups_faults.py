"""Faults for groups (issue 8): a group stream with kill -9 of a member gateway and of the relay mid-stream, real
processes (relay, 3 gateways with SoftHSM tokens and their own Mosquitto brokers, raw paho agents).

Promised: every member agent gets every group message exactly once, counted by payload and by agw:message-id
(0 lost, 0 duplicated: a payload under two message ids would be an end-to-end duplicate), because the sender
keeps each message per member device until that device acknowledges it end to end (docs/protocol.md, "Group
acknowledgement"). Same-id copies (MQTT at-least-once between a restarted gateway and its broker, the receiving
gateway's republish window) are counted and reported, as in tests/torture.

Short configuration (make test): N_SHORT messages; AGW_TORTURE=long: N_LONG. A malicious member device's forged
commits and replays are in test_group_acks.py (in process: building a forged commit needs a member's MLS state).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.testbed import Gateway, Testbed
from tests.torture.conftest import LONG, record
from tests.torture.stream import Receiver, _client, tally

N_SHORT = 300
N_LONG = 3000
N = N_LONG if LONG else N_SHORT
TIMEOUT = 1200.0 if LONG else 240.0
GROUP = "faults"
AGENTS = {"gw1": ["s1", "s2"], "gw2": ["m1", "m2"], "gw3": ["n1"]}
EVERYONE = [f"{g}/*" for g in AGENTS]
SENDER = "s1"


def group_inbox(agent: str, port: int) -> Receiver:
    """Every PUBLISH on agw/<agent>/group/+/in, with its agw:message-id (persistent MQTT session)."""
    r = Receiver(agent, port, topic=f"agw/{agent}/group/+/in")
    r.start()
    return r


class World:
    def __init__(self, bed: Testbed) -> None:
        self.bed = bed
        self.gw = bed.gateways
        self.inboxes = {a: group_inbox(a, self.gw[g].broker.port) for g, names in AGENTS.items() for a in names
                        if a != SENDER}
        self.sender = _client(SENDER, self.gw["gw1"].broker.port, persistent=True)


def _ready(gw: Gateway, timeout: float = 90.0) -> None:
    if gw.proc is None or gw.proc.poll() is not None:
        gw.start()
    gw.wait_ready(timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    bed = Testbed(tmp_path_factory.mktemp("group-faults"))
    try:
        bed.start_relay()
        for g, names in AGENTS.items():
            bed.add_gateway(g, agents={a: EVERYONE for a in names})
        for gw in bed.gateways.values():
            gw.start()
        for gw in bed.gateways.values():
            gw.wait_ready()
        w = World(bed)
        gw1 = w.gw["gw1"]
        gw1.agw("group", "create", "--agent", SENDER, "--group", GROUP)
        add = ["group", "add", "--agent", SENDER, "--group", GROUP]
        for g, names in AGENTS.items():
            add += [arg for a in names if a != SENDER for arg in ("--member", f"{g}/{a}")]
        for _ in range(60):  # gateways publish their agents' KeyPackages shortly after the link is up
            res = gw1.agw(*add, check=False)
            if res.returncode == 0 or "no KeyPackage" not in res.stderr + res.stdout:
                break
            time.sleep(0.5)
        assert res.returncode == 0, res.stderr + res.stdout
        _wait(lambda: all(_epoch(w.gw[g], a) == 1 for g, names in AGENTS.items() for a in names), 60,
              "every member at epoch 1")
        yield w
    finally:
        bed.close()


def _epoch(gw: Gateway, agent: str) -> int | None:
    out = gw.agw("group", "show", "--agent", agent, "--group", GROUP, check=False)
    return int(json.loads(out.stdout)["epoch"]) if out.returncode == 0 else None


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _group_status(gw: Gateway) -> dict[str, Any]:
    return gw.status()["groups"]  # type: ignore[no-any-return]


def test_group_stream_exactly_once_through_member_gateway_and_relay_kill9(world: World) -> None:
    w = world
    t0 = time.monotonic()
    prefix = b"gf|"
    sent: list[bytes] = []
    faults: list[str] = []
    topic = f"agw/{SENDER}/group/{GROUP}/out"

    def fault(i: int) -> None:
        if i >= N // 3 and "kill9_member_gateway" not in faults:
            faults.append("kill9_member_gateway")
            w.gw["gw2"].stop(signal.SIGKILL)
            time.sleep(0.5)
            w.gw["gw2"].start()
        elif i >= 2 * N // 3 and "kill9_relay" not in faults:
            faults.append("kill9_relay")
            w.bed.stop_relay(signal.SIGKILL)
            time.sleep(0.5)
            w.bed.start_relay()

    i = 0
    while i < N:
        batch = [prefix + str(j).encode() for j in range(i, min(i + 20, N))]
        infos = [w.sender.publish(topic, p, qos=1) for p in batch]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published(), "no PUBACK from the sender's broker within 30 s"
        sent += batch
        i += len(batch)
        fault(i)
    assert faults == ["kill9_member_gateway", "kill9_relay"]
    _wait(lambda: all(len({p for _, p in box.payloads(prefix)}) >= N for box in w.inboxes.values()), TIMEOUT,
          "every member to have every message")
    for g in AGENTS:
        _ready(w.gw[g])
    # The end-to-end acks came back: the sender's group outbox drains (nothing is waiting for a device).
    _wait(lambda: _group_status(w.gw["gw1"])["outbox"] == 0, 120, "the sender's group outbox to drain")
    time.sleep(2.0)  # late duplicates, if any, would arrive now
    tallies = {a: tally(sent, box.payloads(prefix)) for a, box in w.inboxes.items()}
    counters = {g: _group_status(w.gw[g])["counters"] for g in AGENTS}
    record("groups.faults", messages=N, members=len(w.inboxes), faults=faults,
           per_member={a: t.as_dict() for a, t in tallies.items()},
           lost=sum(t.lost for t in tallies.values()), duplicated=sum(t.duplicated for t in tallies.values()),
           same_id_redeliveries=sum(t.same_id_redeliveries for t in tallies.values()),
           resent=counters["gw1"].get("resent"), duplicates_dropped={g: c.get("duplicates") for g, c in
                                                                     counters.items()},
           seconds=round(time.monotonic() - t0, 1))
    for a, t in tallies.items():
        assert t.sent == N
        assert (t.lost, t.duplicated, t.foreign) == (0, 0, 0), (a, t)
        assert t.delivered == N, (a, t)
    # The relay lost what it held for members when it was killed; the sender must have resent (and the
    # members dropped what they already had as duplicates): the end-to-end acks are what saved those.
    assert counters["gw1"]["resent"] > 0
    # The group inbox hands messages to the broker exactly once (QoS 2 under stored packet ids), so the kill -9
    # of a member gateway gives no second copy either.
    assert sum(t.same_id_redeliveries for t in tallies.values()) == 0, tallies
