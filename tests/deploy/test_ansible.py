"""The playbook, for real: ansible/site.yml provisions this machine (ansible_connection=local) into a temporary
root - Mosquitto config, ACL and passwords, a SoftHSM token with the PIN as a credential, the gateway config,
keys made on the "device", a CSR signed by the fleet CA on the "controller", the certificate installed, the
systemd units rendered - and the relay role beside it. systemd is not PID 1 here, so the roles skip only the
systemctl steps. A second run must change nothing.

Then the gateway is started exactly as its rendered unit's ExecStart would start it (environment, credentials
directory, notify socket and watchdog from the unit), against Mosquitto running the rendered configuration and a
testbed relay, and one message goes to an agent behind a second (testbed) gateway and back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.client import AgentClient
from gateway.testbed import MOSQUITTO, Testbed, free_port, wait_port
from tests.deploy.units import credentials, environment, exec_argv, parse_unit, value

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
VENV_BIN = Path(sys.executable).parent
PW_ALICE = "alice-password-1"
PW_GATEWAY = "gateway-password-1"


@dataclass
class Provisioned:
    tb: Testbed
    root: Path
    runs: list[subprocess.CompletedProcess[str]]
    mqtt_port: int
    relay_port: int
    env: dict[str, str]


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines -> {host: {"ok": n, "changed": n, "failed": n, ...}}"""
    out = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", output, re.M):
        out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


def playbook(inventory: Path, extra: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), "-e", f"@{extra}",
                           str(ANSIBLE / "site.yml")], cwd=ANSIBLE, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    base = tmp_path_factory.mktemp("deploy")
    tb_started = time.monotonic()
    tb = Testbed(base / "bed")
    try:
        tb.start_relay()
        peer = tb.add_gateway("peer", agents={"bob": ["dev-1/alice"]})
        peer.start()
        root = base / "root"
        mqtt_port, relay_port = free_port(), free_port()
        (base / "tls").mkdir()
        variables = {
            "ansible_become": False,
            "ansible_python_interpreter": sys.executable,
            # hsm
            "hsm_backend": "softhsm", "hsm_install_packages": False, "hsm_pin": "1234-test-pin",
            "hsm_credstore_dir": f"{root}/etc/credstore", "hsm_softhsm_conf": f"{root}/etc/agw/softhsm2.conf",
            "hsm_softhsm_tokendir": f"{root}/var/lib/agw/softhsm/tokens",
            # mosquitto
            "mosquitto_install_packages": False, "mosquitto_conf_dir": f"{root}/etc/mosquitto",
            "mosquitto_port": mqtt_port, "mosquitto_gateway_password": PW_GATEWAY,
            "mosquitto_agents": {"alice": PW_ALICE}, "mosquitto_owner": "root", "mosquitto_group": "root",
            # gateway (the "device" is this machine; the venv is the project's own, already holding agw)
            "gateway_user": "root", "gateway_group": "root", "gateway_manage_user": False,
            "gateway_install_packages": False,
            "gateway_venv": sys.prefix, "gateway_python": sys.executable,
            "gateway_pip_extra_args": f"--no-index --no-deps --find-links {base / 'no-wheels'}",
            "gateway_config_dir": f"{root}/etc/agw", "gateway_state_dir": f"{root}/var/lib/agw",
            "gateway_systemd_dir": f"{root}/etc/systemd/system", "gateway_credstore_dir": f"{root}/etc/credstore",
            "gateway_softhsm_conf": f"{root}/etc/agw/softhsm2.conf",
            "gateway_fleet": tb.fleet, "gateway_device_id": "dev-1",
            "gateway_relay_url": f"wss://127.0.0.1:{tb.relay_port}/", "gateway_relay_audience": f"relay.{tb.fleet}",
            "gateway_relay_ca_src": str(tb.tls_ca), "gateway_mqtt_port": mqtt_port,
            "gateway_mqtt_password": PW_GATEWAY, "gateway_agents": {"alice": ["peer/bob"]},
            "gateway_ca_dir": str(tb.ca_dir), "gateway_ca_command": str(VENV_BIN / "agw"),
            "gateway_controller_enroll_dir": str(base / "controller"), "gateway_log_format": "text",
            # relay role (rendered and checked here; the running relay is the testbed's)
            "relay_venv": sys.prefix, "relay_python": sys.executable, "relay_install_packages": False,
            "relay_pip_extra_args": f"--no-index --no-deps --find-links {base / 'no-wheels'}",
            "relay_config_dir": f"{root}/etc/agw-relay", "relay_systemd_dir": f"{root}/etc/systemd/system",
            "relay_host": "127.0.0.1", "relay_port": relay_port, "relay_audience": f"relay.{tb.fleet}",
            "relay_tls_cert_src": str(tb.tls_cert), "relay_tls_key_src": str(tb.tls_key),
            "relay_fleet_ca_src": str(tb.ca_dir / "ca.pem"), "relay_crl_src": str(tb.ca_dir / "crl.pem"),
        }
        for d in ("etc/systemd/system", "no-wheels"):
            (root / d if d.startswith("etc") else base / d).mkdir(parents=True, exist_ok=True)
        extra = base / "vars.json"
        extra.write_text(json.dumps(variables))
        inventory = base / "hosts.yml"
        inventory.write_text("all:\n  children:\n    relays:\n      hosts:\n        relay-1:\n"
                             "          ansible_connection: local\n    gateways:\n      hosts:\n        dev-1:\n"
                             "          ansible_connection: local\n")
        env = {k: v for k, v in tb.env.items() if k != "SOFTHSM2_CONF"}
        # The project venv's editable install maps `hsm` as a namespace package (it was installed before
        # hsm/__init__.py existed), so outside the checkout `import hsm` finds an empty package. Commands run from
        # / or /tmp here (like under systemd), so point Python at the checkout. A fresh `pip install -e .` fixes it.
        env["PYTHONPATH"] = str(ROOT)
        env.update(ANSIBLE_HOME=str(base / "ansible-home"), ANSIBLE_LOCAL_TEMP=str(base / "ansible-tmp"),
                   ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", PATH=f"{VENV_BIN}:{os.environ['PATH']}")
        t0 = time.monotonic()
        runs = [playbook(inventory, extra, env)]
        t1 = time.monotonic()
        runs.append(playbook(inventory, extra, env))
        print(f"\nplaybook runs: {t1 - t0:.1f} s, {time.monotonic() - t1:.1f} s; testbed {t0 - tb_started:.1f} s")
        yield Provisioned(tb, root, runs, mqtt_port, relay_port, env)
    finally:
        tb.close()


def test_first_run_provisions(provisioned: Provisioned) -> None:
    first = provisioned.runs[0]
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-2000:]
    rc = recap(first.stdout)
    assert set(rc) == {"dev-1", "relay-1"}
    assert rc["dev-1"]["changed"] > 0 and rc["dev-1"]["failed"] == 0
    root = provisioned.root
    for path in ("etc/agw/agw.yaml", "etc/credstore/agw-pin", "var/lib/agw/device.pem", "var/lib/agw/ca.pem",
                 "etc/mosquitto/agw.passwd", "etc/mosquitto/agw.acl", "etc/systemd/system/agw-gateway.service",
                 "etc/systemd/system/agw-rotate.service", "etc/systemd/system/agw-rotate.timer",
                 "etc/systemd/system/agw-relay.service", "etc/agw-relay/relay.toml"):
        assert (root / path).exists(), path
    assert (root / "etc/credstore/agw-pin").stat().st_mode & 0o077 == 0
    assert "1234-test-pin" not in (root / "etc/agw/agw.yaml").read_text()
    assert PW_ALICE not in (root / "etc/mosquitto/agw.passwd").read_text()
    assert not (root / "etc/mosquitto/agw.passwd.new").exists()


def test_secrets_stay_out_of_the_playbook_output(provisioned: Provisioned) -> None:
    for run in provisioned.runs:
        for secret in ("1234-test-pin", PW_ALICE, PW_GATEWAY):
            assert secret not in run.stdout + run.stderr


def test_only_the_csr_and_the_certificate_reached_the_controller(provisioned: Provisioned) -> None:
    """Keys are made on the device: the controller's enrollment directory holds a CSR and a certificate only."""
    controller = provisioned.root.parent / "controller"
    assert sorted(p.name for p in controller.iterdir()) == ["dev-1.csr", "dev-1.pem"]
    assert b"PRIVATE KEY" not in b"".join(p.read_bytes() for p in controller.iterdir())


def test_second_run_changes_nothing(provisioned: Provisioned) -> None:
    second = provisioned.runs[1]
    assert second.returncode == 0, second.stdout[-6000:]
    rc = recap(second.stdout)
    assert {h: r["changed"] for h, r in rc.items()} == {"dev-1": 0, "relay-1": 0}, second.stdout[-6000:]


def test_certificate_was_issued_by_the_fleet_ca_for_the_device_key(provisioned: Provisioned) -> None:
    out = subprocess.run([str(VENV_BIN / "agw"), "keys", "show", "--json", "--config",
                          str(provisioned.root / "etc/agw/agw.yaml")], capture_output=True, text=True,
                         env={**provisioned.env, "CREDENTIALS_DIRECTORY": str(provisioned.root / "etc/credstore"),
                              "SOFTHSM2_CONF": str(provisioned.root / "etc/agw/softhsm2.conf")}, timeout=60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["certificate"]["device_id"] == "dev-1"
    assert info["identity"]["backend"].startswith("pkcs11") or "pkcs11" in info["identity"]["uri"]
    # made inside the token: not extractable
    attrs = info["identity"]["attributes"]
    assert attrs.get("extractable") in (False, "False", "false"), attrs


def test_rendered_relay_config_loads(provisioned: Provisioned) -> None:
    from relay.config import RelayConfig

    cfg = RelayConfig.from_toml(provisioned.root / "etc/agw-relay/relay.toml")
    assert cfg.port == provisioned.relay_port and cfg.audience == f"relay.{provisioned.tb.fleet}"
    assert cfg.key_file is not None and cfg.key_file.stat().st_mode & 0o077 == 0


class NotifySocket:
    """The manager's end of sd_notify: a datagram socket like systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in m for m in self.messages):
                return True
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        return any(text in m for m in self.messages)


def start_as_systemd_would(unit_path: Path, base_env: dict[str, str], run_dir: Path,
                           notify: NotifySocket | None) -> tuple[subprocess.Popen[bytes], Path]:
    """ExecStart= argv, Environment=, LoadCredential= (copied to a private credentials directory), NOTIFY_SOCKET
    and WATCHDOG_USEC from WatchdogSec=, working directory /: the parts of the unit that shape the process."""
    unit = parse_unit(unit_path)
    creds = run_dir / "credentials"
    creds.mkdir(mode=0o700)
    for name, src in credentials(unit).items():
        shutil.copyfile(src, creds / name)
        (creds / name).chmod(0o400)
    env = {k: v for k, v in base_env.items() if k not in ("SOFTHSM2_CONF", "CREDENTIALS_DIRECTORY")}
    env.update(environment(unit))
    env["CREDENTIALS_DIRECTORY"] = str(creds)
    if value(unit, "Service", "Type") == "notify":
        assert notify is not None
        watchdog = value(unit, "Service", "WatchdogSec")
        assert watchdog and watchdog.endswith("s")
        env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(int(watchdog[:-1]) * 1_000_000))
    exec_start = value(unit, "Service", "ExecStart")
    assert exec_start
    argv = exec_argv(exec_start, {"d": str(creds), "t": str(run_dir)})
    log = run_dir / f"{unit_path.stem}.log"
    proc = subprocess.Popen(argv, env=env, cwd="/", stdout=log.open("ab"), stderr=subprocess.STDOUT)
    return proc, log


def test_gateway_started_like_the_unit_passes_a_message(provisioned: Provisioned, tmp_path: Path) -> None:
    root = provisioned.root
    # Mosquitto with the configuration, ACL and passwords the role wrote (running as root: `user root`).
    main_conf = tmp_path / "mosquitto.conf"
    main_conf.write_text(f"include_dir {root}/etc/mosquitto/conf.d\nuser root\n"
                         f"log_dest file {tmp_path / 'mosquitto.log'}\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(main_conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    notify = NotifySocket(tmp_path / "notify")
    proc = None
    try:
        wait_port(provisioned.mqtt_port, proc=broker)
        proc, log = start_as_systemd_would(root / "etc/systemd/system/agw-gateway.service", provisioned.env,
                                           tmp_path, notify)
        assert notify.wait_for("READY=1", 60), f"no READY=1; log:\n{log.read_text()[-3000:]}"
        status = root / "var/lib/agw/status.json"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                st = json.loads(status.read_text())
                if st["link"]["state"] == "ready" and st["mqtt"]["connected"] and st["pid"] == proc.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        else:
            pytest.fail(f"gateway not ready:\n{log.read_text()[-3000:]}")
        peer = provisioned.tb.gateways["peer"]
        peer.wait_ready()

        async def exchange() -> None:
            async with AgentClient("alice", port=provisioned.mqtt_port, password=PW_ALICE) as alice, \
                    AgentClient("bob", port=peer.broker.port, password=provisioned.tb.agent_password) as bob:
                await alice.send("peer/bob", b"provisioned by ansible")
                got = await bob.receive(timeout=30)
                assert (got.sender, got.payload) == ("dev-1/alice", b"provisioned by ansible")
                await bob.send("dev-1/alice", b"and back")
                back = await alice.receive(timeout=30)
                assert (back.sender, back.payload) == ("peer/bob", b"and back")

        asyncio.run(exchange())
        assert notify.wait_for("WATCHDOG=1", 20), "the daemon never pinged the watchdog"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # Restart=on-failure: a clean stop must exit 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        broker.terminate()
        broker.wait(10)


def test_rendered_units_verify_and_score(provisioned: Provisioned) -> None:
    """The units the playbook rendered for this (non-default) layout still load and stay hardened."""
    units = provisioned.root / "etc/systemd/system"
    names = ["agw-gateway.service", "agw-rotate.service", "agw-rotate.timer", "agw-relay.service"]
    out = subprocess.run(["systemd-analyze", "verify", *[f"./{n}" for n in names]], cwd=units, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    gateway = parse_unit(units / "agw-gateway.service")
    assert value(gateway, "Service", "ReadWritePaths") == str(provisioned.root / "var/lib/agw")
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", "./agw-gateway.service"], cwd=units,
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for agw-gateway.service: (\d+\.\d)", sec.stdout)
    assert m and float(m.group(1)) <= 2.0, sec.stdout[-2000:]


def test_relay_started_like_its_unit_serves_tls_with_the_credential_key(provisioned: Provisioned,
                                                                       tmp_path: Path) -> None:
    """agw-relay as its rendered unit starts it: TOML from the role, TLS key from the credentials directory (%d)."""
    import ssl

    proc, log = start_as_systemd_would(provisioned.root / "etc/systemd/system/agw-relay.service", provisioned.env,
                                       tmp_path, None)
    try:
        wait_port(provisioned.relay_port, timeout=30, proc=proc)
        ctx = ssl.create_default_context(cafile=str(provisioned.tb.tls_ca))
        with socket.create_connection(("127.0.0.1", provisioned.relay_port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.3"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_mosquitto_role_rebuilds_passwords_only_when_they_change(tmp_path: Path) -> None:
    """Hashes are salted, so idempotency rests on the digest file: same passwords, no change; a new password,
    a new file that Mosquitto accepts for the new password and refuses for the old one."""
    play = tmp_path / "mosquitto.yml"
    play.write_text(f"- name: Broker only\n  hosts: all\n  gather_facts: false\n  roles:\n"
                    f"    - role: {ANSIBLE / 'roles' / 'mosquitto'}\n")
    port = free_port()
    conf = tmp_path / "etc" / "mosquitto"
    base = {"ansible_python_interpreter": sys.executable, "mosquitto_install_packages": False,
            "mosquitto_conf_dir": str(conf), "mosquitto_port": port, "mosquitto_gateway_password": PW_GATEWAY,
            "mosquitto_owner": "root", "mosquitto_group": "root"}
    env = {**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah"), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "at"),
           "ANSIBLE_NOCOLOR": "1"}

    def run(alice_password: str) -> dict[str, int]:
        extra = tmp_path / "vars.json"
        extra.write_text(json.dumps({**base, "mosquitto_agents": {"alice": alice_password}}))
        out = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", "-e",
                              f"@{extra}", str(play)], cwd=ANSIBLE, env=env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stdout[-4000:]
        return recap(out.stdout)["localhost"]

    assert run("first-password")["changed"] > 0
    hashed = (conf / "agw.passwd").read_text()
    assert run("first-password")["changed"] == 0
    assert run("second-password")["changed"] > 0
    assert (conf / "agw.passwd").read_text() != hashed

    main_conf = tmp_path / "mosquitto.conf"
    main_conf.write_text(f"include_dir {conf}/conf.d\nuser root\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(main_conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=broker)

        def publish(password: str) -> int:
            return subprocess.run(["mosquitto_pub", "-p", str(port), "-u", "alice", "-P", password, "-t",
                                   "agw/alice/out/x/y", "-m", "hi", "-q", "1"], capture_output=True,
                                  timeout=30).returncode

        assert publish("second-password") == 0
        assert publish("first-password") != 0
    finally:
        broker.terminate()
        broker.wait(10)
