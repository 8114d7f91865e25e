"""Pairwise primitives against official vectors (RFC 5869 HKDF, draft-irtf-cfrg-xchacha-03 XChaCha20-Poly1305,
RFC 7748 X25519) and their failure mapping to our errors."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.protocol.pairwise import Ed25519Signer, PairwiseVerificationError
from gateway.protocol.pairwise.crypto import (
    Verifier,
    aead_decrypt,
    aead_encrypt,
    dh,
    hkdf,
    kdf_ck,
    kdf_rk,
    x25519_keypair,
)

# RFC 5869 appendix A, test cases 1 and 3 (SHA-256).
HKDF_VECTORS = [
    (
        "0b" * 22, "000102030405060708090a0b0c", "f0f1f2f3f4f5f6f7f8f9", 42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (
        "0b" * 22, "", "", 42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), HKDF_VECTORS)
def test_hkdf_rfc5869(ikm: str, salt: str, info: str, length: int, okm: str) -> None:
    assert hkdf(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), length).hex() == okm


@pytest.mark.parametrize("length", [1, 32, 64, 100])
def test_hkdf_matches_cryptography(length: int) -> None:
    ikm, salt, info = b"k" * 40, b"s" * 32, b"info"
    ref = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)
    assert hkdf(ikm, salt, info, length) == ref


def test_kdf_chains_separate_outputs() -> None:
    ck2, mk = kdf_ck(b"c" * 32)
    assert len(ck2) == len(mk) == 32 and ck2 != mk
    rk, ck = kdf_rk(b"r" * 32, b"d" * 32)
    assert rk != ck and kdf_rk(b"r" * 32, b"e" * 32) != (rk, ck)


XCHACHA_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
    b"sunscreen would be it."
)
XCHACHA_CIPHERTEXT = (
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c"
    "54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff921f9664c97637da9768812"
    "f615c68b13b52e" "c0875924c1c7987947deafd8780acf49"
)


def test_xchacha20poly1305_draft_vector() -> None:
    key, nonce = bytes(range(0x80, 0xA0)), bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    assert aead_encrypt(key, nonce, XCHACHA_PLAINTEXT, aad).hex() == XCHACHA_CIPHERTEXT
    assert aead_decrypt(key, nonce, bytes.fromhex(XCHACHA_CIPHERTEXT), aad) == XCHACHA_PLAINTEXT
    with pytest.raises(PairwiseVerificationError):
        aead_decrypt(key, nonce, bytes.fromhex(XCHACHA_CIPHERTEXT), aad + b"x")
    with pytest.raises(PairwiseVerificationError):
        aead_decrypt(key, nonce, b"short", aad)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 4096])
def test_aead_and_kdf_ck_match_the_library_calls_they_replace(size: int) -> None:
    """aead_encrypt/aead_decrypt call libsodium through its cffi module and kdf_ck copies one HMAC key set-up
    (for speed); they must give exactly what PyNaCl's checked wrappers and two one-shot HMACs give, reject what
    those reject, and wipe must still zero a key in place."""
    import hmac
    import os

    import nacl.bindings

    from gateway.protocol.pairwise import PairwiseUsageError
    from gateway.protocol.pairwise.crypto import wipe

    key, nonce, plaintext = os.urandom(32), os.urandom(24), os.urandom(size)
    for aad in (b"", os.urandom(86)):
        ct = aead_encrypt(key, nonce, plaintext, aad)
        assert ct == nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad or None, nonce, key)
        assert aead_decrypt(key, nonce, ct, aad) == plaintext
        for bad in (ct[:-1] + bytes([ct[-1] ^ 1]), ct[1:], ct + b"\0"):
            with pytest.raises(PairwiseVerificationError):
                aead_decrypt(key, nonce, bad, aad)
    for k, n in ((key[:31], nonce), (key + b"\0", nonce), (key, nonce[:23]), (key, nonce + b"\0")):
        with pytest.raises(PairwiseUsageError):
            aead_encrypt(k, n, plaintext, b"")
        with pytest.raises(PairwiseVerificationError):
            aead_decrypt(k, n, bytes(size + 16), b"")
    assert kdf_ck(key) == (hmac.digest(key, b"\x02", "sha256"), hmac.digest(key, b"\x01", "sha256"))
    secret = bytes(os.urandom(32))
    alias = secret
    wipe(secret)
    assert alias == bytes(32)


def test_x25519_rfc7748_vector() -> None:
    """RFC 7748 section 6.1: Alice's private key with Bob's public key."""
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert dh(alice, bob_public).hex() == shared


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little"), bytes.fromhex(
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")])
def test_small_order_points_are_refused(point: bytes) -> None:
    private, _ = x25519_keypair()
    with pytest.raises(PairwiseVerificationError, match="small-order"):
        dh(private, point)


def test_verifier() -> None:
    signer = Ed25519Signer.generate()
    v = Verifier(signer.verify_key)
    v.verify(b"data", signer.sign(b"data"), "test")
    with pytest.raises(PairwiseVerificationError):
        v.verify(b"datA", signer.sign(b"data"), "test")
    with pytest.raises(PairwiseVerificationError):
        v.verify(b"data", b"short", "test")
    with pytest.raises(PairwiseVerificationError):
        Verifier(b"\x01" * 31)
    assert "verify_key" in repr(signer) and signer.verify_key.hex() in repr(signer)


def test_signer_from_delegated_seed_matches_cryptography() -> None:
    """The identity layer hands over the 32-byte seed; PyNaCl and `cryptography` must agree on the key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = bytes(range(32))
    reference = Ed25519PrivateKey.from_private_bytes(seed)
    signer = Ed25519Signer.from_seed(seed)
    assert signer.verify_key == reference.public_key().public_bytes_raw()
    assert signer.sign(b"m") == reference.sign(b"m")
    with pytest.raises(ValueError):
        Ed25519Signer.from_seed(b"short")
