"""The MQTT bridge bounds what it holds of agents' messages in bytes (gateway/bridge.py `IncomingQueue`), with a
real Mosquitto: past the bound the bridge stops reading its socket (the rest waits in the broker) until the gateway
takes messages off the queue; nothing is lost; and when nobody takes them for `incoming_pause_max` seconds, reading
resumes (the broker's Receive Maximum still bounds the count) so the connection stays alive."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.bridge import MESSAGE_OVERHEAD, MqttBridge
from gateway.testbed import Broker, free_port

GATEWAY_PW = "gw-secret"
AGENT_PW = "agent-secret"
SIZE = 64 * 1024
COUNT = 40
BOUND = 256 * 1024  # four messages


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Path]]:
    root = tmp_path_factory.mktemp("incoming")
    b = Broker(root / "broker", free_port(), {"agw-gateway": GATEWAY_PW, "alice": AGENT_PW})
    b.start()
    pw = root / "gw.pw"
    pw.write_text(GATEWAY_PW)
    yield b, pw
    b.stop()


def publish_burst(port: int, count: int) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alice", protocol=mqtt.MQTTv5)
    c.username_pw_set("alice", AGENT_PW)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = [c.publish("agw/alice/out/dev-b/bob", bytes([i]) * SIZE, qos=1) for i in range(count)]
    for info in infos:
        info.wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


async def _bridge(broker: tuple[Broker, Path], client_id: str, pause_max: float) -> MqttBridge:
    b, pw = broker
    bridge = MqttBridge(host="127.0.0.1", port=b.port, client_id=client_id, prefix="agw", username="agw-gateway",
                        password_file=pw, incoming_max_bytes=BOUND, incoming_pause_max=pause_max)
    await bridge.start()
    return bridge


async def test_reading_stops_at_the_byte_bound_and_nothing_is_lost(broker: tuple[Broker, Path]) -> None:
    bridge = await _bridge(broker, "agw-gateway-bytes", pause_max=60.0)
    try:
        await asyncio.to_thread(publish_burst, broker[0].port, COUNT)
        await asyncio.sleep(1.0)
        held = bridge.incoming.qsize()
        # Reading stops once the bound is reached: at most the bound plus the packet that crossed it.
        assert held <= BOUND // (SIZE + MESSAGE_OVERHEAD) + 1
        assert bridge.incoming.held_bytes <= BOUND + SIZE + MESSAGE_OVERHEAD
        got = []
        while len(got) < COUNT:
            m = await asyncio.wait_for(bridge.incoming.get(), 10)
            got.append(m.payload[0])
            bridge.ack(m)
        assert sorted(got) == list(range(COUNT))  # every message, once taken off the queue
        assert bridge.incoming.held_bytes == 0
    finally:
        await bridge.stop()


async def test_reading_resumes_when_nobody_takes_messages(broker: tuple[Broker, Path]) -> None:
    bridge = await _bridge(broker, "agw-gateway-stuck", pause_max=0.5)
    try:
        await asyncio.to_thread(publish_burst, broker[0].port, 12)
        await asyncio.sleep(2.0)
        assert bridge.incoming.qsize() == 12  # the count bound (Receive Maximum) holds; bytes no longer do
        assert bridge.connected
    finally:
        await bridge.stop()
