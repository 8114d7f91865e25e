"""Identity errors: each says which certificate, token or name failed and why."""

from __future__ import annotations

from gateway.protocol.errors import ProtocolError, VerificationError


class IdentityError(ProtocolError):
    """Root of identity errors."""


class BadName(IdentityError):
    """A SPIFFE id, device id or agent name is malformed."""


class CertificateError(IdentityError, VerificationError):
    """A certificate or chain failed validation (signature, validity, constraints, name, revocation)."""


class CertificateRevoked(CertificateError):
    """A certificate in the chain is on the fleet CA's revocation list."""


class TokenError(IdentityError, VerificationError):
    """A relay token is malformed, expired, wrongly audienced, bound to another challenge, or badly signed."""
