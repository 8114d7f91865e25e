"""`AgentClient(auto_ack=False)` and `msg.ack()` (gateway/client.py): a message the application took but did not
acknowledge comes back to the agent's next client after a crash; one it acknowledged does not. Real relay,
gateways, brokers; the receiving application is an SDK process killed with SIGKILL, then a `SyncAgentClient`
that acknowledges from its own thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from gateway.client import AgentClient, SyncAgentClient
from gateway.testbed import Gateway, Testbed
from tests.support.sdk_process import SdkProcess, wait_for

PW = "agent-secret"

RECEIVER = """
import asyncio, sys
from gateway.client import AgentClient

async def main() -> None:
    async with AgentClient("bob", port=int(sys.argv[1]), password=sys.argv[2], auto_ack=False) as me:
        print("ready", flush=True)
        async for m in me.messages():
            print(m.payload.hex(), flush=True)
            if m.payload.startswith(b"ack:"):
                m.ack()

asyncio.run(main())
"""


def receiver(port: int) -> SdkProcess:
    """bob's application in a process of its own: prints what it takes; acks only payloads starting "ack:"."""
    return SdkProcess(RECEIVER, str(port), PW, what="bob's SDK process")


def held(gw: Gateway) -> int:
    return gw.status()["receipts"]["held"]  # type: ignore[index, no-any-return]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    tb = Testbed(tmp_path_factory.mktemp("manual-ack"))
    tb.start_alice_and_bob()
    yield tb
    tb.close()


async def test_what_the_application_did_not_ack_comes_back_after_a_crash(bed: Testbed) -> None:
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    async with AgentClient("alice", port=a.broker.port, password=PW) as alice:
        first = receiver(b.broker.port)
        try:
            await alice.send("dev-b/bob", b"taken, not acked")
            await asyncio.to_thread(wait_for, lambda: first.payloads() == [b"taken, not acked"], what="the message")
            await asyncio.sleep(1.5)  # (an auto-acking client would have acknowledged it by now)
            await asyncio.to_thread(wait_for, lambda: held(b) == 1, what="dev-b to hold it")
        finally:
            first.kill()

        second = receiver(b.broker.port)  # the application after a restart: gets it again
        try:
            await asyncio.to_thread(wait_for, lambda: second.payloads() == [b"taken, not acked"],
                                    what="the unacknowledged message, again")
            await alice.send("dev-b/bob", b"ack:processed")
            await asyncio.to_thread(wait_for, lambda: second.payloads()[-1:] == [b"ack:processed"],
                                    what="the second message")
            await asyncio.to_thread(wait_for, lambda: held(b) == 1, what="dev-b to forget the acknowledged one")
        finally:
            second.kill()

    # A SyncAgentClient acknowledging from its caller's thread: only the unacknowledged one comes, and goes.
    with SyncAgentClient("bob", port=b.broker.port, password=PW, auto_ack=False) as bob:
        msg = bob.receive(timeout=30)
        assert msg.payload == b"taken, not acked"
        time.sleep(1.0)
        assert held(b) == 1
        msg.ack()
        msg.ack()  # (twice: harmless)
        wait_for(lambda: held(b) == 0, what="dev-b to forget it after ack()")
        with pytest.raises(TimeoutError):
            bob.receive(timeout=3)  # the acknowledged "ack:processed" does not come back
