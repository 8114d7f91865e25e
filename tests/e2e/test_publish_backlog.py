"""The receiving gateway bounds the messages it has handed to its local broker and not yet completed
(gateway/receiving.py `PUBLISH_BACKLOG`), with real processes: while the broker is stalled (SIGSTOP) and a sender
bursts, the receiver stops taking frames from the relay once the bound is reached (one slice of a frame, at most
`RECEIVE_SLICE` messages, may cross it; before frames were sliced, a whole frame: up to the sender's window), so
the burst waits in the relay and in the sender's outbox instead of in the receiver's memory; once the broker runs
again every message arrives, once."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from gateway.receiving import PUBLISH_BACKLOG, RECEIVE_SLICE
from gateway.sending import SEND_WINDOW
from gateway.testbed import Gateway, Testbed

PW = "agent-secret"
N = 1500  # well past PUBLISH_BACKLOG + the sender's window


class Subscriber:
    """bob on dev-b's broker: a plain MQTT 5 client subscribed QoS 2 to its inbox topic."""

    def __init__(self, port: int) -> None:
        self.got: list[bytes] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bob", protocol=mqtt.MQTTv5)
        c.username_pw_set("bob", PW)
        c.on_message = self._on_message
        c.on_subscribe = lambda *_: self.subscribed.set()
        c.on_connect = lambda client, *_: client.subscribe("agw/bob/in", qos=2)
        c.connect("127.0.0.1", port, keepalive=120)
        c.loop_start()
        self.client = c
        assert self.subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append(bytes(msg.payload))

    def count(self) -> int:
        with self.lock:
            return len(self.got)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(port: int, payloads: list[bytes]) -> None:
    """alice publishes QoS 1 and waits for every PUBACK (each message is then durable in dev-a's outbox)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alice", protocol=mqtt.MQTTv5)
    c.username_pw_set("alice", PW)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        infos = [c.publish("agw/alice/out/dev-b/bob", p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(60)
    finally:
        c.disconnect()
        c.loop_stop()


def wait_for(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Gateway]]:
    tb = Testbed(tmp_path_factory.mktemp("backlog"))
    try:
        a, b = tb.start_alice_and_bob()
        yield a, b
    finally:
        tb.close()


def test_a_stalled_broker_bounds_what_the_receiver_holds(bed: tuple[Gateway, Gateway]) -> None:
    a, b = bed
    bob = Subscriber(b.broker.port)
    broker = b.broker.proc
    assert broker is not None
    stopped = False
    try:
        publish(a.broker.port, [b"warm-up"])  # opens the pairwise session
        wait_for(lambda: bob.count() == 1, 30, "the warm-up message")
        os.kill(broker.pid, signal.SIGSTOP)
        stopped = True
        payloads = [f"m{i:05d}".encode().ljust(256, b".") for i in range(N)]
        publish(a.broker.port, payloads)
        # The receiver takes frames until the bound is reached, then stops: sample what it holds for a while.
        held = []
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:
            held.append(int(b.status()["inbox"]["publishing"]))  # type: ignore[index]
            time.sleep(0.2)
        assert max(held) >= PUBLISH_BACKLOG, held  # the burst did reach the receiver
        assert max(held) <= PUBLISH_BACKLOG + RECEIVE_SLICE < PUBLISH_BACKLOG + SEND_WINDOW, held  # one slice past
        os.kill(broker.pid, signal.SIGCONT)
        stopped = False
        wait_for(lambda: bob.count() >= N + 1, 120, f"{N} messages after the broker resumed")
        time.sleep(2.0)  # a second copy, if any, would arrive now
        with bob.lock:
            got = list(bob.got)
        assert sorted(got[1:]) == payloads  # every message, once
        wait_for(lambda: int(b.status()["inbox"]["publishing"]) == 0, 30, "the receiver's backlog to drain")  # type: ignore[index]
    finally:
        if stopped:
            os.kill(broker.pid, signal.SIGCONT)
        bob.close()
