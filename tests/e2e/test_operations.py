"""Operator and integration surfaces of a running gateway: the synchronous SDK, data-subject export and purge,
systemd readiness and watchdog notifications over a real datagram socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from gateway.client import SyncAgentClient
from gateway.testbed import Testbed

PW = "agent-secret"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    tb = Testbed(tmp_path_factory.mktemp("ops"))
    tb.start_relay()
    tb.add_gateway("dev-a", agents={"alice": ["dev-b/bob"]})
    tb.add_gateway("dev-b", agents={"bob": ["dev-a/alice"]})
    for gw in tb.gateways.values():
        gw.start()
    for gw in tb.gateways.values():
        gw.wait_ready()
    yield tb
    tb.close()


def test_sync_sdk_send_request_and_reply(pair):
    a, b = pair.gateways["dev-a"], pair.gateways["dev-b"]
    with SyncAgentClient("alice", port=a.broker.port, password=PW) as alice, \
            SyncAgentClient("bob", port=b.broker.port, password=PW) as bob:
        alice.send("dev-b/bob", b"sync hello")
        got = bob.receive(timeout=20)
        assert (got.sender, got.payload) == ("dev-a/alice", b"sync hello")
        import threading

        def serve() -> None:
            req = bob.receive(timeout=20)
            bob.reply(req, b"sync pong")

        t = threading.Thread(target=serve)
        t.start()
        reply = alice.request("dev-b/bob", b"sync ping", timeout=20)
        t.join(20)
        assert reply.payload == b"sync pong"


def test_store_export_and_purge_through_the_cli(pair):
    b = pair.gateways["dev-b"]
    with SyncAgentClient("alice", port=pair.gateways["dev-a"].broker.port, password=PW) as alice, \
            SyncAgentClient("bob", port=b.broker.port, password=PW) as bob:
        alice.send("dev-b/bob", b"before purge")
        assert bob.receive(timeout=20).payload == b"before purge"
    export = json.loads(b.agw("store", "export", "--peer", "dev-a").stdout)
    assert export["peer"] == "dev-a"
    assert [s["peer_device"] for s in export["sessions"]] == ["dev-a"]
    assert "ratchet" not in json.dumps(export).lower() or all("state_bytes" in s for s in export["sessions"])
    purged = json.loads(b.agw("store", "purge", "--peer", "dev-a").stdout)
    assert purged["sessions"] == 1
    after = json.loads(b.agw("store", "export", "--peer", "dev-a").stdout)
    assert after["sessions"] == [] and after["outbox"] == []
    audit = json.loads(b.agw("audit", "list").stdout)
    assert any(e["event"]["type"] == "store.purged" and e["event"]["peer"] == "dev-a" for e in audit)
    # The peer opens a new session on its next message: communication still works after a purge.
    with SyncAgentClient("alice", port=pair.gateways["dev-a"].broker.port, password=PW) as alice, \
            SyncAgentClient("bob", port=b.broker.port, password=PW) as bob:
        alice.send("dev-b/bob", b"after purge")
        assert bob.receive(timeout=60).payload == b"after purge"


def test_systemd_ready_and_watchdog_notifications(tmp_path, pair):
    """Run a third gateway as systemd would: NOTIFY_SOCKET and WATCHDOG_USEC set; READY=1 then WATCHDOG=1."""
    gw = pair.add_gateway("dev-n", agents={"nina": []})
    sock_path = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(sock_path))
    srv.settimeout(10)
    env = {**gw.env, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(gw.config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("WATCHDOG=1" in m for m in messages):
            messages.append(srv.recv(4096).decode())
        assert any(m.startswith("READY=1") for m in messages), messages
        assert any("WATCHDOG=1" in m for m in messages), messages
        assert messages.index(next(m for m in messages if m.startswith("READY=1"))) < \
            messages.index(next(m for m in messages if "WATCHDOG=1" in m))
        proc.terminate()
        assert proc.wait(15) == 0
        while True:
            try:
                messages.append(srv.recv(4096).decode())
            except TimeoutError:
                break
            if "STOPPING=1" in messages[-1]:
                break
        assert any("STOPPING=1" in m for m in messages)
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.close()
        os.unlink(sock_path)
