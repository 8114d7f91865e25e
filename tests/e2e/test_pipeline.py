"""The product's main job with real processes: relay (WSS, TLS 1.3), two Mosquitto brokers with ACLs, two
gateways with their own SoftHSM tokens (one Ed25519, one P-256), and agents using the SDK or mosquitto_pub/sub."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time

import pytest

from gateway.client import AgentClient, AgentClientError
from gateway.testbed import Testbed

PW = "agent-secret"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory):
    tb = Testbed(tmp_path_factory.mktemp("bed"))
    tb.start_relay()
    tb.add_gateway("dev-a", agents={"alice": ["dev-b/bob"], "dora": []})
    tb.add_gateway("dev-b", agents={"bob": ["dev-a/alice"], "erin": ["dev-a/*"]}, algorithm="ecdsa-p256")
    for gw in tb.gateways.values():
        gw.start()
    for gw in tb.gateways.values():
        gw.wait_ready()
    yield tb
    tb.close()


def client(tb: Testbed, gw: str, agent: str) -> AgentClient:
    return AgentClient(agent, port=tb.gateways[gw].broker.port, password=PW)


def subscribed(port: int, agent: str, topic: str, *args: str) -> subprocess.Popen[str]:
    """mosquitto_sub, returned once the broker has acknowledged its subscription: a raw subscriber misses what is
    published before it subscribes, and a fixed sleep is a guess that a slow or loaded machine can outrun."""
    # (stdbuf: its stdout to a pipe is block-buffered, so the SUBACK line would show only when it exits)
    sub = subprocess.Popen(["stdbuf", "-oL", "mosquitto_sub", "-d", "-p", str(port), "-u", agent, "-P", PW,
                            "-t", topic, "-q", "1", "-V", "mqttv5", *args], stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    seen = []
    for line in sub.stdout:
        seen.append(line)
        if "received SUBACK" in line:
            return sub
    sub.kill()
    raise AssertionError(f"mosquitto_sub never subscribed: {''.join(seen)}")


def received(sub: subprocess.Popen[str], timeout: float) -> list[str]:
    """The messages a `subscribed` mosquitto_sub printed (its -d protocol lines left out), once it ended."""
    sub.wait(timeout)  # (its output is a few lines: the pipe cannot fill)
    assert sub.stdout is not None
    out = sub.stdout.read()  # (not communicate(): it reads the pipe itself, past what `subscribed` buffered)
    return [line for line in out.splitlines()
            if not line.startswith(("Client ", "Subscribed (mid"))]


async def test_messages_both_ways_with_properties(bed):
    async with client(bed, "dev-a", "alice") as alice, client(bed, "dev-b", "bob") as bob:
        await alice.send("dev-b/bob", b"hello bob", content_type="text/plain", user_properties=[("trace", "t1")])
        got = await bob.receive(timeout=20)
        assert (got.sender, got.payload, got.content_type) == ("dev-a/alice", b"hello bob", "text/plain")
        assert ("trace", "t1") in got.user_properties and len(got.message_id or "") == 32
        await bob.send("dev-a/alice", b"hello alice")
        back = await alice.receive(timeout=20)
        assert (back.sender, back.payload) == ("dev-b/bob", b"hello alice")


def test_gateways_run_on_uvloop(bed):
    """uvloop is a dependency (issue 7: throughput), so a gateway started as users start it runs on it."""
    for gw in bed.gateways.values():
        assert gw.log is not None and "event loop: uvloop" in gw.log.read_text()


def test_event_loop_choice(monkeypatch):
    import uvloop

    from gateway.runtime import event_loop_factory

    monkeypatch.delenv("AGW_EVENT_LOOP", raising=False)
    assert event_loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv("AGW_EVENT_LOOP", "asyncio")
    assert event_loop_factory() is None


async def test_request_reply_round_trip_end_to_end(bed):
    async with client(bed, "dev-a", "alice") as alice, client(bed, "dev-b", "bob") as bob:
        async def serve() -> None:
            req = await bob.receive(timeout=20)
            assert req.response_topic and req.response_topic.startswith("agw/bob/out/dev-a/alice/r/")
            await req.reply(b"pong:" + req.payload)

        server = asyncio.create_task(serve())
        reply = await alice.request("dev-b/bob", b"ping", timeout=20)
        await server
        assert reply.payload == b"pong:ping" and reply.sender == "dev-b/bob"


def test_mosquitto_clients_use_the_documented_topics(bed):
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    sub = subscribed(b.broker.port, "bob", "agw/bob/in", "-C", "2", "-W", "30", "-F", "%t|%p")
    for i in range(2):
        subprocess.run(["mosquitto_pub", "-p", str(a.broker.port), "-u", "alice", "-P", PW, "-t",
                        "agw/alice/out/dev-b/bob", "-q", "1", "-m", f"cli {i}"], check=True)
    assert received(sub, 40) == ["agw/bob/in|cli 0", "agw/bob/in|cli 1"]
    # The ACL confines agents: alice cannot publish as bob, nor read bob's inbox.
    denied = subprocess.run(["mosquitto_pub", "-p", str(a.broker.port), "-u", "alice", "-P", PW, "-t",
                             "agw/bob/out/dev-b/bob", "-q", "1", "-m", "spoof", "-V", "mqttv5"],
                            capture_output=True, text=True)
    assert "not authorized" in (denied.stdout + denied.stderr).lower()


def test_a_retained_message_is_sent_once_not_at_every_reconnect(bed):
    """An agent publishing with the retain flag: the gateway takes the message once, live. Its subscription uses
    retain handling 2, so a restart of the gateway (which subscribes again) does not take the retained message in
    again as a new message (a raw agent's copy would get a fresh id: a duplicate the receiver cannot drop)."""
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    sub = subscribed(b.broker.port, "bob", "agw/bob/in", "-W", "25", "-F", "%p")
    subprocess.run(["mosquitto_pub", "-p", str(a.broker.port), "-u", "alice", "-P", PW, "-t",
                    "agw/alice/out/dev-b/bob", "-q", "1", "-r", "-m", "retained once", "-V", "mqttv5"], check=True)
    a.stop()
    a.start()
    a.wait_ready(60)
    out = received(sub, 40)  # mosquitto_sub stops after -W seconds
    # (The retained message stays on broker A: clearing it would be one more message to bob. Only the gateway
    # subscribes to out topics, and it never asks for retained messages.)
    assert out == ["retained once"], out


def test_a_broker_restarted_without_the_gateways_session_is_reported_and_subscribed_again(bed):
    """Mosquitto restarted without its saved state (a crash before its first save, or a lost mosquitto.db) has no
    session and no subscription for the gateway: until the gateway reconnects it drops what agents publish. The
    gateway says so in its log (operators can tell raw agents lost messages) and subscribes again."""
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    before = a.log_text().count("lost this gateway's session")
    a.broker.stop()  # SIGTERM saves the state: remove it, as a crash before the save would
    for f in a.broker.root.glob("*.db"):
        f.unlink()
    a.broker.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and a.log_text().count("lost this gateway's session") == before:
        time.sleep(0.1)
    assert a.log_text().count("lost this gateway's session") == before + 1, a.log_text()[-2000:]
    sub = subscribed(b.broker.port, "bob", "agw/bob/in", "-C", "1", "-W", "20", "-F", "%p")
    subprocess.run(["mosquitto_pub", "-p", str(a.broker.port), "-u", "alice", "-P", PW, "-t",
                    "agw/alice/out/dev-b/bob", "-q", "1", "-m", "after the broker lost its state", "-V", "mqttv5"],
                   check=True)
    out = received(sub, 30)
    assert out == ["after the broker lost its state"], out


async def test_consent_request_approval_and_revocation(bed):
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    async with client(bed, "dev-a", "dora") as dora, client(bed, "dev-b", "bob") as bob:
        await dora.send("dev-b/bob", b"first contact")
        deadline = time.monotonic() + 20
        pending = []
        while time.monotonic() < deadline and not pending:
            pending = [e for e in json.loads(b.agw("consent", "list", "--json").stdout) if e["state"] == "pending"]
            time.sleep(0.2)
        assert pending == [{"agent": "bob", "peer": "dev-a/dora", "state": "pending",
                            "updated_ms": pending[0]["updated_ms"], "holding_message": True}]
        with pytest.raises(TimeoutError):
            await bob.receive(timeout=1.5)
        assert json.loads(b.agw("status", "--json").stdout)["pending_consent"] == 1
        b.agw("consent", "allow", "--agent", "bob", "--peer", "dev-a/dora")
        held = await bob.receive(timeout=10)
        assert (held.sender, held.payload) == ("dev-a/dora", b"first contact")
        await dora.send("dev-b/bob", b"second")
        assert (await bob.receive(timeout=20)).payload == b"second"
        b.agw("consent", "revoke", "--agent", "bob", "--peer", "dev-a/dora")
        await dora.send("dev-b/bob", b"after revocation")
        with pytest.raises(TimeoutError):
            await bob.receive(timeout=3)
    audit = json.loads(b.agw("audit", "list").stdout)
    kinds = [e["event"]["type"] for e in audit]
    assert "consent.requested" in kinds and kinds.count("consent.changed") >= 2 and "message.denied" in kinds
    assert b.agw("audit", "verify").returncode == 0
    # The refused message was dropped by the sender after the final REJECT, not retried forever.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and a.status()["queue"]["outbox_depth"]:
        time.sleep(0.2)
    assert a.status()["queue"]["outbox_depth"] == 0


async def test_no_plaintext_in_store_files(bed):
    marker = b"PLAINTEXT-MARKER-7f3a9c"
    async with client(bed, "dev-a", "alice") as alice, client(bed, "dev-b", "bob") as bob:
        await alice.send("dev-b/bob", marker)
        assert (await bob.receive(timeout=20)).payload == marker
    for gw in bed.gateways.values():
        for f in (gw.root / "state").iterdir():
            if f.is_file():
                data = f.read_bytes()
                assert marker not in data, f
                assert b"alice" not in data or f.name == "status.json", f


def test_audit_verify_detects_an_edit(tmp_path_factory):
    tb = Testbed(tmp_path_factory.mktemp("audit"))
    try:
        tb.start_relay()
        gw = tb.add_gateway("dev-c", agents={"carl": []})
        gw.start()
        gw.wait_ready()
        gw.agw("consent", "allow", "--agent", "carl", "--peer", "dev-x/zed")
        gw.agw("consent", "deny", "--agent", "carl", "--peer", "dev-x/zed")
        assert gw.stop() == 0
        assert gw.agw("audit", "verify").returncode == 0
        db = gw.root / "state" / "agw.db"
        con = sqlite3.connect(db)
        table = next(t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'") if "audit" in t)
        cols = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
        blob_col = next(c for c in cols if c not in ("idx", "id", "i", "at_ms", "k"))
        row = con.execute(f"SELECT rowid, {blob_col} FROM {table} ORDER BY rowid LIMIT 1").fetchone()
        tampered = bytearray(row[1])
        tampered[-1] ^= 1
        con.execute(f"UPDATE {table} SET {blob_col} = ? WHERE rowid = ?", (bytes(tampered), row[0]))
        con.commit()
        con.close()
        out = gw.agw("audit", "verify", check=False)
        assert out.returncode == 1 and "tampered" in out.stderr.lower()
    finally:
        tb.close()


async def test_stream_survives_relay_restart_and_gateway_kill(bed):
    """A stream of 200 messages; midway the relay restarts, then the receiving gateway and later the sending
    gateway are killed with SIGKILL and restarted. Every message arrives exactly once."""
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    n = 200
    received: list[bytes] = []
    async with client(bed, "dev-b", "bob") as bob:
        async def collect() -> None:
            while len(received) < n:
                try:
                    received.append((await bob.receive(timeout=60)).payload)
                except TimeoutError:
                    return

        collector = asyncio.create_task(collect())
        async with client(bed, "dev-a", "alice") as alice:
            for i in range(n):
                await alice.send("dev-b/bob", f"m{i}".encode())
                if i == 60:
                    bed.stop_relay()
                    bed.start_relay()
                if i == 120:
                    b.stop(signal.SIGKILL)
                    b.start()
                    await asyncio.to_thread(b.wait_ready, 60)
                if i == 160:
                    a.stop(signal.SIGKILL)
                    a.start()
        await asyncio.wait_for(collector, 120)
    assert sorted(received, key=lambda p: int(p[1:])) == [f"m{i}".encode() for i in range(n)], \
        f"{len(received)} received, {len(set(received))} distinct"
    assert len(received) == len(set(received)) == n


def test_revoked_device_is_cut_off(tmp_path_factory):
    tb = Testbed(tmp_path_factory.mktemp("revoke"))
    try:
        tb.start_relay()
        x = tb.add_gateway("dev-x", agents={"xavier": []})
        x.start()
        x.wait_ready()
        tb.revoke("dev-x")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and x.status()["link"]["state"] == "ready":
            time.sleep(0.2)
        st = x.status()["link"]
        assert st["state"] != "ready", st
        assert "revoked" in (st["last_error"] or "").lower() or st["state"] == "failed"
    finally:
        tb.close()


async def test_unknown_peer_device_does_not_block_others(bed):
    async with client(bed, "dev-a", "alice") as alice, client(bed, "dev-b", "bob") as bob:
        await alice.send("dev-nowhere/ghost", b"to nobody")
        await alice.send("dev-b/bob", b"still flowing")
        assert (await bob.receive(timeout=20)).payload == b"still flowing"
    # The message for nobody waits in dev-a's outbox, and `agw status` says so (it said 0 whatever the depth).
    a = bed.gateways["dev-a"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not a.status()["queue"]["outbox_depth"]:
        time.sleep(0.2)
    assert a.status()["queue"]["outbox_depth"] == 1
    with pytest.raises(AgentClientError):
        async with AgentClient("alice", port=bed.gateways["dev-a"].broker.port, password="wrong") as _:
            pass


def test_gateway_sigterm_exits_cleanly(tmp_path_factory):
    tb = Testbed(tmp_path_factory.mktemp("term"))
    try:
        tb.start_relay()
        g = tb.add_gateway("dev-t", agents={"tom": []})
        g.start()
        g.wait_ready()
        assert g.stop(signal.SIGTERM) == 0
        assert not (g.root / "state" / "control.sock").exists()
    finally:
        tb.close()




def test_status_of_a_stopped_gateway_counts_its_outbox(tmp_path_factory):
    """`agw status` with the daemon stopped reads the store: the message waiting for a peer that never came
    online is counted (the depth was read under a key the store's stats do not have: always 0)."""
    tb = Testbed(tmp_path_factory.mktemp("offline-status"))
    try:
        tb.start_relay()
        g = tb.add_gateway("dev-t", agents={"tom": []})
        g.start()
        g.wait_ready()

        async def send() -> None:
            async with AgentClient("tom", port=g.broker.port, password=PW) as tom:
                await tom.send("dev-nowhere/ghost", b"to nobody")

        asyncio.run(send())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not g.status()["queue"]["outbox_depth"]:
            time.sleep(0.2)
        assert g.status()["queue"]["outbox_depth"] == 1
        assert g.stop(signal.SIGTERM) == 0
        st = json.loads(g.agw("status", "--json").stdout)
        assert (st["running"], st["queue"]["outbox_depth"]) == (False, 1)
    finally:
        tb.close()


def test_a_zero_width_no_break_space_from_an_agent_is_refused_not_a_protocol_error(bed):
    """U+FEFF is a legal character in an MQTT 5 string (section 1.5.4), and Mosquitto passes it on. If the gateway's
    decoder refused it, the broker connection would drop, Mosquitto would send the unacknowledged message again
    after the reconnect, and every agent of the device would stall behind it. It is taken and refused at ingest
    (paho, the SDK's client, cannot read it), and what the agent sends next goes through."""
    a, b = bed.gateways["dev-a"], bed.gateways["dev-b"]
    sub = subscribed(b.broker.port, "bob", "agw/bob/in", "-C", "1", "-W", "30", "-F", "%p")
    lost_before = a.log_text().count("MQTT broker connection lost")
    dropped_before = a.log_text().count("dropping a message on 'agw/alice/out/dev-b/bob'")
    feff = "\ufeff"
    subprocess.run(["mosquitto_pub", "-p", str(a.broker.port), "-u", "alice", "-P", PW, "-t",
                    "agw/alice/out/dev-b/bob", "-q", "1", "-V", "mqttv5", "-D", "publish", "user-property", "k",
                    f"a{feff}b", "-m", "with U+FEFF"], check=True)
    subprocess.run(["mosquitto_pub", "-p", str(a.broker.port), "-u", "alice", "-P", PW, "-t",
                    "agw/alice/out/dev-b/bob", "-q", "1", "-V", "mqttv5", "-m", "after it"], check=True)
    assert received(sub, 40) == ["after it"]
    log = a.log_text()
    assert log.count("MQTT broker connection lost") == lost_before, log[-2000:]
    assert log.count("dropping a message on 'agw/alice/out/dev-b/bob'") == dropped_before + 1, log[-2000:]
