"""Group messages to an SDK agent are kept by its gateway until the agent acknowledges them (gateway/groups_held.py),
as pairwise messages are: real relay, two gateways with SoftHSM tokens and their own Mosquitto, the receiving agent
an SDK process killed with SIGKILL. The message sent while it was dead reaches its next process; what it had
acknowledged is not sent again; a clean close (goodbye) ends the keeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.client import AgentClient
from gateway.testbed import Testbed
from tests.support.sdk_process import SdkProcess, wait_for

PW = "agent-secret"
GROUP = "held"

RECEIVER = """
import asyncio, sys
from gateway.client import AgentClient

async def main() -> None:
    async with AgentClient(sys.argv[1], port=int(sys.argv[2]), password=sys.argv[3]) as me:
        print("ready", flush=True)
        async for m in me.group_messages(sys.argv[4]):
            print(m.payload.hex(), flush=True)

asyncio.run(main())
"""


def receiver(port: int) -> SdkProcess:
    """a1's application in a process of its own, reading the group (each message then acknowledged)."""
    return SdkProcess(RECEIVER, "a1", str(port), PW, GROUP, what="a1's SDK process")


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    tb = Testbed(tmp_path_factory.mktemp("group-held"))
    tb.start_relay()
    tb.add_gateway("gw1", agents={"a1": ["gw2/*"]})
    tb.add_gateway("gw2", agents={"b1": ["gw1/*"]})
    for gw in tb.gateways.values():
        gw.start()
    for gw in tb.gateways.values():
        gw.wait_ready()
    yield tb
    tb.close()


def live_status(tb: Testbed) -> dict[str, Any]:
    """gw1's status now, from the daemon over its control socket (status.json is up to 1 s old)."""
    return json.loads(tb.gateways["gw1"].agw("status", "--json").stdout)  # type: ignore[no-any-return]


def groups_status(tb: Testbed) -> dict[str, Any]:
    return live_status(tb)["groups"]  # type: ignore[no-any-return]


async def test_a_group_message_sent_while_the_sdk_agent_was_killed_reaches_its_next_process(bed: Testbed) -> None:
    gw1 = bed.gateways["gw1"]
    async with AgentClient("b1", port=bed.gateways["gw2"].broker.port, password=PW) as b1:
        await b1.create_group(GROUP)
        await b1.add(GROUP, "gw1/a1")
        await asyncio.to_thread(wait_for, lambda: gw1.agw("group", "show", "--agent", "a1", "--group", GROUP,
                                                          check=False).returncode == 0, what="a1 to join")
        first = receiver(gw1.broker.port)
        try:
            # Its group_messages() subscribed and announced that a1 reads (and acknowledges) this group.
            await asyncio.to_thread(wait_for, lambda: live_status(bed)["receipts"]["acking_groups"] == {"a1": [GROUP]},
                                    what="a1's announcement of the group")
            await b1.send_group(GROUP, b"first")
            await asyncio.to_thread(wait_for, lambda: first.payloads() == [b"first"], what="the first message")
            # Taken and acknowledged: gw1 holds nothing for a1 any more.
            await asyncio.to_thread(wait_for, lambda: groups_status(bed)["held"] == 0, what="the first ack")
        finally:
            first.kill()  # no goodbye: a1 still counts as acknowledging

        await b1.send_group(GROUP, b"while a1 was dead")
        # Published into the dead process's broker session (no one will read it there) and kept by gw1.
        await asyncio.to_thread(wait_for, lambda: groups_status(bed)["held"] == 1, what="gw1 to hold the message")

        second = receiver(gw1.broker.port)  # a new process: a new MQTT session, announced with an empty ack
        try:
            await asyncio.to_thread(wait_for, lambda: second.payloads() == [b"while a1 was dead"],
                                    what="the message kept for a1")
            await asyncio.to_thread(wait_for, lambda: groups_status(bed)["held"] == 0, what="a1's ack")
            assert groups_status(bed)["counters"]["held_republished"] >= 1
            await b1.send_group(GROUP, b"live")
            await asyncio.to_thread(wait_for, lambda: second.payloads()[-1:] == [b"live"], what="a live message")
            assert second.payloads() == [b"while a1 was dead", b"live"]  # nothing acknowledged came again
        finally:
            second.kill()


async def test_a_clean_close_ends_the_keeping(bed: Testbed) -> None:
    gw1 = bed.gateways["gw1"]
    if live_status(bed)["receipts"]["acking_clients"].get("a1"):
        # (Left by the SDK processes the test before killed.) A killed client says no goodbye, and gw1 cannot tell
        # it from a live one: another client's clean close ends only its own (docs/operations.md), so a1 stays
        # acknowledging; the operator's one-byte goodbye without an instance forgets every client of a1.
        killed = live_status(bed)["receipts"]["acking_clients"]["a1"]
        async with AgentClient("a1", port=gw1.broker.port, password=PW):
            await asyncio.to_thread(
                wait_for, lambda: live_status(bed)["receipts"]["acking_clients"].get("a1") == killed + 1,
                what="the other client's announcement")
        await asyncio.sleep(1.0)  # (its goodbye taken)
        assert live_status(bed)["receipts"]["acking_clients"].get("a1") == killed
        async with AgentClient("a1", port=gw1.broker.port, password=PW) as operator:
            await operator._mqtt.publish("agw/a1/ack", b"\x00", qos=1)  # (no agw:instance)
        await asyncio.to_thread(wait_for, lambda: live_status(bed)["receipts"]["acking_agents"] == [],
                                what="gw1 to take the goodbye without an instance")
    async with AgentClient("a1", port=gw1.broker.port, password=PW) as a1:
        async def first() -> bytes:
            async for m in a1.group_messages(GROUP):
                return m.payload
            raise AssertionError("no message")

        receiving = asyncio.create_task(first())
        async with AgentClient("b1", port=bed.gateways["gw2"].broker.port, password=PW) as b1:
            await b1.send_group(GROUP, b"to the sdk client")
            assert await asyncio.wait_for(receiving, 30) == b"to the sdk client"
            await asyncio.to_thread(wait_for, lambda: groups_status(bed)["held"] == 0, what="a1's ack")
    # a1 said goodbye: a message now goes at PUBCOMP, as for a raw agent, and is not kept.
    await asyncio.to_thread(wait_for, lambda: live_status(bed)["receipts"]["acking_agents"] == [],
                            what="gw1 to take a1's goodbye")
    assert live_status(bed)["receipts"]["acking_groups"] == {}
    await _handed_and_not_kept(bed, b"after the goodbye")


async def _handed_and_not_kept(bed: Testbed, payload: bytes) -> None:
    """b1 (on gw2) sends a group message: gw1 hands it to its broker and keeps nothing."""
    delivered = groups_status(bed)["counters"]["delivered"]
    async with AgentClient("b1", port=bed.gateways["gw2"].broker.port, password=PW) as b1:
        await b1.send_group(GROUP, payload)
    await asyncio.to_thread(wait_for, lambda: groups_status(bed)["counters"]["delivered"] > delivered,
                            what="gw1 to hand the message to its broker")
    assert groups_status(bed)["held"] == 0


async def test_an_sdk_client_that_reads_no_group_gets_none_kept(bed: Testbed) -> None:
    """An SDK client that acknowledges its direct messages but never iterates the group (or an SDK from before
    group acks, which announces no group) is not sent the group's messages again and again: none are kept."""
    gw1 = bed.gateways["gw1"]
    async with AgentClient("a1", port=gw1.broker.port, password=PW) as a1:
        await asyncio.to_thread(wait_for, lambda: live_status(bed)["receipts"]["acking_agents"] == ["a1"],
                                what="a1's announcement")
        assert live_status(bed)["receipts"]["acking_groups"] == {}
        await _handed_and_not_kept(bed, b"to a client that reads no group")
        assert a1._group_inboxes == {}  # (and the client did not subscribe to it)
