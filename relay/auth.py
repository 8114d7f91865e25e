"""Token verification, behind a small interface so the relay does not care how tokens are checked.

`FleetVerifier` adapts the identity layer (gateway.protocol.identity): the JWT, its x5c chain to the fleet CA,
audience, challenge binding, expiry and the CRL are all checked there. This module only maps outcomes onto
AUTH_FAIL codes and swaps in a new CRL when the file changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.protocol.link import AuthFailCode


@dataclass(frozen=True, slots=True)
class VerifiedAuth:
    device_id: str
    expires_at: int
    serial: int  # the device certificate's serial, checked against every new CRL


class AuthFailure(Exception):
    """A token was refused; `code` goes into AUTH_FAIL, `reason` is safe to send and log."""

    def __init__(self, code: AuthFailCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class TokenVerifier(Protocol):
    def verify(self, token: str, *, audience: str, challenge: bytes, now: int) -> VerifiedAuth:
        """Return who the token proves, or raise AuthFailure."""
        ...

    def is_revoked(self, serial: int) -> bool: ...

    def reload_crl(self, crl_pem: bytes) -> None:
        """Replace the revocation list; raise on a list not signed by the fleet CA (the old one stays)."""
        ...


class FleetVerifier:
    """The real verifier: fleet CA + CRL from PEM, tokens checked by gateway.protocol.identity.tokens."""

    def __init__(self, ca_pem: bytes, crl_pem: bytes | None = None) -> None:
        from gateway.protocol.identity.trust import FleetTrust

        self._trust = FleetTrust.from_pem(ca_pem, crl_pem)

    @classmethod
    def from_files(cls, ca_file: Path, crl_file: Path | None) -> FleetVerifier:
        crl = crl_file.read_bytes() if crl_file is not None and crl_file.exists() else None
        return cls(ca_file.read_bytes(), crl)

    def verify(self, token: str, *, audience: str, challenge: bytes, now: int) -> VerifiedAuth:
        from gateway.protocol.identity.errors import IdentityError, TokenExpired, TokenRevoked, TokenUntrusted
        from gateway.protocol.identity.tokens import verify_relay_token

        try:
            v = verify_relay_token(token, trust=self._trust, audience=audience, challenge=challenge, now=now)
        except TokenRevoked as exc:
            raise AuthFailure(AuthFailCode.REVOKED, str(exc)) from None
        except TokenExpired as exc:
            raise AuthFailure(AuthFailCode.EXPIRED, str(exc)) from None
        except TokenUntrusted as exc:
            raise AuthFailure(AuthFailCode.UNTRUSTED, str(exc)) from None
        except IdentityError as exc:
            raise AuthFailure(AuthFailCode.INVALID_TOKEN, str(exc)) from None
        return VerifiedAuth(v.device_id, v.expires_at, v.serial)

    def is_revoked(self, serial: int) -> bool:
        return self._trust.is_revoked(serial)

    def reload_crl(self, crl_pem: bytes) -> None:
        self._trust = self._trust.with_crl(crl_pem)
