"""The direct encoders and cached label heads of the PrivateMessage hot path, checked against the generic
codec (Writer) and an independent HKDF (`cryptography`) over many labels, lengths, contexts and sizes,
including every varint width. The RFC vectors cover one label and one size each; these cover the rest.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from gateway.protocol.mls import crypto, protection
from gateway.protocol.mls.codec import Reader, Writer, decode_all
from gateway.protocol.mls.errors import MlsDecodeError
from gateway.protocol.mls.framing import (
    FramedContent,
    FramedContentAuthData,
    MLSMessage,
    PrivateMessage,
    PrivateMessageContent,
    Sender,
    SenderData,
    private_content_aad,
    sender_data_aad,
)
from gateway.protocol.mls.proposals import Remove, encode_proposal
from gateway.protocol.mls.secret_tree import SecretTree, ratchet_key_nonce, ratchet_next, sender_data_key_nonce
from gateway.protocol.mls.wire import ContentType, SenderType, WireStruct

# Lengths on both sides of each varint boundary (1, 2 and 4 byte headers).
SIZES = (0, 1, 63, 64, 300, 16383, 16384, 70000)
LABELS = (b"", b"key", b"nonce", b"secret", b"tree", b"handshake", b"application", b"joiner", b"x" * 55,
          b"y" * 56, b"z" * 300)


def _reference_expand(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    info = Writer().u16(length).opaque(b"MLS 1.0 " + label).opaque(context).bytes()
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


@pytest.mark.parametrize("suite", [1, 3])
def test_expand_with_label_matches_reference(suite: int) -> None:
    cs = crypto.get_suite(suite)
    secret = os.urandom(32)
    for label in LABELS:
        for length in (1, 12, 16, 32, 33, 64, 100):  # one HKDF block and several
            for context in (b"", b"\x00\x00\x00\x07", b"left", os.urandom(32), os.urandom(64), os.urandom(300)):
                want = _reference_expand(secret, label, context, length)
                assert crypto.expand_with_label(cs, secret, label, context, length) == want, (label, length)
        for generation in (0, 1, 255, 2**32 - 1):
            want = _reference_expand(secret, label, generation.to_bytes(4, "big"), 16)
            assert crypto.derive_tree_secret(cs, secret, label, generation, 16) == want


@pytest.mark.parametrize("suite", [1, 3])
def test_secret_tree_derivations_match_generic(suite: int) -> None:
    cs = crypto.get_suite(suite)
    tree = SecretTree(cs, os.urandom(32), 4)
    for _ in range(3):
        secret = os.urandom(32)
        for generation in (0, 1, 4, 63, 64, 255, 256, 65535, 2**31, 2**32 - 1):
            kn = tree._key_nonce(secret, generation)
            assert kn == ratchet_key_nonce(cs, secret, generation)
            assert kn.key == crypto.derive_tree_secret(cs, secret, b"key", generation, cs.aead_key_len)
            assert kn.nonce == crypto.derive_tree_secret(cs, secret, b"nonce", generation, cs.aead_nonce_len)
            nxt = tree._next_secret(secret, generation)
            assert nxt == ratchet_next(cs, secret, generation)
            assert nxt == crypto.derive_tree_secret(cs, secret, b"secret", generation, cs.hash_len)
        for size in (0, 1, 16, 31, 32, 33, 1040):
            ciphertext = os.urandom(size)
            sample = ciphertext[:cs.hash_len]
            assert sender_data_key_nonce(cs, secret, ciphertext) == (
                crypto.expand_with_label(cs, secret, b"key", sample, cs.aead_key_len),
                crypto.expand_with_label(cs, secret, b"nonce", sample, cs.aead_nonce_len))


def test_sign_and_encrypt_contexts_match_reference() -> None:
    cs = crypto.get_suite(1)
    signer = crypto.Ed25519Signer.generate()
    for label in LABELS:
        for size in SIZES:
            content = os.urandom(size)
            ref = Writer().opaque(b"MLS 1.0 " + label).opaque(content).bytes()
            sig = crypto.sign_with_label(signer, label, content)
            assert cs.verify(signer.public_key, ref, sig)  # signed over exactly the SignContent bytes
            assert crypto.verify_with_label(cs, signer.public_key, label, content, sig)
            assert crypto._sign_content(label, content) == ref
            assert crypto._encrypt_context(label, content) == ref


def _senders() -> list[Sender]:
    return [Sender.member(0), Sender.member(2**32 - 1), Sender(SenderType.EXTERNAL, 3),
            Sender(SenderType.NEW_MEMBER_PROPOSAL), Sender(SenderType.NEW_MEMBER_COMMIT)]


def _generic(item: WireStruct) -> bytes:
    w = Writer()
    item.encode(w)
    return w.bytes()


def test_framed_content_and_private_message_match_generic_encoding() -> None:
    for gid_len in (0, 5, 64):
        for aad_len in (0, 63, 64, 16384):
            for size in SIZES:
                gid, aad, data = os.urandom(gid_len), os.urandom(aad_len), os.urandom(size)
                for sender in _senders():
                    fc = FramedContent(gid, 2**64 - 1, sender, aad, data)
                    assert fc.to_bytes() == _generic(fc)
                    assert FramedContent.from_bytes(fc.to_bytes()) == fc
                for ct in ContentType:
                    pm = PrivateMessage(gid, 7, ct, aad, os.urandom(size % 100), data)
                    assert pm.to_bytes() == _generic(pm)
                    msg = MLSMessage(pm)
                    assert msg.to_bytes() == _generic(msg)
                    assert MLSMessage.from_bytes(msg.to_bytes()) == msg
                    assert private_content_aad(gid, 7, ct, aad) == (
                        Writer().opaque(gid).u64(7).u8(ct).opaque(aad).bytes())
                    assert sender_data_aad(gid, 2**64 - 1, ct) == Writer().opaque(gid).u64(2**64 - 1).u8(ct).bytes()
    proposal = FramedContent(b"g", 1, Sender.member(1), b"", Remove(3))  # non-application: the generic path
    assert proposal.to_bytes() == _generic(proposal)


def _reference_private_content(content: PrivateMessageContent) -> bytes:
    w = Writer()
    body = content.content
    if isinstance(body, bytes):
        w.opaque(body)
    else:
        assert isinstance(body, Remove)
        encode_proposal(w, body)
    w.opaque(content.auth.signature)
    if content.auth.confirmation_tag is not None:
        w.opaque(content.auth.confirmation_tag)
    return w.raw(bytes(content.padding_len)).bytes()


def test_private_message_content_and_sender_data_match_generic_encoding() -> None:
    for size in SIZES:
        for sig_len in (0, 64, 100):
            for tag in (None, os.urandom(32)):
                for padding in (0, 1, 31, 1000):
                    pmc = PrivateMessageContent(os.urandom(size), FramedContentAuthData(os.urandom(sig_len), tag),
                                                padding)
                    assert pmc.to_bytes() == _reference_private_content(pmc)
    remove = PrivateMessageContent(Remove(5), FramedContentAuthData(os.urandom(64)), 3)  # the generic path
    assert remove.to_bytes() == _reference_private_content(remove)
    for leaf, gen in ((0, 0), (1, 2), (2**32 - 1, 2**32 - 1)):
        sd = SenderData(leaf, gen, os.urandom(4))
        assert sd.to_bytes() == _generic(sd)
        assert SenderData.from_bytes(sd.to_bytes()) == sd


def _old_opaque(data: bytes, pos: int) -> tuple[bytes, int] | str:
    r = Reader(data, pos)
    try:
        return r._take(r.varint()), r.pos
    except MlsDecodeError as e:
        return str(e)


def test_reader_opaque_fast_path_matches_the_generic_one() -> None:
    cases = [b"", b"\x00", b"\x01", b"\x01a", b"\x05abc", b"\x40", b"\x40\x05abcde", b"\x40\x40" + bytes(64),
             b"\x40\x40" + bytes(63), b"\x7f\xff", b"\x80\x00\x40\x00" + bytes(16384), b"\x80\x00\x00\x05abcde",
             b"\xc0\x00", b"\x3f" + bytes(63), b"\x3f" + bytes(62)]
    cases += [os.urandom(n) for n in (1, 2, 3, 10, 100) for _ in range(200)]
    for data in cases:
        for pos in range(min(len(data), 3) + 1):
            want = _old_opaque(data, pos)
            r = Reader(data, pos)
            try:
                got: tuple[bytes, int] | str = (r.opaque(), r.pos)
            except MlsDecodeError as e:
                got = str(e)
            assert got == want, (data[:8].hex(), pos)


def test_mls_message_from_bytes_fast_path_matches_generic_decode() -> None:
    pm = PrivateMessage(b"group", 3, ContentType.APPLICATION, b"ad", os.urandom(28), os.urandom(1100))
    wire = MLSMessage(pm).to_bytes()
    assert MLSMessage.from_bytes(wire) == decode_all(wire, MLSMessage.decode) == MLSMessage(pm)
    for bad in (wire + b"\x00", wire[:-1], wire[:4], wire[:3], b"\x00\x01\x00\x09" + wire[4:],
                b"\x00\x02\x00\x02" + wire[4:], wire[:4] + b"\xc0" + wire[5:]):
        with pytest.raises(MlsDecodeError) as fast:
            MLSMessage.from_bytes(bad)
        with pytest.raises(MlsDecodeError) as generic:
            decode_all(bad, MLSMessage.decode)
        assert str(fast.value) == str(generic.value)
    with pytest.raises(MlsDecodeError, match="unknown ContentType"):
        MLSMessage.from_bytes(wire[:18] + b"\x09" + wire[19:])  # version, wire format, group id, epoch, type


@pytest.mark.parametrize("size", [0, 11, 13, 16])
def test_sender_data_of_the_wrong_size_is_refused(size: int) -> None:
    cs = crypto.get_suite(1)
    secret = os.urandom(32)
    ct = os.urandom(100)
    key, nonce = sender_data_key_nonce(cs, secret, ct)
    esd = cs.aead_seal(key, nonce, sender_data_aad(b"g", 1, ContentType.APPLICATION), os.urandom(size))
    msg = PrivateMessage(b"g", 1, ContentType.APPLICATION, b"", esd, ct)
    with pytest.raises(MlsDecodeError):
        protection.decrypt_sender_data(cs, msg, secret)
    raw = SenderData(7, 9, b"abcd").to_bytes()
    esd = cs.aead_seal(key, nonce, sender_data_aad(b"g", 1, ContentType.APPLICATION), raw)
    sd = protection.decrypt_sender_data(cs, PrivateMessage(b"g", 1, ContentType.APPLICATION, b"", esd, ct), secret)
    assert sd == SenderData(7, 9, b"abcd")
