"""MLS errors: every failure on input from outside is an `MlsError` (a `ProtocolError`)."""

from __future__ import annotations

from gateway.protocol.errors import DecodeError, ProtocolError, ReplayError, VerificationError


class MlsError(ProtocolError):
    """Root of MLS errors."""


class MlsDecodeError(MlsError, DecodeError):
    """Bytes are not a valid encoding of the expected MLS structure."""


class MlsCryptoError(MlsError):
    """A cryptographic operation could not be performed on the given input (bad key, invalid DH output)."""


class MlsVerificationError(MlsError, VerificationError):
    """A signature, MAC, AEAD tag, membership tag or confirmation tag did not verify."""


class MlsReplayError(MlsError, ReplayError):
    """A message reuses a generation whose key was already consumed or is outside the accepted window."""
