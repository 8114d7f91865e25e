"""`agw run` validates its configuration in a forked child (`load_config(path, isolated=True)`) and keeps only
plain dataclasses, so that the daemon never holds pydantic or PyYAML in memory. Both ways must give the same
configuration and the same errors, and the dataclasses must have exactly the fields of the validating model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config, config_schema
from gateway.config import ConfigError, load_config
from hsm.api import KeyAlgorithm

FULL = """\
device: {fleet: acme.test, id: pi-7}
keys:
  identity: "pkcs11:token=dev;object=identity"
  storage: "pkcs11:token=dev;object=storage"
  algorithm: ecdsa-p256
  delegated_lifetime_hours: 48
paths: {state_dir: state, certificate: certs/dev.pem}
relay: {url: "wss://relay.acme.test:8443/", ca_file: relay-ca.pem, audience: relay.acme.test}
mqtt: {port: 1884, username: agw-gateway, password_file: mqtt.pw}
agents:
  alice: {allow: [pi-8/bob, "pi-9/*"]}
  carol: {}
store: {durability: crash, outbox_max_entries: 10}
logging: {level: debug, format: json}
"""

MINIMAL = """\
device: {fleet: acme.test}
keys: {identity: "pkcs11:token=dev;object=identity", storage: "pkcs11:token=dev;object=storage"}
"""

PAIRS = [(config.GatewayConfig, config_schema.GatewayConfig), (config.DeviceSection, config_schema.DeviceSection),
         (config.KeysSection, config_schema.KeysSection), (config.PathsSection, config_schema.PathsSection),
         (config.RelaySection, config_schema.RelaySection), (config.MqttSection, config_schema.MqttSection),
         (config.AgentSection, config_schema.AgentSection), (config.StoreSection, config_schema.StoreSection),
         (config.LoggingSection, config_schema.LoggingSection)]


@pytest.mark.parametrize(("plain", "model"), PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_dataclasses_have_the_fields_of_the_model(plain: type, model: type) -> None:
    assert [f.name for f in dataclasses.fields(plain)] == list(model.model_fields)  # type: ignore[attr-defined]


@pytest.mark.parametrize("text", [FULL, MINIMAL], ids=["full", "minimal"])
def test_isolated_and_in_process_give_the_same_configuration(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agw.yaml"
    path.write_text(text)
    cfg = load_config(path, isolated=True)
    assert cfg == load_config(path)
    if text is FULL:
        assert cfg.keys.algorithm is KeyAlgorithm.ECDSA_P256
        assert cfg.paths.state_dir == tmp_path / "state" and cfg.certificate_path == tmp_path / "certs" / "dev.pem"
        assert cfg.relay is not None and cfg.relay.ca_file == tmp_path / "relay-ca.pem"
        assert cfg.mqtt.password_file == tmp_path / "mqtt.pw" and cfg.mqtt.host == "127.0.0.1"
        assert cfg.agents["alice"].allow == ["pi-8/bob", "pi-9/*"] and cfg.agents["carol"].allow == []
        assert cfg.store.durability == "crash" and cfg.store.outbox_max_bytes == 256 * 1024 * 1024
    else:
        assert cfg.relay is None and cfg.agents == {} and cfg.logging.level == "info"


@pytest.mark.parametrize("text", ["device: {fleet: acme.test}\nkeys: {identity: x, storage: y}\nbogus: 1\n",
                                  "device: [unclosed\n", "- a list\n"], ids=["invalid", "yaml", "not-a-mapping"])
def test_isolated_errors_are_the_same_config_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agw.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as in_process:
        load_config(path)
    with pytest.raises(ConfigError) as isolated:
        load_config(path, isolated=True)
    assert str(isolated.value) == str(in_process.value) and str(path) in str(isolated.value)


def test_missing_file_isolated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "nope.yaml", isolated=True)


def test_the_daemon_never_imports_pydantic_or_yaml(tmp_path: Path) -> None:
    path = tmp_path / "agw.yaml"
    path.write_text(FULL)
    script = (f"import sys, gateway.cli, gateway.daemon, gateway.groups\n"
              f"from gateway.config import load_config\n"
              f"cfg = load_config({str(path)!r}, isolated=True)\n"
              f"print(cfg.device.id, sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', "
              f"'pydantic_core', 'yaml')))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(None, 1) == ["pi-7", "[]\n"]
