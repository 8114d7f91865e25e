"""Relay configuration: every limit in one frozen dataclass, with defaults sized for a small fleet."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gateway.protocol.link import LinkLimits


class ConfigError(Exception):
    """The relay configuration is invalid; the message names the setting."""


@dataclass(frozen=True, slots=True)
class RelayConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    audience: str = "agw-relay"  # what gateways' tokens must name in `aud`
    cert_file: Path | None = None  # server certificate chain (PEM)
    key_file: Path | None = None
    ca_file: Path | None = None  # fleet CA certificate: tokens chain to it
    crl_file: Path | None = None  # CA-signed revocation list, re-read when it changes
    crl_poll_interval: float = 1.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # Prometheus endpoint; off unless set

    link: LinkLimits = field(default_factory=LinkLimits)
    max_envelope_size: int = 256 * 1024  # larger envelopes are answered UNDELIVERABLE too-big
    max_connections: int = 10_000
    tls_read_buffer: int = 17_408  # bytes per TLS connection: one record of 16 KiB plus overhead
    auth_timeout: float = 10.0  # seconds from connect to AUTH_OK
    idle_timeout: float = 120.0  # seconds without any frame from an authenticated gateway
    ping_interval: float | None = 20.0  # WebSocket pings, to notice dead TCP peers
    expiry_grace: float = 60.0  # clock skew allowed past a token's expiry before the connection is closed
    close_timeout: float = 2.0  # a peer that does not complete the closing handshake is cut off after this
    send_queue_envelopes: int = 1024  # per connection: beyond this, the sender hears CONGESTED
    send_queue_bytes: int = 4 * 1024 * 1024
    rate_envelopes: float = 500.0  # per device, tokens per second
    burst_envelopes: float = 2000.0
    rate_bytes: float = 8 * 1024 * 1024
    burst_bytes: float = 32 * 1024 * 1024
    rate_requests: float = 20.0  # prekey/KeyPackage fetches and publishes per device
    burst_requests: float = 200.0
    directory_max_devices: int = 100_000
    directory_max_one_time: int = 200

    def __post_init__(self) -> None:
        if self.max_envelope_size + 64 > self.link.max_frame_size:
            raise ConfigError("max_envelope_size must leave room for the frame header within link.max_frame_size")
        for name in ("auth_timeout", "idle_timeout", "crl_poll_interval", "rate_envelopes", "rate_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file and key_file go together")

    @property
    def keepalive(self) -> int:
        """What AUTH_OK tells gateways: send at least one frame this often (seconds)."""
        return max(1, int(self.idle_timeout / 3))

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> RelayConfig:
        """Load `[relay]` and optional `[relay.link]` tables; unknown keys are errors, not silently ignored."""
        try:
            data = tomllib.loads(path.read_text()).get("relay", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cls.from_mapping(data, **overrides)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], **overrides: Any) -> RelayConfig:
        data = dict(data)
        link_data = data.pop("link", {})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown relay settings: {', '.join(sorted(unknown))}")
        link_known = {f.name for f in fields(LinkLimits)}
        if set(link_data) - link_known:
            raise ConfigError(f"unknown relay.link settings: {', '.join(sorted(set(link_data) - link_known))}")
        for key in ("cert_file", "key_file", "ca_file", "crl_file"):
            if data.get(key) is not None:
                data[key] = Path(data[key])
        try:
            cfg = cls(**data, link=LinkLimits(**link_data))
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
