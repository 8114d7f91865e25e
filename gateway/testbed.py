"""A whole fleet on loopback, made of real parts: a fleet CA, a relay process with TLS 1.3, Mosquitto brokers
with per-agent passwords and ACLs, SoftHSM2 tokens, and `agw run` gateway processes.

Used by `make demo`, the integration tests and the benchmarks, so that all three exercise what a user runs.
Everything lives in one temporary directory and every process is stopped by `close()`.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _tls_ca(d: Path) -> tuple[Path, Path, Path]:
    """A TLS CA and a relay server certificate for 127.0.0.1/localhost (distinct from the fleet CA)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agw testbed relay TLS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / "relay-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "relay.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "relay.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (d / "relay.key").chmod(0o600)
    return d / "relay-ca.pem", d / "relay.pem", d / "relay.key"


@dataclass
class Broker:
    """A Mosquitto broker with per-agent passwords and the ACL template of firmware-config/."""

    root: Path
    port: int
    users: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        pw = self.root / "passwd"
        pw.write_text("")
        for user, password in self.users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True, capture_output=True)
        template = (Path(__file__).resolve().parent.parent / "firmware-config" / "mosquitto" / "acl.template")
        (self.root / "acl").write_text(template.read_text().replace("@GATEWAY_USER@", "agw-gateway"))
        (self.root / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n"
            f"acl_file {self.root / 'acl'}\npersistence true\npersistence_location {self.root}/\n"
            "autosave_interval 1\nmax_queued_messages 0\nmax_inflight_messages 0\nset_tcp_nodelay true\n"
            f"log_dest file {self.root / 'mosquitto.log'}\n"
            # As root, Mosquitto would switch to the 'mosquitto' user, who cannot read a private temp dir.
            + (f"user {pwd.getpwuid(os.getuid()).pw_name}\n" if os.getuid() == 0 else ""))
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.root / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


@dataclass
class Gateway:
    name: str
    root: Path
    config: Path
    env: dict[str, str]
    broker: Broker
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self) -> None:
        self.log = self.root / "agw.log"
        logf = self.log.open("ab")
        self.proc = subprocess.Popen([PY, "-m", "gateway.cli", "run", "--config", str(self.config)], env=self.env,
                                     stdout=logf, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, object]:
        import json

        deadline = time.monotonic() + timeout
        status = self.root / "state" / "status.json"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway {self.name} exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                st = json.loads(status.read_text())
                if st["link"]["state"] == "ready" and st["mqtt"]["connected"] and st["pid"] == self.proc.pid:  # type: ignore[union-attr]
                    return st  # type: ignore[no-any-return]
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gateway {self.name} not ready after {timeout} s:\n{self.log_text()}")

    def status(self) -> dict[str, object]:
        import json

        return json.loads((self.root / "state" / "status.json").read_text())  # type: ignore[no-any-return]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(5)
        return self.proc.returncode if self.proc else None

    def agw(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([PY, "-m", "gateway.cli", *args, "--config", str(self.config)], env=self.env,
                             capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"agw {' '.join(args)} failed: {out.stderr}")
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log and self.log.exists() else ""


@dataclass
class Testbed:
    __test__ = False  # not a pytest test class

    root: Path
    fleet: str = "testbed.local"
    relay_port: int = field(default_factory=free_port)
    relay_proc: subprocess.Popen[bytes] | None = None
    gateways: dict[str, Gateway] = field(default_factory=dict)
    brokers: list[Broker] = field(default_factory=list)
    relay_extra: list[str] = field(default_factory=list)
    agent_password: str = "agent-secret"  # noqa: S105 - throwaway credential of a loopback test broker

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.ca_dir = self.root / "fleet-ca"
        self.tls_ca, self.tls_cert, self.tls_key = _tls_ca(self.root)
        self.env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.env["PYTHONUNBUFFERED"] = "1"
        self._agw("ca", "init", "--dir", str(self.ca_dir), "--fleet", self.fleet)

    def _agw(self, *args: str, env: dict[str, str] | None = None) -> str:
        out = subprocess.run([PY, "-m", "gateway.cli", *args], env=env or self.env, capture_output=True, text=True,
                             timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"agw {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    # -- relay -------------------------------------------------------------------------------------------------
    def start_relay(self) -> None:
        self.relay_log = self.root / "relay.log"
        logf = self.relay_log.open("ab")
        self.relay_proc = subprocess.Popen(
            [PY, "-m", "relay.cli", "--host", "127.0.0.1", "--port", str(self.relay_port), "--audience",
             f"relay.{self.fleet}", "--cert", str(self.tls_cert), "--key", str(self.tls_key), "--ca",
             str(self.ca_dir / "ca.pem"), "--crl", str(self.ca_dir / "crl.pem"), *self.relay_extra],
            env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        wait_port(self.relay_port, proc=self.relay_proc)

    def stop_relay(self, sig: int = signal.SIGTERM) -> None:
        if self.relay_proc and self.relay_proc.poll() is None:
            self.relay_proc.send_signal(sig)
            self.relay_proc.wait(15)

    # -- gateways ----------------------------------------------------------------------------------------------
    def add_gateway(self, name: str, *, agents: dict[str, list[str]], algorithm: str = "ed25519",
                    broker: Broker | None = None) -> Gateway:
        """Provision a device as a fleet operator would: token, keys on the token, CSR, CA signature, install."""
        root = self.root / name
        hsm_dir = root / "softhsm"
        (hsm_dir / "tokens").mkdir(parents=True)
        conf = hsm_dir / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {hsm_dir / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
        env = {**self.env, "SOFTHSM2_CONF": str(conf)}
        pin = f"pin-{os.urandom(6).hex()}"
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", f"agw-{name}", "--pin", pin,
                        "--so-pin", "0000" + pin], env=env, check=True, capture_output=True)
        (root / "pin").write_text(pin)
        (root / "pin").chmod(0o600)
        if broker is None:
            users = {"agw-gateway": "gateway-secret", **{a: self.agent_password for a in agents}}
            broker = Broker(root / "mosquitto", free_port(), users)
            broker.start()
            self.brokers.append(broker)
        (root / "mqtt-password").write_text("gateway-secret")
        uri = (f"pkcs11:token=agw-{name};object={{obj}}?module-path={SOFTHSM_MODULE}"
               f"&pin-source=file:{root / 'pin'}")
        agents_yaml = "".join(f"  {a}:\n    allow: [{', '.join(repr(p) for p in allow)}]\n"
                              for a, allow in agents.items())
        cfg = root / "agw.yaml"
        cfg.write_text(f"""device:
  fleet: {self.fleet}
  id: {name}
keys:
  identity: "{uri.format(obj='agw-identity')}"
  storage: "{uri.format(obj='agw-storage')}"
  algorithm: {algorithm}
paths:
  state_dir: state
relay:
  url: wss://127.0.0.1:{self.relay_port}/
  ca_file: {self.tls_ca}
  audience: relay.{self.fleet}
mqtt:
  host: 127.0.0.1
  port: {broker.port}
  username: agw-gateway
  password_file: mqtt-password
agents:
{agents_yaml or '  {}'}
logging:
  level: info
""")
        self._agw("keys", "init", "--config", str(cfg), env=env)
        self._agw("enroll", "csr", "--config", str(cfg), "--device-id", name, "--out", str(root / "device.csr"),
                  env=env)
        self._agw("ca", "sign", "--dir", str(self.ca_dir), "--csr", str(root / "device.csr"), "--out",
                  str(root / "device.pem"), "--device-id", name)
        self._agw("enroll", "install", "--config", str(cfg), "--cert", str(root / "device.pem"), "--chain",
                  str(self.ca_dir / "ca.pem"), env=env)
        gw = Gateway(name, root, cfg, env, broker)
        self.gateways[name] = gw
        return gw

    def start_alice_and_bob(self, timeout: float = 30.0) -> tuple[Gateway, Gateway]:
        """The usual pair: the relay, dev-a with alice and dev-b with bob (allowed to each other), both ready."""
        self.start_relay()
        a = self.add_gateway("dev-a", agents={"alice": ["dev-b/bob"]})
        b = self.add_gateway("dev-b", agents={"bob": ["dev-a/alice"]})
        for gw in (a, b):
            gw.start()
        for gw in (a, b):
            gw.wait_ready(timeout)
        return a, b

    def revoke(self, name: str) -> None:
        self._agw("ca", "revoke", "--dir", str(self.ca_dir), "--device-id", name)

    def close(self) -> None:
        for gw in self.gateways.values():
            gw.stop()
        self.stop_relay()
        for b in self.brokers:
            b.stop()
