"""messages.json: byte-exact decode and re-encode of every message structure.

Format: each entry holds hex encodings of mls_welcome, mls_group_info, mls_key_package, ratchet_tree,
group_secrets, the seven proposal bodies, commit, public_message_{application,proposal,commit} and
private_message. Every field of every entry must decode with the matching structure and re-encode to the same
bytes; the MLSMessage fields must also carry the expected wire format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.protocol.mls.commit import Commit
from gateway.protocol.mls.framing import MLSMessage, PrivateMessage, PublicMessage
from gateway.protocol.mls.key_package import KeyPackage
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
from gateway.protocol.mls.welcome_structs import GroupInfo, GroupSecrets, Welcome
from gateway.protocol.mls.wire import ContentType, WireFormat, WireStruct

from .conftest import load_vectors, unhex, vector_params

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
