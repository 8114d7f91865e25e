"""The direct encoders and cached label heads of the PrivateMessage hot path, checked against the generic
codec (Writer) and an independent HKDF (`cryptography`) over many labels, lengths, contexts and sizes,
including every varint width. The RFC vectors cover one label and one size each; these cover the rest.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from gateway.protocol.mls import crypto
from gateway.protocol.mls.codec import Writer
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
from gateway.protocol.mls.secret_tree import ratchet_key_nonce
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


def test_ratchet_key_nonce_matches_derive_tree_secret() -> None:
    cs = crypto.get_suite(1)
    secret = os.urandom(32)
    for generation in (0, 1, 65535, 2**32 - 1):
        kn = ratchet_key_nonce(cs, secret, generation)
        assert kn.generation == generation
        assert kn.key == crypto.derive_tree_secret(cs, secret, b"key", generation, cs.aead_key_len)
        assert kn.nonce == crypto.derive_tree_secret(cs, secret, b"nonce", generation, cs.aead_nonce_len)


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
