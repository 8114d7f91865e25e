"""Test doubles for code that uses pairwise sessions before the real identity layer is wired in.

`ToyAuthority` stands in for the X.509 chain: a credential is `device id || delegated verify key || authority
signature`, and `verify_credential` checks exactly that. Never use it outside tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from gateway.protocol.pairwise.crypto import Ed25519Signer, RandomSource
from gateway.protocol.pairwise.prekeys import PrekeyStore


class ToyAuthority:
    """Issues and checks toy credentials binding a device id to a delegated Ed25519 key."""

    def __init__(self) -> None:
        self._key = nacl.signing.SigningKey.generate()
        self.revoked: set[str] = set()

    def issue(self, device_id: str, verify_key: bytes) -> bytes:
        body = len(device_id.encode()).to_bytes(1, "big") + device_id.encode() + verify_key
        return body + bytes(self._key.sign(body).signature)

    def verify_credential(self, device_id: str, credential: bytes) -> bytes:
        if device_id in self.revoked:
            raise ValueError(f"device {device_id!r} is revoked")
        body, signature = credential[:-64], credential[-64:]
        try:
            self._key.verify_key.verify(body, signature)
        except nacl.exceptions.BadSignatureError:
            raise ValueError("credential signature invalid") from None
        n = body[0]
        if body[1 : 1 + n].decode() != device_id or len(body) != 1 + n + 32:
            raise ValueError("credential is for another device")
        return body[1 + n :]


@dataclass
class ToyDevice:
    """A device as the session layer sees it: id, delegated signer, credential, prekeys."""

    device_id: str
    signer: Ed25519Signer
    credential: bytes
    prekeys: PrekeyStore

    @classmethod
    def make(
        cls, authority: ToyAuthority, device_id: str, *, now_ms: int = 0, one_time: int = 5,
        random: RandomSource = os.urandom,
    ) -> ToyDevice:
        signer = Ed25519Signer(nacl.signing.SigningKey(random(32)))
        return cls(
            device_id, signer, authority.issue(device_id, signer.verify_key),
            PrekeyStore.generate(now_ms=now_ms, one_time_count=one_time, random=random),
        )
