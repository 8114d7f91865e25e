"""Control measurement (not a test): the same mid-stream kill -9 of a Mosquitto broker as
tests/torture/test_sdk_stream_faults.py, but with raw MQTT agents (paho, QoS 1, no receipts, no acks: the
Sender/Receiver of tests/torture/stream.py). It shows why the SDK's receipts are needed: what the broker
acknowledged and had not yet saved (autosave_interval 1 s) is lost. How much varies from run to run, so this is a
measurement for docs/reliability.md, not an assertion.

    .venv/bin/python -m tests.torture.measure_raw_broker_kill [messages each way, default 3000]
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from gateway.testbed import Testbed
from tests.torture.stream import Receiver, Sender, tally, wait_delivered


def run(n: int, which: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        bed = Testbed(Path(d))
        try:
            a, b = bed.start_alice_and_bob(90)
            alice_in, bob_in = Receiver("alice", a.broker.port), Receiver("bob", b.broker.port)
            alice, bob = Sender("alice", a.broker.port, "dev-b/bob"), Sender("bob", b.broker.port, "dev-a/alice")
            for part in (alice_in, bob_in, alice, bob):
                part.start()
            trigger = threading.Event()
            pa, pb = b"raw|a>b|", b"raw|b>a|"

            def kill() -> None:
                trigger.wait(600)
                gw = a if which == "a" else b
                gw.broker.stop(signal.SIGKILL)  # mid-stream: the senders are not paused
                time.sleep(2.0)
                gw.broker.start()

            threads = [threading.Thread(target=lambda: alice.run(pa, n, lambda i: i >= n // 3 and trigger.set())),
                       threading.Thread(target=lambda: bob.run(pb, n)), threading.Thread(target=kill)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(900)
            wait_delivered(bob_in, pa, len(alice.sent), 60)
            wait_delivered(alice_in, pb, len(bob.sent), 60)
            time.sleep(5.0)
            return {"broker": which, "a_to_b": tally(alice.sent, bob_in.payloads(pa)).as_dict(),
                    "b_to_a": tally(bob.sent, alice_in.payloads(pb)).as_dict()}
        finally:
            bed.close()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    for which in ("a", "b"):
        print(json.dumps(run(n, which)), flush=True)
