"""Fixtures for group tests: the relay fixtures of tests/relay are reused (a real relay over TLS 1.3)."""

from tests.relay.conftest import env, fleet, tls  # noqa: F401  (pytest fixtures)
