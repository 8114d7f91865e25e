"""HPKE (RFC 9180) base mode with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and AES-128-GCM,
ChaCha20-Poly1305 or export-only.

Why our own: `cryptography` 50 offers single-shot HPKE only, without the exporter, DeriveKeyPair or
deterministic encapsulation that MLS (external init, TreeKEM node keys) and the RFC vectors need.
The library's single-shot API is used in the tests as an independent cross-check.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field

import nacl.bindings as _sodium
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from gateway.protocol.mls.errors import MlsCryptoError, MlsVerificationError

KEM_X25519_HKDF_SHA256 = 0x0020
KDF_HKDF_SHA256 = 0x0001
AEAD_AES_128_GCM = 0x0001
AEAD_CHACHA20_POLY1305 = 0x0003
AEAD_EXPORT_ONLY = 0xFFFF

MODE_BASE = 0x00

_NH = 32  # HKDF-SHA256 output length
_NSECRET = 32
_NSK = 32
_AEAD_PARAMS = {AEAD_AES_128_GCM: (16, 12), AEAD_CHACHA20_POLY1305: (32, 12), AEAD_EXPORT_ONLY: (0, 0)}


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt if salt else bytes(_NH), ikm, hashlib.sha256)


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    if length <= _NH:  # one block: the common case for MLS keys, nonces and secrets
        return hmac.digest(prk, info + b"\x01", hashlib.sha256)[:length]
    if length > 255 * _NH:
        raise MlsCryptoError(f"HKDF-Expand length {length} exceeds 255*Nh")
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), hashlib.sha256)
        out += block
        counter += 1
    return out[:length]


def aead_seal(aead_id: int, key: bytes, nonce: bytes, aad: bytes, pt: bytes) -> bytes:
    if aead_id == AEAD_AES_128_GCM:
        return AESGCM(key).encrypt(nonce, pt, aad)
    if aead_id == AEAD_CHACHA20_POLY1305:
        return ChaCha20Poly1305(key).encrypt(nonce, pt, aad)
    raise MlsCryptoError(f"AEAD 0x{aead_id:04x} cannot seal")


def aead_open(aead_id: int, key: bytes, nonce: bytes, aad: bytes, ct: bytes) -> bytes:
    try:
        if aead_id == AEAD_AES_128_GCM:
            return AESGCM(key).decrypt(nonce, ct, aad)
        if aead_id == AEAD_CHACHA20_POLY1305:
            return ChaCha20Poly1305(key).decrypt(nonce, ct, aad)
    except InvalidTag:
        raise MlsVerificationError("AEAD decryption failed: wrong key or tampered ciphertext") from None
    raise MlsCryptoError(f"AEAD 0x{aead_id:04x} cannot open")


def x25519_dh(sk: bytes, pk: bytes) -> bytes:
    """X25519 (libsodium, about twice as fast here as OpenSSL through `cryptography`), with the all-zero output
    check of RFC 9180 section 7.1.4 (libsodium refuses an all-zero result)."""
    if len(sk) != 32 or len(pk) != 32:
        raise MlsCryptoError("X25519 keys must be 32 bytes")
    try:
        return bytes(_sodium.crypto_scalarmult(sk, pk))
    except nacl.exceptions.CryptoError:
        raise MlsCryptoError("X25519 produced an all-zero shared secret (small-order public key)") from None


def x25519_public(sk: bytes) -> bytes:
    if len(sk) != 32:
        raise MlsCryptoError("X25519 private key must be 32 bytes")
    return bytes(_sodium.crypto_scalarmult_base(sk))


class _Labels:
    """LabeledExtract/LabeledExpand bound to one suite_id."""

    __slots__ = ("_suite_id",)

    def __init__(self, suite_id: bytes) -> None:
        self._suite_id = suite_id

    def extract(self, salt: bytes, label: bytes, ikm: bytes) -> bytes:
        return hkdf_extract(salt, b"HPKE-v1" + self._suite_id + label + ikm)

    def expand(self, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
        return hkdf_expand(prk, length.to_bytes(2, "big") + b"HPKE-v1" + self._suite_id + label + info, length)


_KEM = _Labels(b"KEM" + KEM_X25519_HKDF_SHA256.to_bytes(2, "big"))


def derive_key_pair(ikm: bytes) -> tuple[bytes, bytes]:
    """DeriveKeyPair for DHKEM(X25519): (private, public) raw keys."""
    dkp_prk = _KEM.extract(b"", b"dkp_prk", ikm)
    sk = _KEM.expand(dkp_prk, b"sk", b"", _NSK)
    return sk, x25519_public(sk)


def generate_key_pair() -> tuple[bytes, bytes]:
    return derive_key_pair(os.urandom(_NSK))


def _extract_and_expand(dh: bytes, kem_context: bytes) -> bytes:
    eae_prk = _KEM.extract(b"", b"eae_prk", dh)
    return _KEM.expand(eae_prk, b"shared_secret", kem_context, _NSECRET)


def encap(pk_r: bytes, ikm_e: bytes | None = None) -> tuple[bytes, bytes]:
    """Returns (shared_secret, enc). `ikm_e` fixes the ephemeral key (test vectors only)."""
    sk_e, pk_e = derive_key_pair(ikm_e) if ikm_e is not None else generate_key_pair()
    dh = x25519_dh(sk_e, pk_r)
    return _extract_and_expand(dh, pk_e + pk_r), pk_e


def decap(enc: bytes, sk_r: bytes) -> bytes:
    if len(enc) != 32:
        raise MlsCryptoError(f"KEM output must be 32 bytes, got {len(enc)}")
    dh = x25519_dh(sk_r, enc)
    return _extract_and_expand(dh, enc + x25519_public(sk_r))


@dataclass
class Context:
    """An HPKE encryption context (RFC 9180 section 5.2). Secrets stay out of repr."""

    aead_id: int
    key: bytes = field(repr=False)
    base_nonce: bytes = field(repr=False)
    exporter_secret: bytes = field(repr=False)
    labels: _Labels = field(repr=False)
    seq: int = 0

    def _nonce(self) -> bytes:
        n = len(self.base_nonce)
        if self.seq >= (1 << (8 * n)) - 1:
            raise MlsCryptoError("HPKE sequence number overflow")
        return bytes(a ^ b for a, b in zip(self.base_nonce, self.seq.to_bytes(n, "big"), strict=True))

    def seal(self, aad: bytes, pt: bytes) -> bytes:
        ct = aead_seal(self.aead_id, self.key, self._nonce(), aad, pt)
        self.seq += 1
        return ct

    def open(self, aad: bytes, ct: bytes) -> bytes:
        pt = aead_open(self.aead_id, self.key, self._nonce(), aad, ct)
        self.seq += 1
        return pt

    def export(self, exporter_context: bytes, length: int) -> bytes:
        return self.labels.expand(self.exporter_secret, b"sec", exporter_context, length)


@dataclass(frozen=True)
class Hpke:
    """One HPKE suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and the given AEAD."""

    aead_id: int

    def __post_init__(self) -> None:
        if self.aead_id not in _AEAD_PARAMS:
            raise MlsCryptoError(f"unsupported HPKE AEAD 0x{self.aead_id:04x}")

    @property
    def _labels(self) -> _Labels:
        return _Labels(
            b"HPKE"
            + KEM_X25519_HKDF_SHA256.to_bytes(2, "big")
            + KDF_HKDF_SHA256.to_bytes(2, "big")
            + self.aead_id.to_bytes(2, "big")
        )

    def key_schedule_inputs(self, shared_secret: bytes, info: bytes) -> tuple[bytes, bytes]:
        """(key_schedule_context, secret) for mode_base with an empty PSK."""
        labels = self._labels
        psk_id_hash = labels.extract(b"", b"psk_id_hash", b"")
        info_hash = labels.extract(b"", b"info_hash", info)
        return bytes([MODE_BASE]) + psk_id_hash + info_hash, labels.extract(shared_secret, b"secret", b"")

    def key_schedule(self, shared_secret: bytes, info: bytes) -> Context:
        """KeySchedule for mode_base (RFC 9180 section 5.1)."""
        labels = self._labels
        ctx, secret = self.key_schedule_inputs(shared_secret, info)
        nk, nn = _AEAD_PARAMS[self.aead_id]
        return Context(
            aead_id=self.aead_id,
            key=labels.expand(secret, b"key", ctx, nk) if nk else b"",
            base_nonce=labels.expand(secret, b"base_nonce", ctx, nn) if nn else b"",
            exporter_secret=labels.expand(secret, b"exp", ctx, _NH),
            labels=labels,
        )

    def setup_base_s(self, pk_r: bytes, info: bytes, ikm_e: bytes | None = None) -> tuple[bytes, Context]:
        shared_secret, enc = encap(pk_r, ikm_e)
        return enc, self.key_schedule(shared_secret, info)

    def setup_base_r(self, enc: bytes, sk_r: bytes, info: bytes) -> Context:
        return self.key_schedule(decap(enc, sk_r), info)

    def seal_base(self, pk_r: bytes, info: bytes, aad: bytes, pt: bytes) -> tuple[bytes, bytes]:
        """Single-shot encryption: (enc, ciphertext)."""
        enc, ctx = self.setup_base_s(pk_r, info)
        return enc, ctx.seal(aad, pt)

    def open_base(self, enc: bytes, sk_r: bytes, info: bytes, aad: bytes, ct: bytes) -> bytes:
        return self.setup_base_r(enc, sk_r, info).open(aad, ct)
