"""Decoder fuzzing: any byte string given to any MLS decoder either raises an `MlsError` or decodes to an
object that re-encodes to exactly the same bytes.

Inputs are random bytes and mutations (byte flips, truncations, insertions) of the real messages.json
encodings, which reach much deeper into the decoders. The default run is short; set MLS_FUZZ_EXAMPLES (e.g.
20000) for a long run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocol.mls.commit import Commit, UpdatePath, UpdatePathNode
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.extensions import ApplicationId, Extension, ExternalPub, ExternalSenders, RequiredCapabilities
from gateway.protocol.mls.framing import (
    AuthenticatedContent,
    FramedContent,
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
from gateway.protocol.mls.wire import ContentType, HPKECiphertext, WireStruct

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
