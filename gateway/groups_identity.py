"""Who an MLS leaf is, for agent groups: X.509 credentials of agents, checked against the fleet.

A member of a group is an agent. Its leaf is signed by that agent's delegated Ed25519 key, and its credential is
the X.509 chain [agent delegated certificate, device certificate]; the fleet CA is the trust anchor. The
`IdentityValidator` given to the MLS engine checks, for every leaf and KeyPackage it meets: the leaf
certificate certifies exactly the leaf's signature key, the chain verifies against `FleetTrust` now (validity
and the current CRL), and the certificate names an agent (`spiffe://<fleet>/device/<id>/agent/<name>`), never
just a device. Group policy (who may add and remove) travels in a group context extension listing admins.

Delegated keys are renewed (a day before they expire, or by the operator): the agent then commits, in each of
its groups, an UpdatePath whose leaf carries the new key and chain. The `SuccessorValidator` given to the MLS
engine accepts such a new credential only if it names the same agent (same SPIFFE name), chains to the fleet CA
and is not revoked now, and its certificate is not older than the one it replaces.
"""

from __future__ import annotations

import datetime as dt
import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from gateway.protocol.identity.errors import BadName, CertificateError
from gateway.protocol.identity.names import AgentName
from gateway.protocol.identity.trust import FleetTrust, uri_sans
from gateway.protocol.mls.credentials import (
    Credential,
    IdentityValidator,
    MlsCredentialError,
    SuccessorValidator,
    x509_key_binding,
)
from gateway.protocol.mls.crypto import Ed25519Signer
from gateway.protocol.mls.extensions import Extension, find_extension
from gateway.protocol.mls.key_package import Capabilities
from gateway.protocol.mls.wire import CredentialType, ProtocolVersion

CLOCK_SKEW = dt.timedelta(minutes=5)  # members' clocks may differ this much from the issuing device's
SUITE = 1  # MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519: delegated keys are Ed25519
ADMINS_EXTENSION = 0xFA01  # private-use group context extension: who may add and remove members


def capabilities() -> Capabilities:
    """What every agent leaf supports: our suite, X.509 credentials and the admins extension."""
    return Capabilities((ProtocolVersion.MLS10,), (SUITE,), (ADMINS_EXTENSION,), (), (CredentialType.X509,))


@dataclass(frozen=True)
class AgentSigner:
    """An agent's MLS signing key (its delegated key) and credential chain, persisted with the group state so a
    restart signs with the key the leaf holds."""

    agent: str
    seed: bytes
    chain: tuple[bytes, ...]  # DER, leaf first

    @functools.cached_property
    def signer(self) -> Ed25519Signer:
        return Ed25519Signer(self.seed)

    @property
    def credential(self) -> Credential:
        return Credential.x509(self.chain)

    @functools.cached_property
    def certificate(self) -> x509.Certificate:
        """The agent's delegated certificate (the first of the chain)."""
        return x509.load_der_x509_certificate(self.chain[0])

    @property
    def public_key(self) -> bytes:
        return self.signer.public_key

    def to_bytes(self) -> bytes:
        parts = [self.agent.encode(), self.seed, *self.chain]
        return b"".join(struct.pack("!I", len(p)) + p for p in parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> AgentSigner:
        parts, pos = [], 0
        while pos < len(data):
            (n,) = struct.unpack_from("!I", data, pos)
            parts.append(data[pos + 4:pos + 4 + n])
            pos += 4 + n
        if len(parts) < 3 or pos != len(data):
            raise ValueError("corrupt agent signer record")
        return cls(parts[0].decode(), parts[1], tuple(parts[2:]))

    def __repr__(self) -> str:
        return f"AgentSigner(agent={self.agent!r})"


@functools.lru_cache(maxsize=4096)
def _agent_of_der(leaf_der: bytes) -> str:
    cert = x509.load_der_x509_certificate(leaf_der)
    for uri in uri_sans(cert):
        try:
            return AgentName.parse(uri).short
        except BadName:
            continue
    raise MlsCredentialError("the credential does not name an agent")


def agent_of(credential: Credential) -> str:
    """`<device>/<agent>` named by a credential's leaf certificate (validated separately, when it entered the
    tree). Raises MlsCredentialError if it names no agent."""
    if credential.credential_type != CredentialType.X509 or not credential.certificates:
        raise MlsCredentialError("agent credentials are X.509 chains")
    try:
        return _agent_of_der(credential.certificates[0])
    except ValueError as exc:
        raise MlsCredentialError(f"unreadable certificate in credential: {exc}") from None


def fleet_validator(trust: Callable[[], FleetTrust], now: Callable[[], dt.datetime]) -> IdentityValidator:
    """The gateway's IdentityValidator: key binding, chain to the fleet CA (CRL read on every call), agent name."""
    return x509_key_binding(_chain_check(trust, now))


def fleet_successor(trust: Callable[[], FleetTrust], now: Callable[[], dt.datetime]) -> SuccessorValidator:
    """The gateway's SuccessorValidator (RFC 9420 5.3.1), for a member whose leaf changes key or credential
    (after a delegated key renewal): the new chain is signed by the fleet CA, names the same agent
    (`spiffe://<fleet>/device/<id>/agent/<name>`) as the old one, and is not older than it.

    Every member must reach the same verdict, whatever its clock and whichever CRL it has seen: a commit the relay
    accepted but some members refuse forks the group (RFC 9420 5.3.2 asks members to accept commits signed with
    since-expired credentials for the same reason). So validity is checked at the new certificate's own start,
    and revocation is left to the removal commits that follow a new CRL (`_revocations`). `now` is unused here
    and kept for symmetry with `fleet_validator`."""
    del now
    new_start: list[dt.datetime] = []
    check_chain = _chain_check(lambda: FleetTrust(trust().ca), lambda: new_start[-1])

    def validate(old: Credential, new: Credential) -> None:
        if agent_of(new) != agent_of(old):
            raise MlsCredentialError(f"a leaf of {agent_of(old)} cannot change its credential to {agent_of(new)}'s")
        try:
            old_leaf = x509.load_der_x509_certificate(old.certificates[0])
            new_leaf = x509.load_der_x509_certificate(new.certificates[0])
            start = new_leaf.not_valid_before_utc
        except ValueError as exc:
            raise MlsCredentialError(f"unreadable certificate in credential: {exc}") from None
        if start < old_leaf.not_valid_before_utc:
            raise MlsCredentialError(f"{agent_of(new)}: the new delegated certificate is older than the one it "
                                     "replaces")
        new_start.append(start)
        try:
            check_chain(new.certificates)
        finally:
            new_start.clear()

    return validate


def _chain_check(trust: Callable[[], FleetTrust], now: Callable[[], dt.datetime]
                 ) -> Callable[[tuple[bytes, ...]], None]:
    def check_chain(chain_der: tuple[bytes, ...]) -> None:
        try:
            certs = [x509.load_der_x509_certificate(c) for c in chain_der]
            t = now()
            if certs and t < certs[0].not_valid_before_utc <= t + CLOCK_SKEW:
                t = certs[0].not_valid_before_utc  # a clock a little behind the issuer's must not fork the group
            verified = trust().verify_chain(certs, now=t)
        except (ValueError, CertificateError) as exc:
            raise MlsCredentialError(f"credential rejected: {exc}") from None
        if verified.agent is None:
            raise MlsCredentialError("an MLS leaf must carry an agent's delegated certificate, not a device's")
        if _agent_of_der(chain_der[0]) != verified.agent.short:
            raise MlsCredentialError("the credential's agent name does not match its certificate")

    return check_chain


def admins_extension(admins: list[str]) -> Extension:
    return Extension(ADMINS_EXTENSION, "\n".join(admins).encode())


def admins_of(extensions: tuple[Extension, ...]) -> list[str]:
    ext = find_extension(extensions, ADMINS_EXTENSION)
    if ext is None or not ext.extension_data:
        return []
    return ext.extension_data.decode().split("\n")
