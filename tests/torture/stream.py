"""A two-way message stream between raw MQTT agents (paho, not the SDK: the SDK drops repeated message ids, and
we want to see every copy the broker hands to an agent), with exact accounting of what was delivered.

Senders publish QoS 1 in small batches and count a message as sent only once their broker has PUBACKed it:
from then on the gateways are responsible for it. Receivers keep a persistent MQTT session, so a broker restart
does not drop their subscription, and record (agw:message-id, payload) for every PUBLISH they get.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import topics

PASSWORD = "agent-secret"


def _client(agent: str, port: int, *, persistent: bool) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{agent}-{uuid.uuid4().hex[:8]}",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(agent, PASSWORD)
    c.reconnect_delay_set(0.1, 1)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600 if persistent else 0
    c.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
    c.loop_start()
    deadline = time.monotonic() + 30
    while not c.is_connected():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{agent} cannot connect to the broker on {port}")
        time.sleep(0.02)
    return c


@dataclass
class Receiver:
    """An agent's inbox: every PUBLISH on agw/<agent>/in, with its agw:message-id and agw:from."""

    agent: str
    port: int
    topic: str | None = None  # default: the agent's inbox topic (a group test passes agw/<agent>/group/+/in)
    copies: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        topic = self.topic or topics.inbox_topic("agw", self.agent)
        self.client = _client(self.agent, self.port, persistent=True)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.subscribe(topic, qos=1)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        props = dict(getattr(msg.properties, "UserProperty", None) or [])
        with self.lock:
            self.copies.append((props.get(topics.PROP_MESSAGE_ID, ""), bytes(msg.payload)))

    def payloads(self, prefix: bytes) -> list[tuple[str, bytes]]:
        with self.lock:
            return [(i, p) for i, p in self.copies if p.startswith(prefix)]

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Sender:
    """An agent publishing a numbered stream to one peer; `sent` holds the payloads its broker acknowledged."""

    agent: str
    port: int
    peer: str  # <device>/<agent>
    sent: list[bytes] = field(default_factory=list)
    batch: int = 20
    gate: threading.Lock = field(default_factory=threading.Lock)  # held per batch; broker faults take it

    def start(self) -> None:
        self.client = _client(self.agent, self.port, persistent=True)

    def run(self, prefix: bytes, n: int, on_progress: Callable[[int], None] = lambda _i: None) -> None:
        topic = f"agw/{self.agent}/out/{self.peer}"
        i = 0
        while i < n:
            with self.gate:
                deadline = time.monotonic() + 30
                while not self.client.is_connected():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.agent}: broker gone for 30 s")
                    time.sleep(0.05)
                batch = [prefix + str(j).encode() for j in range(i, min(i + self.batch, n))]
                infos = [self.client.publish(topic, p, qos=1) for p in batch]
                for info in infos:
                    info.wait_for_publish(30)
                    if not info.is_published():
                        raise TimeoutError(f"{self.agent}: no PUBACK from the broker within 30 s")
                self.sent += batch
                i += len(batch)
            on_progress(i)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass(frozen=True)
class Tally:
    """What one direction of a stream came to."""

    sent: int
    delivered: int  # distinct payloads delivered
    copies: int  # PUBLISH packets the agent received
    same_id_redeliveries: int  # extra copies with an agw:message-id already seen (MQTT at-least-once)
    duplicated: int  # payloads delivered under more than one message id (an end-to-end duplicate)
    lost: int
    foreign: int  # payloads nobody sent

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def tally(sent: list[bytes], copies: list[tuple[str, bytes]]) -> Tally:
    ids_by_payload: dict[bytes, set[str]] = {}
    for mid, p in copies:
        ids_by_payload.setdefault(p, set()).add(mid)
    per_id = Counter(mid for mid, _ in copies)
    sent_set = set(sent)
    return Tally(sent=len(sent), delivered=len(ids_by_payload.keys() & sent_set), copies=len(copies),
                 same_id_redeliveries=sum(c - 1 for c in per_id.values()),
                 duplicated=sum(1 for ids in ids_by_payload.values() if len(ids) > 1),
                 lost=len(sent_set - ids_by_payload.keys()), foreign=len(ids_by_payload.keys() - sent_set))


def wait_delivered(receiver: Receiver, prefix: bytes, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len({p for _, p in receiver.payloads(prefix)}) >= expected:
            return
        time.sleep(0.2)


def guarded(fn: Callable[[], None], errors: list[BaseException], trigger: threading.Event) -> Callable[[], None]:
    """`fn` for a worker thread: an exception is kept in `errors` and sets `trigger` (so the fault injector, which
    waits on it, does not wait forever) instead of dying silently with the thread."""
    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)
            trigger.set()
    return run
