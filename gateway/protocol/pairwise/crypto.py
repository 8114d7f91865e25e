"""The primitives of the pairwise channel, and nothing else: X25519, HKDF/HMAC-SHA256 chains,
XChaCha20-Poly1305 (IETF) and Ed25519 through a small signer protocol.

Each function maps library failures to our errors, so the session code above never sees a PyNaCl exception.
Signing goes through `MessageSigner` so the private key can live wherever the caller keeps it; this module
never stores one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import nacl.bindings
import nacl.exceptions
import nacl.signing
from nacl import _sodium

from gateway.protocol.pairwise.errors import CredentialError, PairwiseUsageError, PairwiseVerificationError

KEY_LEN = 32
NONCE_LEN = 24
TAG_LEN = 16
SIGNATURE_LEN = 64

RandomSource = Callable[[int], bytes]
"""Returns n random bytes; `os.urandom` in production, a seeded generator in tests."""

VerifyCredential = Callable[[str, bytes], bytes]
"""`verify_credential(device_id, credential) -> 32-byte Ed25519 verify key`, raising if the credential is bad.

Supplied by the identity layer: it checks the X.509 chain from the device's hardware key to the delegated
signing key. Any exception it raises is reported as `CredentialError`.
"""

_ZERO_SALT = bytes(32)


@runtime_checkable
class MessageSigner(Protocol):
    """Signs with the device's delegated Ed25519 key. The key itself stays with the implementation."""

    @property
    def verify_key(self) -> bytes:
        """The 32-byte Ed25519 public key matching `sign`."""
        ...

    def sign(self, data: bytes) -> bytes:
        """Returns the 64-byte Ed25519 signature of `data`."""
        ...


class Ed25519Signer:
    """A `MessageSigner` over a software PyNaCl key: the delegated key, once unwrapped from the store."""

    __slots__ = ("_secret", "_verify_key")

    def __init__(self, key: nacl.signing.SigningKey) -> None:
        # libsodium's 64-byte secret key (seed || public key), so signing skips PyNaCl's wrapper objects.
        self._verify_key, self._secret = nacl.bindings.crypto_sign_seed_keypair(bytes(key))

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Ed25519Signer:
        """From the 32-byte Ed25519 seed (e.g. `identity.delegation.DelegatedKey.raw_private_key()`)."""
        if len(seed) != KEY_LEN:
            raise ValueError(f"an Ed25519 seed is {KEY_LEN} bytes, got {len(seed)}")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    @property
    def verify_key(self) -> bytes:
        return self._verify_key

    def sign(self, data: bytes) -> bytes:
        return nacl.bindings.crypto_sign(data, self._secret)[:SIGNATURE_LEN]

    def __repr__(self) -> str:
        return f"Ed25519Signer(verify_key={self._verify_key.hex()})"


class Verifier:
    """An Ed25519 public key. libsodium rejects non-canonical signatures and small-order keys when verifying."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise PairwiseVerificationError(f"Ed25519 verify key must be {KEY_LEN} bytes, got {len(raw)}")
        self.raw = bytes(raw)

    def verify(self, data: bytes, signature: bytes, what: str) -> None:
        if len(signature) != SIGNATURE_LEN:
            raise PairwiseVerificationError(f"{what}: Ed25519 signature must be {SIGNATURE_LEN} bytes")
        try:
            nacl.bindings.crypto_sign_open(signature + data, self.raw)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise PairwiseVerificationError(f"{what}: Ed25519 signature does not verify") from None


def check_sizes(what: str, **fields: tuple[bytes, int]) -> None:
    """Raises ValueError if a locally built structure has a field of the wrong size (a bug, not peer input)."""
    for name, (value, size) in fields.items():
        if not isinstance(value, bytes) or len(value) != size:
            raise ValueError(f"{what}: {name} must be {size} bytes")


def check_u32(what: str, **fields: int) -> None:
    for name, value in fields.items():
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{what}: {name} must fit in 32 bits, got {value}")


def check_credential(verify_credential: VerifyCredential, device_id: str, credential: bytes) -> Verifier:
    """Runs the caller's credential check and turns any failure into `CredentialError`."""
    try:
        raw = verify_credential(device_id, credential)
    except Exception as exc:
        raise CredentialError(f"credential of device {device_id!r} rejected: {type(exc).__name__}: {exc}") from exc
    if not isinstance(raw, bytes) or len(raw) != KEY_LEN:
        raise CredentialError(f"credential check for device {device_id!r} did not return a 32-byte key")
    return Verifier(raw)


def x25519_keypair(random: RandomSource = os.urandom) -> tuple[bytes, bytes]:
    """(private, public). The private key is 32 random bytes; X25519 clamps it when used."""
    private = random(KEY_LEN)
    if len(private) != KEY_LEN:
        raise ValueError("random source returned the wrong number of bytes")
    return private, nacl.bindings.crypto_scalarmult_base(private)


def x25519_public(private: bytes) -> bytes:
    return nacl.bindings.crypto_scalarmult_base(private)


def dh(private: bytes, public: bytes) -> bytes:
    """X25519; rejects peer keys that give the all-zero shared secret (small-order points)."""
    try:
        out = nacl.bindings.crypto_scalarmult(private, public)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise PairwiseVerificationError("X25519: peer public key is a small-order point") from None
    if hmac.compare_digest(out, bytes(KEY_LEN)):
        raise PairwiseVerificationError("X25519: peer public key is a small-order point")
    return out


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    prk = hmac.digest(salt or _ZERO_SALT, ikm, "sha256")
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


_RK_INFO = b"agw pairwise v1 root"


def kdf_rk(root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """Double Ratchet KDF_RK: HKDF(salt=root key, ikm=DH output) -> (new root key, new chain key)."""
    out = hkdf(dh_out, root_key, _RK_INFO, 2 * KEY_LEN)
    return out[:KEY_LEN], out[KEY_LEN:]


try:  # OpenSSL's HMAC object directly (CPython built with OpenSSL, as every distribution's is)
    from _hashlib import hmac_new as _hmac_new
except ImportError:  # pragma: no cover - the standard library's HMAC, same results
    def _hmac_new(key: bytes, digestmod: str) -> hmac.HMAC:  # type: ignore[misc]
        return hmac.new(key, digestmod=digestmod)


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """Double Ratchet KDF_CK: HMAC-SHA256(ck, 0x02) -> next chain key, HMAC-SHA256(ck, 0x01) -> message key.

    One HMAC key set-up, copied for the second input (the same two MACs as two `hmac.digest` calls, ~40% less
    CPU: this runs once per message sent and received)."""
    mac = _hmac_new(chain_key, digestmod="sha256")
    mk = mac.copy()
    mac.update(b"\x02")
    mk.update(b"\x01")
    return mac.digest(), mk.digest()


# XChaCha20-Poly1305 straight through libsodium's cffi module, which PyNaCl's `crypto_aead_xchacha20poly1305_ietf_*`
# call after argument checks that cost more than the cipher at our message sizes (~4.1 -> ~1.5 us for 300
# bytes). The same library and construction; the checks that matter for memory safety (types and the key and
# nonce lengths, which libsodium reads without a length) are made here.
_AEAD_ENCRYPT = _sodium.lib.crypto_aead_xchacha20poly1305_ietf_encrypt
_AEAD_DECRYPT = _sodium.lib.crypto_aead_xchacha20poly1305_ietf_decrypt
_FFI_NEW = _sodium.ffi.new
_FFI_BUFFER = _sodium.ffi.buffer
_NULL = _sodium.ffi.NULL


def _aead_args(key: bytes, nonce: bytes, data: bytes, aad: bytes) -> None:
    if not (type(key) is bytes and len(key) == KEY_LEN and type(nonce) is bytes and len(nonce) == NONCE_LEN):
        raise PairwiseUsageError(f"XChaCha20-Poly1305 needs a {KEY_LEN}-byte key and a {NONCE_LEN}-byte nonce")
    if not (isinstance(data, bytes) and isinstance(aad, bytes)):
        raise PairwiseUsageError("XChaCha20-Poly1305 takes bytes")


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    _aead_args(key, nonce, plaintext, aad)
    out = _FFI_NEW("unsigned char[]", len(plaintext) + TAG_LEN)
    if _AEAD_ENCRYPT(out, _NULL, plaintext, len(plaintext), aad, len(aad), _NULL, nonce, key) != 0:
        raise PairwiseUsageError("XChaCha20-Poly1305: encryption failed")
    return bytes(_FFI_BUFFER(out))


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    if len(ciphertext) < TAG_LEN:
        raise PairwiseVerificationError("XChaCha20-Poly1305: ciphertext shorter than its tag")
    try:
        _aead_args(key, nonce, ciphertext, aad)
    except PairwiseUsageError:
        raise PairwiseVerificationError("XChaCha20-Poly1305: authentication tag does not verify") from None
    out = _FFI_NEW("unsigned char[]", max(1, len(ciphertext) - TAG_LEN))
    if _AEAD_DECRYPT(out, _NULL, _NULL, ciphertext, len(ciphertext), aad, len(aad), nonce, key) != 0:
        raise PairwiseVerificationError("XChaCha20-Poly1305: authentication tag does not verify")
    return bytes(_FFI_BUFFER(out, len(ciphertext) - TAG_LEN))


_CAN_WIPE = sys.implementation.name == "cpython"
_MEMZERO = _sodium.lib.sodium_memzero
_FROM_BUFFER = _sodium.ffi.from_buffer


def wipe(secret: bytes) -> None:
    """Best effort: overwrite a used-up secret's bytes in place (CPython does not clear memory it frees, so a
    deleted message key, or a serialised state holding keys, would otherwise stay readable in the process's heap
    until reused).

    Only for an object the caller made and is about to drop, that nothing else references: a `bytes` object is
    immutable to the rest of Python, so wiping one still in use would corrupt it. Objects of 0 or 1 bytes are
    shared by the interpreter and left alone.
    """
    if _CAN_WIPE and type(secret) is bytes and len(secret) > 1:
        # (libsodium's memzero on the buffer cffi exposes in place: half the call cost of ctypes.memset on
        # id() + offset; both write the object's own bytes)
        _MEMZERO(_FROM_BUFFER(secret), len(secret))


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
