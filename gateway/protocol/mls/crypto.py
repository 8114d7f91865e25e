"""MLS cipher suites and the labelled crypto helpers of RFC 9420 section 5.

`CipherSuite` is the provider interface: a new suite (say a post-quantum hybrid KEM) is one more
implementation registered in `SUITES`. Everything above this module speaks only to the interface.
Signing goes through `Signer` so that a leaf key can live in a token, a TPM or a delegated-key store.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol, runtime_checkable

import nacl.bindings as _sodium
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from gateway.protocol.mls import hpke
from gateway.protocol.mls.codec import Writer, encode_varint
from gateway.protocol.mls.errors import MlsCryptoError, MlsVerificationError

MLS_LABEL_PREFIX = b"MLS 1.0 "


@runtime_checkable
class Signer(Protocol):
    """Holds a signature private key somewhere; MLS only asks it to sign."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


class CipherSuite(Protocol):
    """The crypto provider for one MLS cipher suite (RFC 9420 section 5.1)."""

    @property
    def suite_id(self) -> int: ...

    @property
    def hash_len(self) -> int:
        """Nh: output length of the hash and the KDF."""

    @property
    def aead_key_len(self) -> int: ...

    @property
    def aead_nonce_len(self) -> int: ...

    def hash(self, data: bytes) -> bytes: ...

    def mac(self, key: bytes, data: bytes) -> bytes: ...

    def kdf_extract(self, salt: bytes, ikm: bytes) -> bytes: ...

    def kdf_expand(self, prk: bytes, info: bytes, length: int) -> bytes: ...

    def aead_seal(self, key: bytes, nonce: bytes, aad: bytes, pt: bytes) -> bytes: ...

    def aead_open(self, key: bytes, nonce: bytes, aad: bytes, ct: bytes) -> bytes:
        """Raises MlsVerificationError when the tag does not verify."""

    def hpke_seal(self, pk: bytes, info: bytes, aad: bytes, pt: bytes) -> tuple[bytes, bytes]:
        """Returns (kem_output, ciphertext)."""

    def hpke_open(self, sk: bytes, kem_output: bytes, info: bytes, aad: bytes, ct: bytes) -> bytes: ...

    def hpke_export_sender(self, pk: bytes, info: bytes, context: bytes, length: int) -> tuple[bytes, bytes]:
        """SetupBaseS then Export: (kem_output, exported secret)."""

    def hpke_export_receiver(self, sk: bytes, kem_output: bytes, info: bytes, context: bytes, length: int) -> bytes: ...

    def derive_key_pair(self, ikm: bytes) -> tuple[bytes, bytes]:
        """HPKE DeriveKeyPair: (private, public)."""

    def hpke_public_key(self, sk: bytes) -> bytes: ...

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool: ...

    def generate_signer(self) -> Signer: ...


class Ed25519Signer:
    """A software Ed25519 key (libsodium); the private key is never shown in repr."""

    __slots__ = ("_public", "_sk")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise MlsCryptoError("Ed25519 private key must be 32 bytes")
        pk, sk = _sodium.crypto_sign_seed_keypair(seed)
        self._public = bytes(pk)
        self._sk = sk

    @classmethod
    def from_seed(cls, seed: bytes) -> Ed25519Signer:
        return cls(seed)

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(os.urandom(32))

    @property
    def public_key(self) -> bytes:
        return self._public

    def sign(self, data: bytes) -> bytes:
        return bytes(_sodium.crypto_sign(data, self._sk)[:64])

    def __repr__(self) -> str:
        return f"Ed25519Signer(public_key={self._public.hex()})"


@dataclass(frozen=True)
class X25519Sha256Ed25519Suite:
    """Suites 0x0001 and 0x0003: X25519 HPKE, SHA-256, Ed25519, with AES-128-GCM or ChaCha20-Poly1305."""

    suite_id: int
    aead_id: int
    _hpke: hpke.Hpke = field(init=False, repr=False, compare=False)
    _aead: type[AESGCM] | type[ChaCha20Poly1305] | None = field(init=False, repr=False, compare=False, default=None)
    # Plain attributes rather than properties: they are read several times per protected message.
    hash_len: int = field(init=False, repr=False, compare=False, default=32)
    aead_key_len: int = field(init=False, repr=False, compare=False, default=16)
    aead_nonce_len: int = field(init=False, repr=False, compare=False, default=12)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hpke", hpke.Hpke(self.aead_id))
        aead = {hpke.AEAD_AES_128_GCM: AESGCM, hpke.AEAD_CHACHA20_POLY1305: ChaCha20Poly1305}.get(self.aead_id)
        object.__setattr__(self, "_aead", aead)
        object.__setattr__(self, "aead_key_len", 16 if self.aead_id == hpke.AEAD_AES_128_GCM else 32)

    def hash(self, data: bytes) -> bytes:
        return hashlib.sha256(data).digest()

    def mac(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, hashlib.sha256)

    def kdf_extract(self, salt: bytes, ikm: bytes) -> bytes:
        return hpke.hkdf_extract(salt, ikm)

    def kdf_expand(self, prk: bytes, info: bytes, length: int) -> bytes:
        if length <= 32:  # one HKDF block, as in hpke.hkdf_expand: every key, nonce and secret of MLS
            return hmac.digest(prk, info + b"\x01", "sha256")[:length]
        return hpke.hkdf_expand(prk, info, length)

    # The AEAD directly (four calls per protect + unprotect), as hpke.aead_seal/aead_open do it.
    def aead_seal(self, key: bytes, nonce: bytes, aad: bytes, pt: bytes) -> bytes:
        if self._aead is None:
            return hpke.aead_seal(self.aead_id, key, nonce, aad, pt)
        return self._aead(key).encrypt(nonce, pt, aad)

    def aead_open(self, key: bytes, nonce: bytes, aad: bytes, ct: bytes) -> bytes:
        if self._aead is None:
            return hpke.aead_open(self.aead_id, key, nonce, aad, ct)
        try:
            return self._aead(key).decrypt(nonce, ct, aad)
        except InvalidTag:
            raise MlsVerificationError("AEAD decryption failed: wrong key or tampered ciphertext") from None

    def hpke_seal(self, pk: bytes, info: bytes, aad: bytes, pt: bytes) -> tuple[bytes, bytes]:
        return self._hpke.seal_base(pk, info, aad, pt)

    def hpke_open(self, sk: bytes, kem_output: bytes, info: bytes, aad: bytes, ct: bytes) -> bytes:
        return self._hpke.open_base(kem_output, sk, info, aad, ct)

    def hpke_export_sender(self, pk: bytes, info: bytes, context: bytes, length: int) -> tuple[bytes, bytes]:
        enc, ctx = self._hpke.setup_base_s(pk, info)
        return enc, ctx.export(context, length)

    def hpke_export_receiver(self, sk: bytes, kem_output: bytes, info: bytes, context: bytes, length: int) -> bytes:
        return self._hpke.setup_base_r(kem_output, sk, info).export(context, length)

    def derive_key_pair(self, ikm: bytes) -> tuple[bytes, bytes]:
        return hpke.derive_key_pair(ikm)

    def hpke_public_key(self, sk: bytes) -> bytes:
        return hpke.x25519_public(sk)

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        if len(public_key) != 32 or len(signature) != 64:
            return False
        try:
            _sodium.crypto_sign_open(signature + message, public_key)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return False
        return True

    def generate_signer(self) -> Signer:
        return Ed25519Signer.generate()


SUITES: dict[int, CipherSuite] = {
    0x0001: X25519Sha256Ed25519Suite(0x0001, hpke.AEAD_AES_128_GCM),
    0x0003: X25519Sha256Ed25519Suite(0x0003, hpke.AEAD_CHACHA20_POLY1305),
}


def get_suite(suite_id: int) -> CipherSuite:
    try:
        return SUITES[suite_id]
    except KeyError:
        raise MlsCryptoError(f"unsupported cipher suite 0x{suite_id:04x}; supported: 0x0001, 0x0003") from None


# --- RFC 9420 section 5 labelled operations -------------------------------------------------------------


def ref_hash(cs: CipherSuite, label: bytes, value: bytes) -> bytes:
    """RefHash: the label is used as given (e.g. b"MLS 1.0 KeyPackage Reference")."""
    return cs.hash(Writer().opaque(label).opaque(value).bytes())


@lru_cache(maxsize=64)
def kdf_label_head(label: bytes, length: int) -> bytes:
    """The constant start of a KDFLabel: uint16 length, then opaque label<V> with the "MLS 1.0 " prefix."""
    full = MLS_LABEL_PREFIX + label
    return length.to_bytes(2, "big") + encode_varint(len(full)) + full


@lru_cache(maxsize=64)
def _label_head(label: bytes) -> bytes:
    """opaque label<V> with the "MLS 1.0 " prefix: the constant start of SignContent and EncryptContext."""
    full = MLS_LABEL_PREFIX + label
    return encode_varint(len(full)) + full


def expand_with_label(cs: CipherSuite, secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    # KDFLabel {uint16 length; opaque label<V>; opaque context<V>}, built directly with its constant head
    # cached: this runs ten times per protect + unprotect.
    return cs.kdf_expand(secret, kdf_label_head(label, length) + encode_varint(len(context)) + context, length)


def derive_secret(cs: CipherSuite, secret: bytes, label: bytes) -> bytes:
    return expand_with_label(cs, secret, label, b"", cs.hash_len)


def derive_tree_secret(cs: CipherSuite, secret: bytes, label: bytes, generation: int, length: int) -> bytes:
    return expand_with_label(cs, secret, label, generation.to_bytes(4, "big"), length)


def _sign_content(label: bytes, content: bytes) -> bytes:
    """SignContent {opaque label<V>; opaque content<V>}."""
    return _label_head(label) + encode_varint(len(content)) + content


def sign_with_label(signer: Signer, label: bytes, content: bytes) -> bytes:
    return signer.sign(_sign_content(label, content))


def verify_with_label(cs: CipherSuite, public_key: bytes, label: bytes, content: bytes, signature: bytes) -> bool:
    return cs.verify(public_key, _sign_content(label, content), signature)


def check_signature(cs: CipherSuite, public_key: bytes, label: bytes, content: bytes, signature: bytes) -> None:
    """VerifyWithLabel that raises, naming what was being verified."""
    if not verify_with_label(cs, public_key, label, content, signature):
        raise MlsVerificationError(f"invalid signature over {label.decode(errors='replace')}")


def _encrypt_context(label: bytes, context: bytes) -> bytes:
    """EncryptContext {opaque label<V>; opaque context<V>}."""
    return _label_head(label) + encode_varint(len(context)) + context


def encrypt_with_label(cs: CipherSuite, pk: bytes, label: bytes, context: bytes, pt: bytes) -> tuple[bytes, bytes]:
    """Returns (kem_output, ciphertext)."""
    return cs.hpke_seal(pk, _encrypt_context(label, context), b"", pt)


def decrypt_with_label(
    cs: CipherSuite, sk: bytes, label: bytes, context: bytes, kem_output: bytes, ct: bytes
) -> bytes:
    return cs.hpke_open(sk, kem_output, _encrypt_context(label, context), b"", ct)


def ct_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison for MACs and tags."""
    return hmac.compare_digest(a, b)
