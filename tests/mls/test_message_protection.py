"""message-protection.json: PublicMessage and PrivateMessage protect/unprotect, suites 1 and 3.

Format per entry: cipher_suite, group_id, epoch, tree_hash, confirmed_transcript_hash, signature_priv,
signature_pub, encryption_secret, sender_data_secret, membership_key; then a raw Proposal (`proposal`) with
`proposal_pub` / `proposal_priv` (MLSMessages), likewise `commit` / `commit_pub` / `commit_priv`, and
`application` / `application_priv`. The sender is leaf 1 of a two-leaf secret tree; GroupContext extensions
are empty. Checks, for each content: the vector's messages unprotect to the raw content; our own protection
of the raw content unprotects again (both wire formats); application data is refused as a PublicMessage; and
tampering with a tag, signature or ciphertext is refused.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocol.mls import crypto, protection
from gateway.protocol.mls.codec import decode_all
from gateway.protocol.mls.commit import Commit
from gateway.protocol.mls.errors import MlsError, MlsReplayError, MlsVerificationError
from gateway.protocol.mls.framing import FramedContent, MLSMessage, PrivateMessage, PublicMessage, Sender
from gateway.protocol.mls.proposals import decode_proposal
from gateway.protocol.mls.secret_tree import SecretTree
from gateway.protocol.mls.welcome_structs import GroupContext
from gateway.protocol.mls.wire import WireFormat

from .conftest import unhex, vector_params

SENDER = Sender.member(1)


class _Env:
    def __init__(self, v: dict[str, Any]) -> None:
        self.cs = crypto.get_suite(v["cipher_suite"])
        self.v = v
        self.context = GroupContext(1, v["cipher_suite"], unhex(v["group_id"]), v["epoch"], unhex(v["tree_hash"]),
                                    unhex(v["confirmed_transcript_hash"]))
        self.signer = crypto.Ed25519Signer.from_seed(unhex(v["signature_priv"]))
        assert self.signer.public_key == unhex(v["signature_pub"])
        self.membership_key = unhex(v["membership_key"])
        self.sender_data_secret = unhex(v["sender_data_secret"])

    def tree(self) -> SecretTree:
        return SecretTree(self.cs, unhex(self.v["encryption_secret"]), 2)

    def key_for(self, sender: Sender) -> bytes:
        if sender != SENDER:
            raise MlsError(f"unknown sender {sender}")
        return unhex(self.v["signature_pub"])

    def content(self, body: Any) -> FramedContent:
        return FramedContent(self.context.group_id, self.context.epoch, SENDER, b"", body)

    def unprotect_public(self, raw: bytes) -> FramedContent:
        msg = MLSMessage.from_bytes(raw)
        assert msg.to_bytes() == raw
        assert isinstance(msg.body, PublicMessage)
        ac = protection.unprotect_public(self.cs, msg.body, self.context, self.membership_key, self.key_for)
        return ac.content

    def unprotect_private(self, raw: bytes, tree: SecretTree) -> FramedContent:
        msg = MLSMessage.from_bytes(raw)
        assert msg.to_bytes() == raw
        assert isinstance(msg.body, PrivateMessage)
        opened = protection.unprotect_private(self.cs, msg.body, self.context, tree, self.sender_data_secret,
                                              self.key_for)
        return opened.content.content


def _bodies(v: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("proposal", decode_all(unhex(v["proposal"]), decode_proposal)),
        ("commit", Commit.from_bytes(unhex(v["commit"]))),
        ("application", unhex(v["application"])),
    ]


@pytest.mark.parametrize("v", vector_params("message-protection.json"))
def test_message_protection_vector(v: dict[str, Any]) -> None:
    env = _Env(v)
    for name, body in _bodies(v):
        want = env.content(body)
        tag = b"\x5a" * env.cs.hash_len if name == "commit" else None

        if name != "application":
            assert env.unprotect_public(unhex(v[f"{name}_pub"])) == want
            ac = protection.sign_authenticated_content(env.signer, WireFormat.PUBLIC_MESSAGE, want, env.context, tag)
            ours = protection.protect_public(env.cs, ac, env.context, env.membership_key)
            assert env.unprotect_public(MLSMessage(ours).to_bytes()) == want
        else:
            ac = protection.sign_authenticated_content(env.signer, WireFormat.PUBLIC_MESSAGE, want, env.context, tag)
            with pytest.raises(MlsError):
                protection.protect_public(env.cs, ac, env.context, env.membership_key)

        receiver = env.tree()
        if name == "application":  # the fast path every group application message takes
            priv = MLSMessage.from_bytes(unhex(v[f"{name}_priv"])).body
            assert isinstance(priv, PrivateMessage)
            opened = protection.open_application(env.cs, priv, env.context, receiver, env.sender_data_secret,
                                                 lambda leaf: env.key_for(Sender.member(leaf)))
            assert opened == (SENDER.index, 0, want.content) and priv.authenticated_data == want.authenticated_data
        assert env.unprotect_private(unhex(v[f"{name}_priv"]), receiver) == want
        with pytest.raises(MlsReplayError):
            env.unprotect_private(unhex(v[f"{name}_priv"]), receiver)

        ac = protection.sign_authenticated_content(env.signer, WireFormat.PRIVATE_MESSAGE, want, env.context, tag)
        ours_priv = protection.protect_private(env.cs, ac, env.tree(), env.sender_data_secret, padding_block=32)
        assert len(ours_priv.ciphertext) % 32 == 16  # plaintext padded to 32-byte blocks, plus the 16-byte tag
        assert env.unprotect_private(MLSMessage(ours_priv).to_bytes(), env.tree()) == want


@pytest.mark.parametrize("v", vector_params("message-protection.json"))
def test_message_protection_rejects_tampering(v: dict[str, Any]) -> None:
    env = _Env(v)
    pub = MLSMessage.from_bytes(unhex(v["proposal_pub"])).body
    assert isinstance(pub, PublicMessage) and pub.membership_tag is not None
    bad_tag = PublicMessage(pub.content, pub.auth, bytes(len(pub.membership_tag)))
    with pytest.raises(MlsVerificationError):
        protection.unprotect_public(env.cs, bad_tag, env.context, env.membership_key, env.key_for)
    other = crypto.Ed25519Signer.generate()
    with pytest.raises(MlsVerificationError):
        protection.unprotect_public(env.cs, pub, env.context, env.membership_key, lambda s: other.public_key)

    priv = MLSMessage.from_bytes(unhex(v["application_priv"])).body
    assert isinstance(priv, PrivateMessage)
    flipped = PrivateMessage(priv.group_id, priv.epoch, priv.content_type, priv.authenticated_data,
                             priv.encrypted_sender_data, priv.ciphertext[:-1] + bytes([priv.ciphertext[-1] ^ 1]))
    tree = env.tree()
    with pytest.raises(MlsVerificationError):
        protection.unprotect_private(env.cs, flipped, env.context, tree, env.sender_data_secret, env.key_for)
    with pytest.raises(MlsVerificationError):  # right key material, wrong signer: refused, and the key survives
        protection.unprotect_private(env.cs, priv, env.context, tree, env.sender_data_secret,
                                     lambda s: other.public_key)
    assert env.unprotect_private(unhex(v["application_priv"]), tree) == env.content(unhex(v["application"]))
