"""Conformance with docs/protocol.md ("Pairwise"): an independent implementation of the documented formats and key
schedule (written from the document, using `cryptography` for X25519, HKDF and Ed25519) talks to the real code.

If the code and the document drift apart, these tests fail."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import NamedTuple

import nacl.bindings
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.protocol.pairwise import Ed25519Signer, PairwiseDecodeError, PairwiseSession, PrekeyStore
from gateway.protocol.pairwise.testing import ToyAuthority


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def x25519(private: X25519PrivateKey, public: bytes) -> bytes:
    return private.exchange(X25519PublicKey.from_public_bytes(public))


def raw(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def text8(s: str) -> bytes:
    return bytes([len(s.encode())]) + s.encode()


class Bundle(NamedTuple):
    device_id: str
    credential: bytes
    spk_id: int
    spk: bytes
    created: int
    spk_sig: bytes
    opks: list[tuple[int, bytes, bytes]]


def parse_bundle(data: bytes) -> Bundle:
    """Section 4.2, read by hand."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        out = data[pos : pos + n]
        pos += n
        return out

    assert take(1) == b"\x01"
    device_id = take(take(1)[0]).decode()
    credential = take(struct.unpack(">H", take(2))[0])
    spk_id, spk, created, spk_sig = struct.unpack(">I", take(4))[0], take(32), struct.unpack(">Q", take(8))[0], take(64)
    (count,) = struct.unpack(">H", take(2))
    opks = [(struct.unpack(">I", take(4))[0], take(32), take(64)) for _ in range(count)]
    assert pos == len(data)
    return Bundle(device_id, credential, spk_id, spk, created, spk_sig, opks)


CONTEXT = b"agw pairwise v1 message\x00"


def test_documented_setup_and_ratchet_interoperate() -> None:
    authority = ToyAuthority()
    bob_signer = Ed25519Signer.generate()
    bob_credential = authority.issue("dev-bob", bob_signer.verify_key)
    bob_prekeys = PrekeyStore.generate(now_ms=42, one_time_count=2)
    bundle = parse_bundle(
        bob_prekeys.bundle(device_id="dev-bob", credential=bob_credential, signer=bob_signer).encode()
    )
    assert bundle.device_id == "dev-bob" and bundle.created == 42
    bob_vk = Ed25519PublicKey.from_public_bytes(authority.verify_credential("dev-bob", bundle.credential))
    spk = bundle.spk
    bob_vk.verify(bundle.spk_sig, b"agw pairwise v1 signed prekey\x00" + text8("dev-bob")
                  + struct.pack(">I", bundle.spk_id) + spk + struct.pack(">Q", bundle.created))
    opk_id, opk, opk_sig = bundle.opks[0]
    bob_vk.verify(opk_sig, b"agw pairwise v1 one-time prekey\x00" + text8("dev-bob") + struct.pack(">I", opk_id) + opk)

    # Alice, from the document alone (section 5).
    alice_key = Ed25519PrivateKey.generate()
    alice_vk = alice_key.public_key().public_bytes_raw()
    alice_credential = authority.issue("dev-alice", alice_vk)
    ek = X25519PrivateKey.generate()
    transcript = (b"agw pairwise v1 x3dh\x00" + text8("dev-alice") + text8("dev-bob") + alice_vk
                  + bob_vk.public_bytes_raw() + raw(ek) + spk + b"\x01" + opk)
    sk = hkdf(b"\xff" * 32 + x25519(ek, spk) + x25519(ek, opk), bytes(32), transcript, 32)
    session_id = hashlib.sha256(b"agw pairwise v1 session id\x00" + transcript).digest()[:16]

    # Section 6: first sending chain against Bob's signed prekey.
    dhs = X25519PrivateKey.generate()
    out = hkdf(x25519(dhs, spk), sk, b"agw pairwise v1 root", 64)
    rk, cks = out[:32], out[32:]
    mk = hmac.digest(cks, b"\x01", "sha256")

    # Section 7: a PREKEY message, byte by byte.
    nonce = os.urandom(24)
    prefix = (b"\x01\x01" + session_id + text8("dev-alice") + text8("dev-bob")
              + struct.pack(">H", len(alice_credential)) + alice_credential + bob_vk.public_bytes_raw()
              + struct.pack(">I", bundle.spk_id) + b"\x01" + struct.pack(">I", opk_id) + raw(ek)
              + raw(dhs) + struct.pack(">II", 0, 0) + nonce)
    body = prefix + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(b"hello from the spec", prefix, nonce, mk)
    wire = body + alice_key.sign(CONTEXT + body)

    bob, plaintext = PairwiseSession.accept(wire, local_device_id="dev-bob", signer=bob_signer, prekeys=bob_prekeys,
                                            verify_credential=authority.verify_credential)
    assert plaintext == b"hello from the spec"
    assert bob.session_id == session_id
    assert bob_prekeys.one_time_count == 1

    # Bob answers with a RATCHET message; Alice reads it by the document.
    reply = bob.encrypt(b"hello from the code")
    bob_vk.verify(reply[-64:], CONTEXT + reply[:-64])
    assert reply[:2] == b"\x01\x02" and reply[2:18] == session_id
    bob_dh, (pn, n), reply_nonce = reply[18:50], struct.unpack(">II", reply[50:58]), reply[58:82]
    assert (pn, n) == (0, 0)
    out = hkdf(x25519(dhs, bob_dh), rk, b"agw pairwise v1 root", 64)
    rk, ckr = out[:32], out[32:]
    mk = hmac.digest(ckr, b"\x01", "sha256")
    ckr = hmac.digest(ckr, b"\x02", "sha256")
    got = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(reply[82:-64], reply[:82], reply_nonce, mk)
    assert got == b"hello from the code"

    # Alice's next chain (a DH ratchet step on her side), message number 0, previous chain length 1.
    dhs2 = X25519PrivateKey.generate()
    out = hkdf(x25519(dhs2, bob_dh), rk, b"agw pairwise v1 root", 64)
    cks2 = out[32:]
    mk = hmac.digest(cks2, b"\x01", "sha256")
    nonce = os.urandom(24)
    prefix = b"\x01\x02" + session_id + raw(dhs2) + struct.pack(">II", 1, 0) + nonce
    body = prefix + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(b"second chain", prefix, nonce, mk)
    assert bob.decrypt(body + alice_key.sign(CONTEXT + body)) == b"second chain"


def test_documented_state_layout_starts_as_described() -> None:
    """Section 7.1: the fixed-position fields at the front of a session state."""
    authority = ToyAuthority()
    signer = Ed25519Signer.generate()
    prekeys = PrekeyStore.generate(now_ms=0, one_time_count=0)
    bob_signer = Ed25519Signer.generate()
    bundle = prekeys.bundle(device_id="b", credential=authority.issue("b", bob_signer.verify_key), signer=bob_signer)
    s = PairwiseSession.initiate(local_device_id="a", credential=authority.issue("a", signer.verify_key),
                                 signer=signer, bundle=bundle, verify_credential=authority.verify_credential,
                                 now_ms=77)
    state = s.encode()
    assert state[0] == 1 and state[1:17] == s.session_id and state[17] == 1  # version, id, initiator
    assert state[18:20] == b"\x01a" and state[20:22] == b"\x01b"
    (cred_len,) = struct.unpack(">H", state[22:24])
    pos = 24 + cred_len
    assert state[pos : pos + 32] == bob_signer.verify_key and state[pos + 32 : pos + 64] == signer.verify_key
    assert struct.unpack(">IQ", state[pos + 64 : pos + 76])[1] == 77
    assert state[pos + 76] == 1  # pending setup present
    zeroed = state[: pos + 64] + bytes(4) + state[pos + 68 :]
    with pytest.raises(PairwiseDecodeError, match="max message size"):
        PairwiseSession.decode(zeroed, signer=signer)
