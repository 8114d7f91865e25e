"""The configuration file's schema: the pydantic model that validates a YAML file and publishes the JSON schema.

`gateway.config` is what the rest of the gateway imports: it runs this validation (in a short-lived forked child
for `agw run`, so that the daemon never holds pydantic in memory) and hands out plain frozen dataclasses.
Errors name the file, the key path and what was expected (`ConfigError`). Relative paths are resolved against the
directory of the config file, so a configuration and its files can be moved together. Secrets are never in this
file: PINs come from a pin-source (file, environment, systemd credential) named in the key URIs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.config import ConfigError
from hsm.api import KeyAlgorithm
from hsm.errors import BadKeyUri
from hsm.uri import Pkcs11Uri, Tpm2Ref

Name = Annotated[str, Field(pattern=r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_key_uri(value: str) -> str:
    try:
        if value.startswith("pkcs11:"):
            Pkcs11Uri.parse(value)
        elif value.startswith("tpm2:"):
            Tpm2Ref.parse(value)
        else:
            raise ValueError("a key URI must start with 'pkcs11:' or 'tpm2:'")
    except BadKeyUri as exc:
        raise ValueError(str(exc)) from None
    return value


class DeviceSection(_Model):
    """Who this device is in the fleet."""

    fleet: Annotated[str, Field(pattern=r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$",
                                description="Fleet name: the SPIFFE trust domain")]
    id: Name | None = Field(default=None, description="Device id; set at enrollment")


class KeysSection(_Model):
    """Where the hardware keys live."""

    identity: str = Field(description="pkcs11: URI (RFC 7512) or tpm2: reference of the identity key")
    storage: str = Field(description="pkcs11: URI or tpm2:sealed= reference of the storage key")
    algorithm: KeyAlgorithm = Field(default=KeyAlgorithm.ED25519,
                                    description="Identity key algorithm: ed25519 (PKCS#11 with CKM_EDDSA) or "
                                                "ecdsa-p256 (any PKCS#11 token, TPM)")
    delegated_lifetime_hours: int = Field(default=168, ge=1, le=24 * 90,
                                          description="Lifetime of delegated signing keys (default 7 days)")

    @field_validator("identity", "storage")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _check_key_uri(value)


class PathsSection(_Model):
    state_dir: Path = Field(default=Path("/var/lib/agw"), description="Where the store and certificates live")
    certificate: Path | None = Field(default=None, description="Device certificate (default state_dir/device.pem)")
    ca_certificate: Path | None = Field(default=None, description="Fleet CA certificate (default state_dir/ca.pem)")


class RelaySection(_Model):
    url: Annotated[str, Field(pattern=r"^wss://[^\s/]+(/\S*)?$", description="wss://host:port of the relay")]
    ca_file: Path = Field(description="CA bundle that signs the relay's TLS certificate")
    audience: str = Field(min_length=1, description="The relay's name as it appears in auth tokens")
    server_name: str | None = Field(default=None, description="TLS server name, if not the URL host")


class MqttSection(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password_file: Path | None = None
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] = "agw"


class AgentSection(_Model):
    allow: list[str] = Field(default_factory=list,
                             description="Peers allowed to send to this agent, as <device-id>/<agent> "
                                         "(or <device-id>/* for every agent of a device)")


class StoreSection(_Model):
    durability: Literal["power-loss", "crash"] = Field(
        default="power-loss",
        description="power-loss: fsync each outbox write before acknowledging the broker (survives power loss); "
                    "crash: survives a crash of any process but not a power loss, saving ~one fsync per message")
    outbox_max_entries: int = Field(default=100_000, ge=1)
    outbox_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    message_ttl_seconds: int = Field(default=24 * 3600, ge=1)
    delivered_retention_days: int = Field(default=30, ge=1)
    audit_retention_days: int = Field(default=365, ge=1)
    held_max_per_agent: int = Field(
        default=10_000, ge=0,
        description="messages kept after hand-over for one acknowledging (SDK) agent until it acknowledges them; "
                    "beyond this, further messages to that agent are deleted once the broker has them, as for a "
                    "raw MQTT agent (0: never hold)")


class LoggingSection(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class GatewayConfig(_Model):
    """The whole configuration file."""

    device: DeviceSection
    keys: KeysSection
    paths: PathsSection = Field(default_factory=PathsSection)
    relay: RelaySection | None = None
    mqtt: MqttSection = Field(default_factory=MqttSection)
    agents: dict[Name, AgentSection] = Field(default_factory=dict)
    store: StoreSection = Field(default_factory=StoreSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid configuration ({exc.error_count()} problem{'s' * (exc.error_count() > 1)}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key (check the spelling; see firmware-config/schema/agw-config.schema.json)"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], dict | list):
                msg += f" (got {err['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _resolve(base: Path, data: Any) -> Any:
    """Resolve relative filesystem paths against the config file's directory."""
    if not isinstance(data, dict):
        return data
    paths = data.get("paths")
    if isinstance(paths, dict):
        for k in ("state_dir", "certificate", "ca_certificate"):
            if isinstance(paths.get(k), str) and not Path(paths[k]).is_absolute():
                paths[k] = str(base / paths[k])
    for section, keys in (("relay", ("ca_file",)), ("mqtt", ("password_file",))):
        sec = data.get(section)
        if isinstance(sec, dict):
            for k in keys:
                if isinstance(sec.get(k), str) and not Path(sec[k]).is_absolute():
                    sec[k] = str(base / sec[k])
    return data


def validated(path: Path | str) -> dict[str, Any]:
    """Read, parse and validate a configuration file; its content with every default filled in, as JSON types."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                          "save the file as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level (device:, keys:, ...)")
    try:
        model = GatewayConfig.model_validate(_resolve(path.resolve().parent, data))
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None
    return model.model_dump(mode="json")


def json_schema() -> str:
    schema = GatewayConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://agw.dev/schema/agw-config.schema.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
