"""MLS errors: every failure on input from outside is an `MlsError` (a `ProtocolError`)."""

from __future__ import annotations

from gateway.protocol.errors import DecodeError, ProtocolError


class MlsError(ProtocolError):
    """Root of MLS errors."""


class MlsDecodeError(MlsError, DecodeError):
    """Bytes are not a valid encoding of the expected MLS structure."""
