"""The gateway's exactly-once hand-over to Mosquitto (gateway/bridge.py `publish_exactly_once`), with a real broker
and a real process killed (os._exit, as kill -9 would) at each point of the QoS 2 exchange, then a new process
resuming it as the gateway does from its inbox record (gateway/inbox.py). A raw MQTT subscriber counts copies.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.testbed import Broker, free_port

GATEWAY_PW = "gw-secret"
AGENT_PW = "agent-secret"
TOPIC = "agw/bob/in"

CHILD = textwrap.dedent("""
    import asyncio, os, sys
    from pathlib import Path
    from gateway.bridge import MqttBridge

    port, pw_file, packet_id, mode, payload = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]

    async def main() -> None:
        bridge = MqttBridge(host="127.0.0.1", port=port, client_id="agw-gateway-exactly-once", prefix="agw",
                            username="agw-gateway", password_file=Path(pw_file))
        await bridge.start()
        bridge.claim_packet_id(packet_id)

        def broker_has(ids: list[int]) -> None:
            if mode == "crash-before-record":
                os._exit(9)  # PUBREC arrived, nothing recorded, no PUBREL
            print("recorded", ids, flush=True)
            if mode == "crash-after-record":
                os._exit(9)  # recorded, but the PUBREL never left

        await bridge.publish_exactly_once(packet_id, "agw/bob/in", payload.encode(), on_broker_has=broker_has,
                                          released=mode == "resume-released")
        print("pubcomp", flush=True)
        await bridge.stop()

    asyncio.run(main())
""")


class Subscriber:
    def __init__(self, port: int) -> None:
        self.got: list[bytes] = []
        self._lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bob", protocol=mqtt.MQTTv5)
        c.username_pw_set("bob", AGENT_PW)
        self._subscribed = threading.Event()
        self.connects = 0
        c.on_message = self._on_message
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *_: self._subscribed.set()
        c.reconnect_delay_set(0.1, 1)
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        self._subscribed.clear()
        self.connects += 1
        client.subscribe(TOPIC, qos=1)  # again after a broker restart

    def wait_subscribed(self, connects: int = 1, timeout: float = 10.0) -> None:
        """Until the broker acknowledged the subscription of connection number `connects` or a later one (what is
        published before may not reach this client)."""
        deadline = time.monotonic() + timeout
        while not (self.connects >= connects and self._subscribed.is_set()):
            assert time.monotonic() < deadline, f"bob never subscribed on connection {connects}"
            time.sleep(0.02)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.got.append(bytes(msg.payload))

    def copies(self, payload: str, settle: float = 1.0) -> int:
        time.sleep(settle)  # a late second copy would arrive now
        with self._lock:
            return self.got.count(payload.encode())


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Path]]:
    root = tmp_path_factory.mktemp("eo")
    b = Broker(root / "broker", free_port(), {"agw-gateway": GATEWAY_PW, "bob": AGENT_PW})
    b.start()
    pw = root / "gw.pw"
    pw.write_text(GATEWAY_PW)
    yield b, pw
    b.stop()


@pytest.fixture(scope="module")
def bob(broker: tuple[Broker, Path]) -> Iterator[Subscriber]:
    s = Subscriber(broker[0].port)
    s.wait_subscribed()
    yield s
    s.client.loop_stop()
    s.client.disconnect()


def run(broker: tuple[Broker, Path], packet_id: int, mode: str, payload: str) -> subprocess.CompletedProcess[str]:
    b, pw = broker
    return subprocess.run([sys.executable, "-c", CHILD, str(b.port), str(pw), str(packet_id), mode, payload],
                          capture_output=True, text=True, timeout=60)


def test_crash_before_recording_pubrec_then_resume_delivers_once(broker, bob) -> None:
    first = run(broker, 101, "crash-before-record", "m1")
    assert first.returncode == 9, first.stderr
    assert bob.copies("m1", settle=0.5) == 0  # the broker holds it until PUBREL
    again = run(broker, 101, "publish", "m1")  # the stored phase is PUBLISHED: same id, same content
    assert again.returncode == 0 and "pubcomp" in again.stdout, again.stderr
    assert bob.copies("m1") == 1


def test_crash_after_recording_pubrec_then_resume_delivers_once(broker, bob) -> None:
    first = run(broker, 102, "crash-after-record", "m2")
    assert first.returncode == 9 and "recorded [102]" in first.stdout, first.stderr
    assert bob.copies("m2", settle=0.5) == 0
    again = run(broker, 102, "resume-released", "m2")  # the stored phase is BROKER_HAS: PUBREL only
    assert again.returncode == 0 and "pubcomp" in again.stdout, again.stderr
    assert bob.copies("m2") == 1


def test_crash_after_pubcomp_then_resume_does_not_deliver_again(broker, bob) -> None:
    done = run(broker, 103, "publish", "m3")
    assert done.returncode == 0 and "pubcomp" in done.stdout, done.stderr
    assert bob.copies("m3") == 1
    # The entry was not deleted before the crash: its phase is BROKER_HAS, so only PUBREL goes out again.
    again = run(broker, 103, "resume-released", "m3")
    assert again.returncode == 0 and "pubcomp" in again.stdout, again.stderr
    assert bob.copies("m3") == 1
    # Control: what a gateway that forgot the phase would do (publish again) does reach the agent twice, so
    # the counts above are able to see a duplicate.
    run(broker, 103, "publish", "m3")
    assert bob.copies("m3") == 2


def test_broker_that_lost_the_session_gets_the_message_again_not_never(broker, bob) -> None:
    """PUBREC recorded, then the gateway and the broker both lose their state (the broker's persistence file is
    gone): a PUBREL alone would be answered PUBCOMP with nothing delivered. The bridge sees the session is gone
    and publishes the message again instead."""
    b, _ = broker
    first = run(broker, 104, "crash-after-record", "m4")
    assert first.returncode == 9 and "recorded [104]" in first.stdout, first.stderr
    connects = bob.connects
    b.stop()
    for f in b.root.glob("*.db"):
        f.unlink()
    b.start()
    bob.wait_subscribed(connects + 1)  # (it subscribes again on connect)
    again = run(broker, 104, "resume-released", "m4")
    assert again.returncode == 0 and "pubcomp" in again.stdout, again.stderr
    assert "lost this gateway's session" in again.stderr, again.stderr
    assert bob.copies("m4") == 1
