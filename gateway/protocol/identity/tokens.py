"""Relay authentication tokens: JWTs signed by the device's hardware identity key.

Python's `ssl` cannot do client TLS with a token-held key, so the gateway proves its identity inside the TLS
channel instead: the relay sends a fresh challenge, the gateway answers with a JWT (EdDSA or ES256) that carries
its certificate chain in `x5c`, the relay's audience in `aud` and the challenge in `nonce`, valid for at most an
hour. Any standard JWT library can verify one; we use PyJWT.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import json
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.protocol.identity.errors import (
    CertificateError,
    CertificateExpired,
    CertificateRevoked,
    TokenError,
    TokenExpired,
    TokenRevoked,
    TokenUntrusted,
)
from gateway.protocol.identity.signer import Signer, der_to_raw_ecdsa
from gateway.protocol.identity.trust import FleetTrust
from hsm.api import KeyAlgorithm

MAX_LIFETIME = 3600
CLOCK_SKEW = 60
MAX_TOKEN_BYTES = 16384


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _jws_alg(algorithm: KeyAlgorithm) -> str:
    return "EdDSA" if algorithm is KeyAlgorithm.ED25519 else "ES256"


def mint_relay_token(
    key: Signer,
    *,
    chain: list[x509.Certificate],
    audience: str,
    challenge: bytes,
    now: int,
    lifetime: int = MAX_LIFETIME,
) -> str:
    """Sign a token with `key` (one hardware operation). `chain[0]` must be the device certificate of `key`."""
    if not 0 < lifetime <= MAX_LIFETIME:
        raise ValueError(f"token lifetime must be 1..{MAX_LIFETIME} s")
    subject = _subject(chain[0])
    header = {"alg": _jws_alg(key.algorithm), "typ": "JWT",
              "x5c": [base64.b64encode(c.public_bytes(Encoding.DER)).decode("ascii") for c in chain]}
    claims = {"iss": subject, "sub": subject, "aud": audience, "iat": now, "nbf": now - 5, "exp": now + lifetime,
              "jti": _b64url(os.urandom(12)), "nonce": _b64url(challenge)}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     _b64url(json.dumps(claims, separators=(",", ":")).encode()))
    signature = key.sign(signing_input.encode("ascii"))
    if key.algorithm is KeyAlgorithm.ECDSA_P256:
        signature = der_to_raw_ecdsa(signature)
    return signing_input + "." + _b64url(signature)


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    device_id: str
    fleet: str
    expires_at: int
    serial: int
    spiffe_id: str


def verify_relay_token(token: str, *, trust: FleetTrust, audience: str, challenge: bytes, now: int) -> VerifiedToken:
    """Check signature, chain (CA, validity, revocation), audience, challenge binding and lifetime."""
    import jwt  # the relay verifies tokens; a gateway only mints them, and PyJWT costs it ~4 MB of memory

    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise TokenError("token missing or larger than 16 KiB")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenError(f"malformed token: {exc}") from None
    alg = header.get("alg")
    if alg not in ("EdDSA", "ES256"):
        raise TokenError(f"token algorithm {alg!r} not accepted (EdDSA or ES256)")
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not 1 <= len(x5c) <= 3 or not all(isinstance(c, str) for c in x5c):
        raise TokenError("token header must carry the certificate chain in x5c")
    try:
        chain = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c]
    except (ValueError, x509.InvalidVersion) as exc:
        raise TokenError(f"unreadable certificate in x5c: {exc}") from None
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    try:
        verified = trust.verify_chain(chain, now=when)
    except CertificateRevoked as exc:
        raise TokenRevoked(f"certificate chain rejected: {exc}") from None
    except CertificateExpired as exc:
        raise TokenExpired(f"certificate chain rejected: {exc}") from None
    except CertificateError as exc:
        raise TokenUntrusted(f"certificate chain rejected: {exc}") from None
    if verified.leaf != verified.device_certificate:
        raise TokenError("relay tokens must be signed by the device identity key, not a delegated key")
    key = verified.leaf_public_key
    expected_alg = "EdDSA" if alg == "EdDSA" else "ES256"
    try:
        claims = jwt.decode(token, key=key, algorithms=[expected_alg], audience=audience,
                            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                     "require": ["iss", "sub", "aud", "iat", "nbf", "exp", "nonce"]})
    except jwt.InvalidAudienceError:
        raise TokenError(f"token audience is not {audience!r}") from None
    except jwt.PyJWTError as exc:
        raise TokenError(f"token rejected: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise TokenError(f"token rejected: {exc}") from None
    iat, nbf, exp = claims["iat"], claims["nbf"], claims["exp"]
    if not all(isinstance(v, int) for v in (iat, nbf, exp)):
        raise TokenError("iat, nbf and exp must be integers")
    if exp - iat > MAX_LIFETIME:
        raise TokenError(f"token lifetime {exp - iat} s exceeds {MAX_LIFETIME} s")
    if now + CLOCK_SKEW < nbf or now > exp + CLOCK_SKEW:
        raise TokenExpired("token expired or not yet valid")
    if claims["sub"] != verified.device.uri or claims["iss"] != verified.device.uri:
        raise TokenError(f"token subject {claims['sub']!r} does not match certificate {verified.device.uri!r}")
    nonce = claims["nonce"]
    if not isinstance(nonce, str) or not hmac.compare_digest(nonce.encode(), _b64url(challenge).encode()):
        raise TokenError("token is bound to another challenge (replayed?)")
    return VerifiedToken(device_id=verified.device.device_id, fleet=verified.device.fleet, expires_at=exp,
                         serial=verified.device_certificate.serial_number, spiffe_id=verified.device.uri)


def _subject(cert: x509.Certificate) -> str:
    from gateway.protocol.identity.trust import uri_sans

    for uri in uri_sans(cert):
        if "/device/" in uri and "/agent/" not in uri:
            return uri
    raise CertificateError("the device certificate has no spiffe://<fleet>/device/<id> URI SAN")
