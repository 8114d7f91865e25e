"""The end of a QoS 1/2 publish in the bridge's paho client (`_PahoClient._do_on_publish`, run at every PUBCOMP and
PUBACK): the same effects as paho's own, in the same order: the callback sees the message still held, then the
message leaves, the in-flight count drops, a queued message goes out, a waiter is woken, and a callback's error is
raised or logged as paho does."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway.bridge import PublishProperties, _OnceMessage, _PahoClient

PUBCOMP_OK = ReasonCode(PacketTypes.PUBCOMP, "Success")  # type: ignore[no-untyped-call]


class _Sock:
    def close(self) -> None:
        pass


def _client(window: int, raise_in_callback: bool = False, suppress: bool = False) -> tuple[_PahoClient, list[Any]]:
    seen: list[Any] = []
    c = _PahoClient(mqtt.CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5, on_pubrec=lambda *a: None,
                    on_agent_message=lambda m: None)
    c.max_inflight_messages_set(window)
    c.suppress_exceptions = suppress
    queued: list[tuple[int, bytes]] = []

    def packet_queue(cmd: int, packet: bytes, mid: int, qos: int, info: Any = None) -> MQTTErrorCode:
        queued.append((mid, packet))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    c._packet_queue = packet_queue  # type: ignore[assignment,method-assign]
    c._sock = _Sock()  # type: ignore[assignment]  # (only "connected": packets go to `queued`)

    def on_publish(client: Any, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        seen.append(("callback", mid, mid in client._out_messages, client._inflight_messages, rc))
        if raise_in_callback:
            raise RuntimeError("callback failed")

    c.on_publish = on_publish
    for mid in (1, 2):  # in flight, waiting for PUBCOMP
        m = _OnceMessage(mid, b"agw/bob/in", b"p", PublishProperties())
        m.state = mqtt.mqtt_ms_wait_for_pubcomp
        c._out_messages[mid] = m
        c._inflight_messages += 1
    assert c.publish_with_id(3, "agw/bob/in", b"q", PublishProperties()) == MQTTErrorCode.MQTT_ERR_SUCCESS
    paho_msg = mqtt.MQTTMessage(4, b"agw/x")  # a QoS 1 publish of paho's own, with a waiter
    paho_msg.qos, paho_msg.state = 1, mqtt.mqtt_ms_wait_for_puback
    c._out_messages[4] = paho_msg
    c._inflight_messages += 1
    seen.append(("sent at first", [mid for mid, _ in queued]))
    queued.clear()
    seen.append(queued)  # (what goes out from here on)
    return c, seen


def _end(c: _PahoClient, own: bool, mid: int) -> Any:
    return (_PahoClient._do_on_publish if own else mqtt.Client._do_on_publish)(c, mid, PUBCOMP_OK, None)


def _state(c: _PahoClient) -> Any:
    return (sorted(c._out_messages), c._inflight_messages, {m: v.state for m, v in c._out_messages.items()},
            list(c._queued))


@pytest.mark.parametrize("window", [0, 2, 3, 4])
def test_same_effects_as_paho(window: int) -> None:
    results = []
    for own in (False, True):
        c, seen = _client(window)
        info = c._out_messages[4].info
        rcs = [_end(c, own, mid) for mid in (1, 4, 2)]
        results.append((rcs, seen, _state(c), info.is_published()))
    assert results[0] == results[1]
    _, seen, _, published = results[1]
    assert published  # paho's own message: its waiter is woken
    if window == 2:  # message 3 waited for room; it goes once there is
        assert seen[0] == ("sent at first", []) and [m for m, _ in seen[1]] == [3]
    if window in (0, 4):  # room at once
        assert seen[0] == ("sent at first", [3]) and seen[1] == []


@pytest.mark.parametrize("suppress", [False, True])
def test_a_failing_callback_is_handled_as_paho_does(suppress: bool) -> None:
    outcomes = []
    for own in (False, True):
        c, seen = _client(2, raise_in_callback=True, suppress=suppress)
        try:
            rc = _end(c, own, 1)
        except RuntimeError as exc:
            rc = repr(exc)
        outcomes.append((rc, seen, _state(c), c._in_callback_mutex.locked()))
    assert outcomes[0] == outcomes[1]
    assert not outcomes[1][3]  # the callback lock is released either way
