"""The gateway's configuration: one YAML file, a typed model, a published JSON schema.

The model that validates the file and publishes the schema is in `gateway.config_schema` (pydantic). What the
gateway's code reads is here: plain frozen dataclasses built from the validated file, every default filled in.
`agw run` validates in a short-lived forked child (`load_config(path, isolated=True)`) so that the long-running
daemon never imports pydantic or PyYAML (about 10 MB of resident memory); the other commands validate in-process.

Errors name the file, the key path and what was expected (`ConfigError`). Relative paths are resolved against the
directory of the config file, so a configuration and its files can be moved together. Secrets are never in this
file: PINs come from a pin-source (file, environment, systemd credential) named in the key URIs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hsm.api import KeyAlgorithm

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "firmware-config" / "schema" / "agw-config.schema.json"


class ConfigError(Exception):
    """A configuration file is missing, unreadable or invalid. The message lists every problem."""


@dataclass(frozen=True, slots=True)
class DeviceSection:
    fleet: str
    id: str | None


@dataclass(frozen=True, slots=True)
class KeysSection:
    identity: str
    storage: str
    algorithm: KeyAlgorithm
    delegated_lifetime_hours: int


@dataclass(frozen=True, slots=True)
class PathsSection:
    state_dir: Path
    certificate: Path | None
    ca_certificate: Path | None


@dataclass(frozen=True, slots=True)
class RelaySection:
    url: str
    ca_file: Path
    audience: str
    server_name: str | None


@dataclass(frozen=True, slots=True)
class MqttSection:
    host: str
    port: int
    username: str | None
    password_file: Path | None
    topic_prefix: str


@dataclass(frozen=True, slots=True)
class AgentSection:
    allow: list[str]


@dataclass(frozen=True, slots=True)
class StoreSection:
    durability: Literal["power-loss", "crash"]
    outbox_max_entries: int
    outbox_max_bytes: int
    message_ttl_seconds: int
    delivered_retention_days: int
    audit_retention_days: int
    held_max_per_agent: int


@dataclass(frozen=True, slots=True)
class LoggingSection:
    level: Literal["debug", "info", "warning", "error"]
    format: Literal["text", "json"]


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole configuration file, validated (see `gateway.config_schema` for the rules and defaults)."""

    device: DeviceSection
    keys: KeysSection
    paths: PathsSection
    relay: RelaySection | None
    mqtt: MqttSection
    agents: dict[str, AgentSection]
    store: StoreSection
    logging: LoggingSection

    @property
    def certificate_path(self) -> Path:
        return self.paths.certificate or self.paths.state_dir / "device.pem"

    @property
    def ca_path(self) -> Path:
        return self.paths.ca_certificate or self.paths.state_dir / "ca.pem"


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def from_validated(d: dict[str, Any]) -> GatewayConfig:
    """The dataclasses for a validated configuration (`gateway.config_schema.validated`)."""
    k, p, m, r = d["keys"], d["paths"], d["mqtt"], d["relay"]
    return GatewayConfig(
        device=DeviceSection(**d["device"]),
        keys=KeysSection(identity=k["identity"], storage=k["storage"], algorithm=KeyAlgorithm(k["algorithm"]),
                         delegated_lifetime_hours=k["delegated_lifetime_hours"]),
        paths=PathsSection(state_dir=Path(p["state_dir"]), certificate=_path(p["certificate"]),
                           ca_certificate=_path(p["ca_certificate"])),
        relay=None if r is None else RelaySection(url=r["url"], ca_file=Path(r["ca_file"]), audience=r["audience"],
                                                  server_name=r["server_name"]),
        mqtt=MqttSection(host=m["host"], port=m["port"], username=m["username"],
                         password_file=_path(m["password_file"]), topic_prefix=m["topic_prefix"]),
        agents={name: AgentSection(allow=list(a["allow"])) for name, a in d["agents"].items()},
        store=StoreSection(**d["store"]),
        logging=LoggingSection(**d["logging"]))


def load_config(path: Path | str, *, isolated: bool = False) -> GatewayConfig:
    """Read and validate a configuration file. `isolated`: validate in a forked child process, which alone
    imports pydantic and PyYAML (for the daemon: they are needed once, at start-up)."""
    path = Path(path)
    if not isolated:
        from gateway.config_schema import validated

        return from_validated(validated(path))
    return from_validated(_validated_in_child(path))


def _validated_in_child(path: Path) -> dict[str, Any]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: validate, write one JSON answer, exit without running any cleanup of the parent's
        code = 0
        try:
            os.close(r)
            try:
                from gateway.config_schema import validated

                answer: dict[str, Any] = {"ok": validated(path)}
            except ConfigError as exc:
                answer = {"error": str(exc)}
            except Exception as exc:  # reported by the parent as a ConfigError naming the file
                answer = {"error": f"{path}: cannot load the configuration: {type(exc).__name__}: {exc}"}
            with os.fdopen(w, "wb") as f:
                f.write(json.dumps(answer).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        raw = f.read()
    _, status = os.waitpid(pid, 0)
    try:
        answer = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{path}: the configuration check failed (exit status {status:#x}); run "
                          f"`agw config check --config {path}` to see why") from None
    if "error" in answer:
        raise ConfigError(answer["error"])
    return answer["ok"]  # type: ignore[no-any-return]


def json_schema() -> str:
    """The published JSON schema (firmware-config/schema/agw-config.schema.json) of the configuration file."""
    from gateway.config_schema import json_schema as schema

    return schema()
