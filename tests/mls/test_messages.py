"""messages.json: byte-exact decode and re-encode of every message structure.

Format: each entry holds hex encodings of mls_welcome, mls_group_info, mls_key_package, ratchet_tree,
group_secrets, the seven proposal bodies, commit, public_message_{application,proposal,commit} and
private_message. Every field of every entry must decode with the matching structure and re-encode to the same
bytes; the MLSMessage fields must also carry the expected wire format. For entries in suites 1 and 3 the
signatures checkable without group state are verified too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.protocol.mls.codec import Writer
from gateway.protocol.mls.commit import Commit
from gateway.protocol.mls.credentials import Credential, MlsCredentialError, x509_key_binding, x509_leaf_public_key
from gateway.protocol.mls.crypto import get_suite, verify_with_label
from gateway.protocol.mls.errors import MlsDecodeError
from gateway.protocol.mls.extensions import (
    ApplicationId,
    Extension,
    ExternalPub,
    ExternalSender,
    ExternalSenders,
    RequiredCapabilities,
    external_pub,
    external_senders,
    parse_payload,
    required_capabilities,
)
from gateway.protocol.mls.framing import (
    FramedContentAuthData,
    MLSMessage,
    PrivateMessage,
    PrivateMessageContent,
    PublicMessage,
    Sender,
    SenderData,
)
from gateway.protocol.mls.key_package import KEY_PACKAGE_SIGN_LABEL, LEAF_NODE_SIGN_LABEL, KeyPackage
from gateway.protocol.mls.nodes import decode_ratchet_tree, encode_ratchet_tree
from gateway.protocol.mls.proposals import (
    Add,
    ExternalInit,
    GroupContextExtensions,
    PreSharedKey,
    ReInit,
    Remove,
    Update,
)
from gateway.protocol.mls.ratchet_tree import RatchetTree, leaf_signature_valid
from gateway.protocol.mls.tree_math import LeafIndex
from gateway.protocol.mls.welcome_structs import GROUP_INFO_SIGN_LABEL, GroupInfo, GroupSecrets, Welcome
from gateway.protocol.mls.wire import ContentType, CredentialType, SenderType, WireFormat, WireStruct

from .conftest import SUPPORTED_SUITES, load_vectors, unhex, vector_params

MESSAGE_FIELDS: dict[str, tuple[WireFormat, type[WireStruct]]] = {
    "mls_welcome": (WireFormat.WELCOME, Welcome),
    "mls_group_info": (WireFormat.GROUP_INFO, GroupInfo),
    "mls_key_package": (WireFormat.KEY_PACKAGE, KeyPackage),
    "public_message_application": (WireFormat.PUBLIC_MESSAGE, PublicMessage),
    "public_message_proposal": (WireFormat.PUBLIC_MESSAGE, PublicMessage),
    "public_message_commit": (WireFormat.PUBLIC_MESSAGE, PublicMessage),
    "private_message": (WireFormat.PRIVATE_MESSAGE, PrivateMessage),
}

STRUCT_FIELDS: dict[str, type[WireStruct]] = {
    "group_secrets": GroupSecrets,
    "add_proposal": Add,
    "update_proposal": Update,
    "remove_proposal": Remove,
    "pre_shared_key_proposal": PreSharedKey,
    "re_init_proposal": ReInit,
    "external_init_proposal": ExternalInit,
    "group_context_extensions_proposal": GroupContextExtensions,
    "commit": Commit,
}

PUBLIC_CONTENT_TYPES = {
    "public_message_application": ContentType.APPLICATION,
    "public_message_proposal": ContentType.PROPOSAL,
    "public_message_commit": ContentType.COMMIT,
}


def test_every_vector_field_is_covered() -> None:
    covered = set(MESSAGE_FIELDS) | set(STRUCT_FIELDS) | {"ratchet_tree"}
    for entry in load_vectors("messages.json"):
        assert set(entry) == covered


def _roundtrip(name: str, data: bytes, decode: Callable[[bytes], Any], encode: Callable[[Any], bytes]) -> Any:
    obj = decode(data)
    assert encode(obj) == data, f"{name} does not re-encode byte-exact"
    return obj


@pytest.mark.parametrize("v", vector_params("messages.json", per_suite=False))
def test_messages_vector(v: dict[str, Any]) -> None:
    for name, (wire_format, body_cls) in MESSAGE_FIELDS.items():
        msg = _roundtrip(name, unhex(v[name]), MLSMessage.from_bytes, MLSMessage.to_bytes)
        assert msg.wire_format == wire_format, name
        assert isinstance(msg.body, body_cls), name
        if name in PUBLIC_CONTENT_TYPES:
            assert msg.body.content.content_type == PUBLIC_CONTENT_TYPES[name], name
    for name, cls in STRUCT_FIELDS.items():
        _roundtrip(name, unhex(v[name]), cls.from_bytes, cls.to_bytes)
    nodes = _roundtrip("ratchet_tree", unhex(v["ratchet_tree"]), decode_ratchet_tree, encode_ratchet_tree)
    assert nodes, "ratchet_tree decoded to an empty node list"


def _signature_entries() -> list[Any]:
    """Entries whose structures use a suite we implement (the file holds suites 1-3, without a suite field)."""
    params = []
    for i, e in enumerate(load_vectors("messages.json")):
        kp = MLSMessage.from_bytes(unhex(e["mls_key_package"])).body
        assert isinstance(kp, KeyPackage)
        if kp.cipher_suite in SUPPORTED_SUITES:
            params.append(pytest.param(e, id=f"s{kp.cipher_suite}-{i}"))
    assert params
    return params


@pytest.mark.parametrize("v", _signature_entries())
def test_messages_signatures(v: dict[str, Any]) -> None:
    """The signatures that can be checked from the entry alone: the KeyPackage and its LeafNode, the GroupInfo
    (signed by its `signer` leaf of the entry's ratchet_tree), and the commit's UpdatePath leaf (the generator
    signs it as leaf 0 of the GroupInfo's group)."""
    kp = MLSMessage.from_bytes(unhex(v["mls_key_package"])).body
    gi = MLSMessage.from_bytes(unhex(v["mls_group_info"])).body
    assert isinstance(kp, KeyPackage) and isinstance(gi, GroupInfo)
    cs = get_suite(kp.cipher_suite)
    assert gi.group_context.cipher_suite == kp.cipher_suite
    assert verify_with_label(cs, kp.leaf_node.signature_key, KEY_PACKAGE_SIGN_LABEL, kp.tbs(), kp.signature)
    assert verify_with_label(cs, kp.leaf_node.signature_key, LEAF_NODE_SIGN_LABEL, kp.leaf_node.tbs(),
                             kp.leaf_node.signature)
    tree = RatchetTree.from_wire(unhex(v["ratchet_tree"]))
    signer = tree.leaf(LeafIndex(gi.signer))
    assert signer is not None
    assert verify_with_label(cs, signer.signature_key, GROUP_INFO_SIGN_LABEL, gi.tbs(), gi.signature)
    commit = Commit.from_bytes(unhex(v["commit"]))
    assert commit.path is not None
    assert leaf_signature_valid(cs, commit.path.leaf_node, gi.group_context.group_id, LeafIndex(0))
    assert not leaf_signature_valid(cs, commit.path.leaf_node, gi.group_context.group_id + b"x", LeafIndex(0))


# --- structures beyond the vectors ------------------------------------------------------------------------


def _self_signed_ed25519_cert() -> tuple[bytes, bytes]:
    import datetime

    from cryptography import x509 as cx509
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from cryptography.x509.oid import NameOID

    key = Ed25519PrivateKey.generate()
    name = cx509.Name([cx509.NameAttribute(NameOID.COMMON_NAME, "agent")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        cx509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=7))
        .sign(key, None)
    )
    return cert.public_bytes(Encoding.DER), key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_x509_credential_round_trip_and_key_binding() -> None:
    der, pub = _self_signed_ed25519_cert()
    cred = Credential.x509([der, b"intermediate"])
    assert Credential.from_bytes(cred.to_bytes()) == cred
    seen: list[tuple[bytes, ...]] = []
    validator = x509_key_binding(seen.append)
    validator(cred, pub)
    assert seen == [(der, b"intermediate")]
    with pytest.raises(MlsCredentialError):
        validator(cred, bytes(32))
    with pytest.raises(MlsCredentialError):
        validator(Credential.basic(b"alice"), pub)
    with pytest.raises(MlsCredentialError):
        x509_leaf_public_key(Credential.x509([b"not a certificate"]))


def test_typed_extensions_round_trip() -> None:
    sender = ExternalSender(b"\x01" * 32, Credential.basic(b"relay"))
    payloads = [
        ApplicationId(b"app"),
        RequiredCapabilities((0xFF00,), (8,), (1, 2)),
        ExternalPub(b"\x02" * 32),
        ExternalSenders((sender,)),
    ]
    exts = tuple(p.to_extension() for p in payloads)
    for p, e in zip(payloads, exts, strict=True):
        assert parse_payload(Extension.from_bytes(e.to_bytes())) == p
    assert required_capabilities(exts) == payloads[1]
    assert external_pub(exts) == payloads[2]
    assert external_senders(exts) == payloads[3]
    gce = GroupContextExtensions(exts)
    assert GroupContextExtensions.from_bytes(gce.to_bytes()) == gce


def test_duplicate_extension_types_are_rejected() -> None:
    e = ApplicationId(b"x").to_extension()
    data = GroupContextExtensions((e, ExternalPub(b"k").to_extension())).to_bytes()
    assert GroupContextExtensions.from_bytes(data).extensions[0] == e
    dup = Writer()
    dup.vector([e, e], lambda w, x: x.encode(w))
    with pytest.raises(MlsDecodeError):
        GroupContextExtensions.from_bytes(dup.bytes())


def test_private_message_content_padding() -> None:
    content = PrivateMessageContent(b"hello", FramedContentAuthData(b"sig"), padding_len=7)
    data = content.to_bytes()
    assert data.endswith(bytes(7))
    assert PrivateMessageContent.from_bytes(data, ContentType.APPLICATION) == content
    with pytest.raises(MlsDecodeError):
        PrivateMessageContent.from_bytes(data[:-1] + b"\x01", ContentType.APPLICATION)


def test_structure_invariants_are_enforced_on_construction() -> None:
    with pytest.raises(ValueError):
        Sender(SenderType.MEMBER)
    with pytest.raises(ValueError):
        Sender(SenderType.NEW_MEMBER_COMMIT, 3)
    with pytest.raises(ValueError):
        SenderData(0, 0, b"abc")
    with pytest.raises(ValueError):
        Credential(CredentialType.BASIC, identity=b"a", certificates=(b"c",))


def test_unknown_version_and_wire_format_are_rejected() -> None:
    msg = MLSMessage(ExternalInit(b"k"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        msg.to_bytes()
    body = PrivateMessage(b"g", 1, ContentType.APPLICATION, b"", b"s", b"c")
    data = MLSMessage(body).to_bytes()
    assert MLSMessage.from_bytes(data).body == body
    with pytest.raises(MlsDecodeError):
        MLSMessage.from_bytes(b"\x00\x02" + data[2:])
    with pytest.raises(MlsDecodeError):
        MLSMessage.from_bytes(data[:2] + b"\x00\x09" + data[4:])


def test_secrets_are_not_in_repr() -> None:
    gs = GroupSecrets(b"\xaa" * 32, b"\xbb" * 32, ())
    assert "aa" not in repr(gs) and "170" not in repr(gs)
    assert "bb" not in repr(gs) and "187" not in repr(gs)
