"""The two message paths measured side by side, each a set of real processes on loopback.

- `OurPath`: agent -> Mosquitto -> `agw run` -> `agw-relay` (TLS 1.3) -> `agw run` -> Mosquitto -> agent, built
  with `gateway.testbed` (fleet CA, SoftHSM tokens, per-agent ACLs). The relay's per-device rate limit is raised
  through its TOML config so that the benchmark measures the pipeline, not the abuse limiter.
- `BridgePath`: what a user would pick instead: a local Mosquitto bridged to a remote one over mutual TLS 1.3,
  configured as the peer measurement did, plus `max_queued_messages 0` so QoS 1 messages are not dropped.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.testbed import MOSQUITTO, Gateway, Testbed, free_port, wait_port

PY = sys.executable
AGENT_A, AGENT_B = "alice", "bob"
DEV_A, DEV_B = "bench-a", "bench-b"

RELAY_TOML = """[relay]
rate_envelopes = 10000000.0
burst_envelopes = 10000000.0
rate_bytes = 10000000000.0
burst_bytes = 10000000000.0
send_queue_envelopes = 65536
send_queue_bytes = 268435456
max_connections = {max_connections}
"""


def relay_config(root: Path, max_connections: int = 10_000) -> Path:
    """A relay TOML that lifts the per-device rate limits (defaults: 500 envelopes/s) for benchmarking."""
    path = root / "relay-bench.toml"
    path.write_text(RELAY_TOML.format(max_connections=max_connections))
    return path


def rss_kib(pid: int) -> int:
    """Resident set size of a process from /proc/<pid>/status (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class OurPath:
    """Two gateways and a relay; agent A (alice on bench-a) talks to agent B (bob on bench-b)."""

    root: Path
    profile_dir: Path | None = None  # when set, both gateways run under cProfile and write their profiles here
    durability: str | None = None  # experiment: the gateways' store.durability ("crash" skips the fsync)
    stage_dir: Path | None = None  # when set, each gateway writes per-stage timestamps here (bench/stages.py)
    extra_env: dict[str, str] = field(default_factory=dict)  # experiment: e.g. MALLOC_ARENA_MAX for the gateways
    bed: Testbed | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        bed = Testbed(self.root / "bed")
        self.bed = bed
        bed.relay_extra = ["--config", str(relay_config(bed.root)), "--log-level", "warning"]
        bed.start_relay()
        bed.add_gateway(DEV_A, agents={AGENT_A: [f"{DEV_B}/{AGENT_B}"]})
        bed.add_gateway(DEV_B, agents={AGENT_B: [f"{DEV_A}/{AGENT_A}"]})
        if self.durability is not None:
            for gw in bed.gateways.values():
                gw.config.write_text(gw.config.read_text() + f"store:\n  durability: {self.durability}\n")
        for gw in bed.gateways.values():
            gw.env.update(self.extra_env)
        for name, gw in bed.gateways.items():
            if self.stage_dir is not None:
                self.stage_dir.mkdir(parents=True, exist_ok=True)
                gw.env["AGW_STAGE_TRACE"] = str(self.stage_dir / f"{name}.trace")
            if self.profile_dir is not None:
                start_profiled(gw, self.profile_dir / f"gateway-{name}.prof")
            else:
                gw.start()
        for gw in bed.gateways.values():
            gw.wait_ready(60)

    def gateway(self, name: str) -> Gateway:
        assert self.bed is not None
        return self.bed.gateways[name]

    def tput_spec(self) -> dict[str, Any]:
        pw = self.bed.agent_password if self.bed else ""
        return {"pub": {"port": self.gateway(DEV_A).broker.port, "username": AGENT_A, "password": pw,
                        "topic": f"agw/{AGENT_A}/out/{DEV_B}/{AGENT_B}"},
                "sub": {"port": self.gateway(DEV_B).broker.port, "username": AGENT_B, "password": pw,
                        "topic": f"agw/{AGENT_B}/in"}}

    def rtt_spec(self) -> dict[str, Any]:
        pw = self.bed.agent_password if self.bed else ""
        return {"ping": {"port": self.gateway(DEV_A).broker.port, "username": AGENT_A, "password": pw,
                         "pub_topic": f"agw/{AGENT_A}/out/{DEV_B}/{AGENT_B}", "sub_topic": f"agw/{AGENT_A}/in"},
                "echo": {"port": self.gateway(DEV_B).broker.port, "username": AGENT_B, "password": pw,
                         "pub_topic": f"agw/{AGENT_B}/out/{DEV_A}/{AGENT_A}", "sub_topic": f"agw/{AGENT_B}/in"}}

    def pids(self) -> dict[str, int]:
        """Every process of the path: the relay, each gateway and each broker."""
        assert self.bed is not None and self.bed.relay_proc is not None
        out = {"relay": self.bed.relay_proc.pid}
        for name, gw in self.bed.gateways.items():
            assert gw.proc is not None and gw.broker.proc is not None
            out[f"gateway {name}"] = gw.proc.pid
            out[f"mosquitto {name}"] = gw.broker.proc.pid
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        """The daemons' own counters (sent, delivered, acked, duplicates, ...) from their control sockets."""
        from gateway import control

        out = {}
        for name, gw in (self.bed.gateways.items() if self.bed else ()):
            st = control.request(gw.root / "state" / "control.sock", {"cmd": "status"}, timeout=5)
            out[name] = {k: int(v) for k, v in st.get("counters", {}).items() if isinstance(v, int)}
        return out

    def close(self) -> None:
        if self.bed is not None:
            self.bed.close()


def start_profiled(gw: Gateway, out: Path) -> None:
    """Start `agw run` under cProfile with the loop thread's CPU clock (`bench/profiled_gateway.py`; written when
    the daemon exits after SIGTERM); same env and config."""
    out.parent.mkdir(parents=True, exist_ok=True)
    gw.log = gw.root / "agw.log"
    logf = gw.log.open("ab")
    runner = str(Path(__file__).with_name("profiled_gateway.py"))
    gw.proc = subprocess.Popen([PY, runner, str(out), "run", "--config", str(gw.config)], env=gw.env, stdout=logf,
                               stderr=subprocess.STDOUT)


# -- the Mosquitto TLS bridge --------------------------------------------------------------------------------
def _cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
          *, ca: bool = False, server: bool = False) -> x509.Certificate:
    import ipaddress

    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_bridge_certs(d: Path) -> None:
    """ca.crt, bridgeA.crt/key (client) and brokerB.crt/key (server), as the peer setup made with openssl."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench bridge CA")])
    ca = _cert("bench bridge CA", ca_key, ca_name, ca_key, ca=True)
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, server in (("bridgeA", False), ("brokerB", True)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, ca_name, ca_key, server=server)
        (d / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                                          serialization.NoEncryption()))
        (d / f"{name}.key").chmod(0o600)


COMMON = """per_listener_settings false
allow_anonymous true
persistence false
set_tcp_nodelay true
max_queued_messages 0
max_inflight_messages 0
log_dest file {log}
log_type error
log_type warning
"""


@dataclass
class BridgePath:
    """Broker A (plain loopback listener) bridged out to broker B (mTLS 1.3 listener) for bench/# and rt/#."""

    root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    port_a: int = 0
    port_b: int = 0

    def start(self) -> None:
        certs = self.root / "certs"
        make_bridge_certs(certs)
        self.port_a, self.port_b, tls_b = free_port(), free_port(), free_port()
        conf_b = self.root / "broker-b.conf"
        conf_b.write_text(COMMON.format(log=self.root / "broker-b.log") + f"""listener {self.port_b} 127.0.0.1
listener {tls_b} 127.0.0.1
cafile {certs}/ca.crt
certfile {certs}/brokerB.crt
keyfile {certs}/brokerB.key
require_certificate true
tls_version tlsv1.3
""")
        conf_a = self.root / "broker-a.conf"
        conf_a.write_text(COMMON.format(log=self.root / "broker-a.log") + f"""listener {self.port_a} 127.0.0.1

connection toB
address 127.0.0.1:{tls_b}
bridge_protocol_version mqttv311
try_private true
cleansession true
topic bench/# out 1
topic rt/# both 1
bridge_cafile {certs}/ca.crt
bridge_certfile {certs}/bridgeA.crt
bridge_keyfile {certs}/bridgeA.key
bridge_tls_version tlsv1.3
bridge_insecure false
""")
        user = _run_as_self()
        for conf, port in ((conf_b, self.port_b), (conf_a, self.port_a)):
            if user:
                conf.write_text(conf.read_text() + user)
            proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            self.procs.append(proc)
            wait_port(port, proc=proc)
        wait_bridge(self.port_a, self.port_b)

    def pids(self) -> dict[str, int]:
        return {"mosquitto A (bridge)": self.procs[1].pid, "mosquitto B": self.procs[0].pid}

    def tput_spec(self) -> dict[str, Any]:
        return {"pub": {"port": self.port_a, "topic": "bench/t"}, "sub": {"port": self.port_b, "topic": "bench/t"}}

    def rtt_spec(self) -> dict[str, Any]:
        return {"ping": {"port": self.port_a, "pub_topic": "rt/ping", "sub_topic": "rt/pong"},
                "echo": {"port": self.port_b, "pub_topic": "rt/pong", "sub_topic": "rt/ping"}}

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def _run_as_self() -> str:
    """As root, Mosquitto switches to the 'mosquitto' user, who cannot read a private temp dir."""
    if os.getuid() != 0:
        return ""
    import pwd

    return f"user {pwd.getpwuid(os.getuid()).pw_name}\n"


def wait_bridge(port_a: int, port_b: int, timeout: float = 15.0) -> None:
    """Wait until a probe published on broker A reaches a subscriber on broker B (the bridge is up)."""
    import threading
    import time

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-probe-sub")
    sub.on_message = lambda *a: got.set()
    sub.connect("127.0.0.1", port_b)
    sub.subscribe("bench/probe", 1)
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-probe-pub")
    pub.connect("127.0.0.1", port_a)
    pub.loop_start()
    deadline = time.monotonic() + timeout
    try:
        while not got.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Mosquitto bridge did not carry a message within {timeout} s")
            pub.publish("bench/probe", b"probe", qos=1)
            got.wait(0.2)
    finally:
        for c in (sub, pub):
            c.loop_stop()
            c.disconnect()
