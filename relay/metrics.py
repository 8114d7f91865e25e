"""Prometheus metrics for the relay. Labels carry reasons and codes, never device ids or payload bytes."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class RelayMetrics:
    """One registry per relay instance, so several relays (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("agw_relay_connections", "Open WebSocket connections", registry=r)
        self.authenticated = Gauge("agw_relay_authenticated_devices", "Authenticated devices connected", registry=r)
        self.connections_total = Counter("agw_relay_connections_accepted", "Connections accepted", registry=r)
        self.closed = Counter("agw_relay_closed", "Connections closed by the relay", ["reason"], registry=r)
        self.envelopes_routed = Counter("agw_relay_envelopes_routed", "Envelopes queued to a recipient", registry=r)
        self.undeliverable = Counter(
            "agw_relay_envelopes_undeliverable", "Envelopes answered UNDELIVERABLE", ["reason"], registry=r
        )
        self.bytes_in = Counter("agw_relay_received_bytes", "Link frame bytes received", registry=r)
        self.bytes_out = Counter("agw_relay_sent_bytes", "Link frame bytes sent", registry=r)
        self.auth_failures = Counter("agw_relay_auth_failures", "Failed authentications", ["code"], registry=r)
        self.rate_limited = Counter("agw_relay_rate_limited", "Envelopes or requests over a rate limit", registry=r)
        self.crl_reloads = Counter("agw_relay_crl_reloads", "CRL reloads", ["result"], registry=r)
        self._http: Any = None

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint in a thread; returns the bound port (useful with port 0)."""
        server, _thread = start_http_server(port, host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
