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


def wait_saved(db: Path, after: float, timeout: float = 10.0) -> None:
    """Wait until the broker has saved its state (autosave) at or after `after` (wall clock).

    Mosquitto saves every `autosave_interval` (in whole seconds, so up to ~2 s apart). A broker killed before it
    saved the gateway's session restarts without the gateway's subscription, and routes what agents publish before
    the gateway subscribes again to nobody: everything bob published after the restart in the runs of 2026-11-22
    and 2026-12-07 (1,381 and 2,048 of 3,000), a start-up window, not the persistence window measured here.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists() and db.stat().st_mtime >= after:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the broker did not save {db} within {timeout} s")


def run(n: int, which: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        bed = Testbed(Path(d))
        try:
            a, b = bed.start_alice_and_bob(90)
            alice_in, bob_in = Receiver("alice", a.broker.port), Receiver("bob", b.broker.port)
            alice, bob = Sender("alice", a.broker.port, "dev-b/bob"), Sender("bob", b.broker.port, "dev-a/alice")
            for part in (alice_in, bob_in, alice, bob):
                part.start()
            time.sleep(0.5)  # the receivers' subscriptions are in
            for gw in (a, b):  # a broker killed before it first saved the gateway's and the receivers' sessions
                wait_saved(gw.broker.root / "mosquitto.db", time.time() + 0.1)  # forgets their subscriptions
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
