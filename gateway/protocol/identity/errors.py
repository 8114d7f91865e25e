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


class CertificateExpired(CertificateError):
    """A certificate in the chain is not valid at the time of the check."""


class TokenError(IdentityError, VerificationError):
    """A relay token is malformed, expired, wrongly audienced, bound to another challenge, or badly signed."""


class TokenRevoked(TokenError):
    """The token's certificate chain contains a revoked certificate."""


class TokenExpired(TokenError):
    """The token, or a certificate in its chain, is outside its validity period."""


class TokenUntrusted(TokenError):
    """The token's certificate chain does not lead to the fleet CA (or breaks its rules)."""
