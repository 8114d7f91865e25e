"""Faults during a two-way stream: kill -9 of either gateway, of the relay, of either Mosquitto broker; the relay
link cut and restored; a relay that accepts TCP and never answers. Afterwards every message is delivered exactly
once: counted by agw:message-id and by payload, on raw MQTT subscribers.

Short configuration: STREAM_SHORT messages each way per scenario; AGW_TORTURE=long: STREAM_LONG.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gateway.testbed import Testbed
from tests.torture.conftest import LONG, record
from tests.torture.stream import Receiver, Sender, guarded, tally, wait_delivered

STREAM_SHORT = 300
STREAM_LONG = 10_000
N = STREAM_LONG if LONG else STREAM_SHORT
DELIVERY_TIMEOUT = 1800.0 if LONG else 150.0


class Fleet:
    def __init__(self, bed: Testbed) -> None:
        self.bed = bed
        self.a, self.b = bed.gateways["dev-a"], bed.gateways["dev-b"]
        self.alice_in = Receiver("alice", self.a.broker.port)
        self.bob_in = Receiver("bob", self.b.broker.port)
        self.alice = Sender("alice", self.a.broker.port, "dev-b/bob")
        self.bob = Sender("bob", self.b.broker.port, "dev-a/alice")
        for part in (self.alice_in, self.bob_in, self.alice, self.bob):
            part.start()

    def all_ready(self, timeout: float = 90.0) -> None:
        for gw in (self.a, self.b):
            if gw.proc is None or gw.proc.poll() is not None:
                gw.start()
            gw.wait_ready(timeout)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    bed = Testbed(tmp_path_factory.mktemp("stream"))
    try:
        bed.start_relay()
        bed.add_gateway("dev-a", agents={"alice": ["dev-b/bob"]})
        bed.add_gateway("dev-b", agents={"bob": ["dev-a/alice"]}, algorithm="ecdsa-p256")
        for gw in bed.gateways.values():
            gw.start()
        f = Fleet(bed)
        f.all_ready()
        yield f
    finally:
        bed.close()


def silent_relay(f: Fleet, hold: float) -> None:
    """Replace the relay by a listener that accepts TCP and never says a word, then bring the real one back.

    The silent server stops listening before the relay returns but keeps the connections it accepted open, so
    a gateway must notice by itself that nobody answers (no TLS handshake) and reconnect."""
    f.bed.stop_relay(signal.SIGKILL)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", f.bed.relay_port))
    lsock.listen(64)
    lsock.settimeout(0.2)
    held: list[socket.socket] = []
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        try:
            held.append(lsock.accept()[0])
        except TimeoutError:
            pass
    lsock.close()
    f.bed.start_relay()
    record("stream.silent_relay", connections_held=len(held))
    closer = threading.Timer(60, lambda: [s.close() for s in held])
    closer.daemon = True  # must not keep the test process alive at exit
    closer.start()


def _drained(f: Fleet, timeout: float = 120.0) -> None:
    """Wait until both receivers hold every message sent so far (the senders are paused)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at_bob, at_alice = {p for _, p in f.bob_in.copies}, {p for _, p in f.alice_in.copies}
        if set(f.alice.sent) <= at_bob and set(f.bob.sent) <= at_alice:
            return
        time.sleep(0.05)
    raise TimeoutError("the stream did not drain before the broker fault")


def kill_broker(f: Fleet, which: str) -> None:
    """kill -9 a broker once it has handed on everything it acknowledged, while the peer keeps sending.

    Mosquitto saves its in-memory state only every autosave_interval (1 s here): what it PUBACKed in the last
    second and had not yet passed on dies with it. That is Mosquitto's promise, not ours (see
    docs/reliability.md, "Known limits"), so both senders pause until the stream has drained. Then the peer's
    messages keep arriving at this gateway while its broker is dead: the gateway must hold and deliver them."""
    gw, own, other = (f.a, f.alice, f.bob) if which == "a" else (f.b, f.bob, f.alice)
    with own.gate:
        with other.gate:
            _drained(f)
            gw.broker.stop(signal.SIGKILL)
        time.sleep(2)
        gw.broker.start()


def restart_gateway(gw_name: str) -> Callable[[Fleet], None]:
    def run(f: Fleet) -> None:
        gw = f.bed.gateways[gw_name]
        gw.stop(signal.SIGKILL)
        time.sleep(0.5)
        gw.start()
    return run


def restart_relay(sig: int, pause: float) -> Callable[[Fleet], None]:
    def run(f: Fleet) -> None:
        f.bed.stop_relay(sig)
        time.sleep(pause)
        f.bed.start_relay()
    return run


FAULTS: dict[str, Callable[[Fleet], None]] = {
    "kill9_gateway_a": restart_gateway("dev-a"),
    "kill9_gateway_b": restart_gateway("dev-b"),
    "kill9_relay": restart_relay(signal.SIGKILL, 0.5),
    "relay_link_cut": restart_relay(signal.SIGTERM, 3.0),
    "kill9_broker_a": lambda f: kill_broker(f, "a"),
    "kill9_broker_b": lambda f: kill_broker(f, "b"),
    "silent_relay": lambda f: silent_relay(f, 12.0),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_stream_exactly_once_through(fleet: Fleet, fault: str) -> None:
    f = fleet
    f.all_ready()
    t0 = time.monotonic()
    pa, pb = f"{fault}|a>b|".encode(), f"{fault}|b>a|".encode()
    trigger = threading.Event()
    errors: list[BaseException] = []

    def progress(i: int) -> None:
        if i >= N // 3:
            trigger.set()

    def inject() -> None:
        trigger.wait(DELIVERY_TIMEOUT)
        FAULTS[fault](f)

    threads = [threading.Thread(target=guarded(lambda: f.alice.run(pa, N, progress), errors, trigger)),
               threading.Thread(target=guarded(lambda: f.bob.run(pb, N), errors, trigger)),
               threading.Thread(target=guarded(inject, errors, trigger))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DELIVERY_TIMEOUT)
    assert not errors, errors
    wait_delivered(f.bob_in, pa, N, DELIVERY_TIMEOUT)
    wait_delivered(f.alice_in, pb, N, DELIVERY_TIMEOUT)
    f.all_ready()
    time.sleep(2.0)  # late duplicates, if any, would arrive now
    ab = tally([p for p in f.alice.sent if p.startswith(pa)], f.bob_in.payloads(pa))
    ba = tally([p for p in f.bob.sent if p.startswith(pb)], f.alice_in.payloads(pb))
    record(f"stream.{fault}", a_to_b=ab.as_dict(), b_to_a=ba.as_dict(), seconds=round(time.monotonic() - t0, 1))
    for t in (ab, ba):
        assert t.sent == N
        assert (t.lost, t.duplicated, t.foreign) == (0, 0, 0), t
        assert t.delivered == N, t
    redelivered = ab.same_id_redeliveries + ba.same_id_redeliveries
    if not fault.startswith("kill9_broker"):
        # After a broker's own crash, Mosquitto sends again QoS 1 messages whose acknowledgement it had not
        # saved: MQTT at-least-once between broker and agent, same agw:message-id (counted in the figures;
        # agents dedupe by message id, as the SDK does). Anywhere else a second copy is a failure.
        assert redelivered == 0, (ab, ba)
        assert ab.copies == ba.copies == N
    # The end-to-end acks came back: both outboxes drain.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(gw.status()["queue"]["outbox_depth"] for gw in (f.a, f.b)):  # type: ignore[index]
        time.sleep(0.2)
    assert [gw.status()["queue"]["outbox_depth"] for gw in (f.a, f.b)] == [0, 0]  # type: ignore[index]
