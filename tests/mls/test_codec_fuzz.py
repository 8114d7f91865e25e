"""Decoder fuzzing: any byte string given to any MLS decoder either raises an `MlsError` or decodes to an
object that re-encodes to exactly the same bytes.

Inputs are random bytes and mutations (byte flips, truncations, insertions) of the real messages.json
encodings, which reach much deeper into the decoders. From the other side, hypothesis-built structures of every
message type must encode and decode back to an equal object. The default run is short; set MLS_FUZZ_EXAMPLES (e.g.
20000) for a long run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocol.mls.commit import Commit, ProposalRef, UpdatePath, UpdatePathNode
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.extensions import ApplicationId, Extension, ExternalPub, ExternalSenders, RequiredCapabilities
from gateway.protocol.mls.framing import (
    AuthenticatedContent,
    FramedContent,
    FramedContentAuthData,
    MLSMessage,
    PrivateMessage,
    PrivateMessageContent,
    PublicMessage,
    Sender,
    SenderData,
)
from gateway.protocol.mls.key_package import Capabilities, KeyPackage, LeafNode, Lifetime
from gateway.protocol.mls.nodes import ParentNode, decode_ratchet_tree, encode_ratchet_tree
from gateway.protocol.mls.proposals import (
    Add,
    ExternalInit,
    GroupContextExtensions,
    PreSharedKey,
    PreSharedKeyID,
    ReInit,
    Remove,
    Update,
)
from gateway.protocol.mls.ratchet_tree import RatchetTree
from gateway.protocol.mls.welcome_structs import EncryptedGroupSecrets, GroupContext, GroupInfo, GroupSecrets, Welcome
from gateway.protocol.mls.wire import (
    ContentType,
    HPKECiphertext,
    LeafNodeSource,
    ResumptionPskUsage,
    SenderType,
    WireStruct,
)

from .conftest import load_vectors, unhex

EXAMPLES = int(os.environ.get("MLS_FUZZ_EXAMPLES", "150"))

Codec = tuple[Callable[[bytes], Any], Callable[[Any], bytes]]


def _struct(cls: type[WireStruct]) -> Codec:
    return cls.from_bytes, cls.to_bytes


def _private_content(ct: ContentType) -> Codec:
    return (lambda b: PrivateMessageContent.from_bytes(b, ct)), PrivateMessageContent.to_bytes


CODECS: dict[str, Codec] = {
    "MLSMessage": _struct(MLSMessage),
    "PublicMessage": _struct(PublicMessage),
    "PrivateMessage": _struct(PrivateMessage),
    "AuthenticatedContent": _struct(AuthenticatedContent),
    "FramedContent": _struct(FramedContent),
    "SenderData": _struct(SenderData),
    "KeyPackage": _struct(KeyPackage),
    "LeafNode": _struct(LeafNode),
    "Capabilities": _struct(Capabilities),
    "Credential": _struct(Credential),
    "RequiredCapabilities": _struct(RequiredCapabilities),
    "ExternalSenders": _struct(ExternalSenders),
    "Welcome": _struct(Welcome),
    "GroupInfo": _struct(GroupInfo),
    "GroupContext": _struct(GroupContext),
    "GroupSecrets": _struct(GroupSecrets),
    "Commit": _struct(Commit),
    "UpdatePath": _struct(UpdatePath),
    "Add": _struct(Add),
    "Update": _struct(Update),
    "Remove": _struct(Remove),
    "PreSharedKey": _struct(PreSharedKey),
    "ReInit": _struct(ReInit),
    "ExternalInit": _struct(ExternalInit),
    "GroupContextExtensions": _struct(GroupContextExtensions),
    "ratchet_tree": (decode_ratchet_tree, encode_ratchet_tree),
    "RatchetTree": (RatchetTree.from_wire, RatchetTree.to_wire),
    "ApplicationId": _struct(ApplicationId),
    "ExternalPub": _struct(ExternalPub),
    "Extension": _struct(Extension),
    "PreSharedKeyID": _struct(PreSharedKeyID),
    "Lifetime": _struct(Lifetime),
    "HPKECiphertext": _struct(HPKECiphertext),
    "UpdatePathNode": _struct(UpdatePathNode),
    "ParentNode": _struct(ParentNode),
    "Sender": _struct(Sender),
    "EncryptedGroupSecrets": _struct(EncryptedGroupSecrets),
    "PrivateMessageContent/application": _private_content(ContentType.APPLICATION),
    "PrivateMessageContent/proposal": _private_content(ContentType.PROPOSAL),
    "PrivateMessageContent/commit": _private_content(ContentType.COMMIT),
}

# Seeds: every messages.json encoding (the first few entries), fed to every decoder and mutated.
SEEDS = sorted({unhex(h) for e in load_vectors("messages.json")[:4] for h in e.values()}, key=len)


def _check(codec: Codec, data: bytes) -> None:
    decode, encode = codec
    try:
        obj = decode(data)
    except MlsError:
        return
    assert encode(obj) == data


@st.composite
def mutated_seed(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            del data[pos]
    return bytes(data)


FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", sorted(CODECS))
@FUZZ_SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_decode_or_raise_mls_error(name: str, data: bytes) -> None:
    _check(CODECS[name], data)


@pytest.mark.parametrize("name", sorted(CODECS))
@FUZZ_SETTINGS
@given(data=mutated_seed())
def test_mutated_messages_decode_or_raise_mls_error(name: str, data: bytes) -> None:
    _check(CODECS[name], data)


@pytest.mark.parametrize("seed", SEEDS[:40], ids=lambda s: f"{len(s)}B")
def test_every_seed_through_every_decoder(seed: bytes) -> None:
    for codec in CODECS.values():
        _check(codec, seed)


# --- object side: hypothesis-built structures encode, then decode back to an equal object --------------------

_b = st.binary(max_size=40)
_u16s = st.lists(st.integers(0, 0xFFFF), max_size=4).map(tuple)
_ext = st.builds(Extension, st.integers(0, 0xFFFF), _b)
_exts = st.lists(_ext, max_size=3, unique_by=lambda e: e.extension_type).map(tuple)
_cred = st.one_of(
    st.builds(Credential.basic, _b),
    st.builds(Credential.x509, st.lists(_b, max_size=3)),
)
_caps = st.builds(Capabilities, _u16s, _u16s, _u16s, _u16s, _u16s)


@st.composite
def _leaf(draw: st.DrawFn) -> LeafNode:
    source = draw(st.sampled_from(LeafNodeSource))
    lifetime = draw(st.builds(Lifetime, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)))
    return LeafNode(draw(_b), draw(_b), draw(_cred), draw(_caps), source,
                    lifetime if source == LeafNodeSource.KEY_PACKAGE else None,
                    draw(_b) if source == LeafNodeSource.COMMIT else None, draw(_exts), draw(_b))


_kp = st.builds(KeyPackage, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), _b, _leaf(), _exts, _b)
_psk_id = st.one_of(
    st.builds(PreSharedKeyID.external, _b, _b),
    st.builds(PreSharedKeyID.resumption, st.sampled_from(ResumptionPskUsage), _b, st.integers(0, 2**64 - 1), _b),
)
_proposal = st.one_of(
    st.builds(Add, _kp),
    st.builds(Update, _leaf()),
    st.builds(Remove, st.integers(0, 2**32 - 1)),
    st.builds(PreSharedKey, _psk_id),
    st.builds(ReInit, _b, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), _exts),
    st.builds(ExternalInit, _b),
    st.builds(GroupContextExtensions, _exts),
)
_path = st.builds(UpdatePath, _leaf(), st.lists(
    st.builds(UpdatePathNode, _b, st.lists(st.builds(HPKECiphertext, _b, _b), max_size=2).map(tuple)),
    max_size=3).map(tuple))
_commit = st.builds(Commit, st.lists(st.one_of(_proposal, st.builds(ProposalRef, _b)), max_size=3).map(tuple),
                    st.none() | _path)
_gc = st.builds(GroupContext, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), _b, st.integers(0, 2**64 - 1), _b, _b,
                _exts)
_sender = st.one_of(
    st.builds(Sender, st.sampled_from([SenderType.MEMBER, SenderType.EXTERNAL]), st.integers(0, 2**32 - 1)),
    st.builds(Sender, st.sampled_from([SenderType.NEW_MEMBER_PROPOSAL, SenderType.NEW_MEMBER_COMMIT])),
)


@st.composite
def _public_message(draw: st.DrawFn) -> PublicMessage:
    content = FramedContent(draw(_b), draw(st.integers(0, 2**64 - 1)), draw(_sender), draw(_b),
                            draw(st.one_of(_b, _proposal, _commit)))
    tag = draw(_b) if content.content_type == ContentType.COMMIT else None
    membership = draw(_b) if content.sender.sender_type == SenderType.MEMBER else None
    return PublicMessage(content, FramedContentAuthData(draw(_b), tag), membership)


_message_body = st.one_of(
    _public_message(),
    st.builds(PrivateMessage, _b, st.integers(0, 2**64 - 1), st.sampled_from(ContentType), _b, _b, _b),
    st.builds(Welcome, st.integers(0, 0xFFFF),
              st.lists(st.builds(EncryptedGroupSecrets, _b, st.builds(HPKECiphertext, _b, _b)), max_size=2)
              .map(tuple), _b),
    st.builds(GroupInfo, _gc, _exts, _b, st.integers(0, 2**32 - 1), _b),
    _kp,
)


@FUZZ_SETTINGS
@given(msg=st.builds(MLSMessage, _message_body))
def test_built_messages_round_trip(msg: MLSMessage) -> None:
    assert MLSMessage.from_bytes(msg.to_bytes()) == msg


@FUZZ_SETTINGS
@given(secrets=st.builds(GroupSecrets, _b, st.none() | _b, st.lists(_psk_id, max_size=3).map(tuple)))
def test_built_group_secrets_round_trip(secrets: GroupSecrets) -> None:
    assert GroupSecrets.from_bytes(secrets.to_bytes()) == secrets
