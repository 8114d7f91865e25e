"""Joining a group by external commit (RFC 9420 section 12.4.3.2), from a GroupInfo that carries external_pub.

The joiner checks the GroupInfo as a Welcome joiner would (signature by a member, tree hash, tree validity),
derives the epoch's init secret by HPKE export to external_pub, and commits its own leaf with an UpdatePath.
Members process that commit like any other (`Group.process`), taking the init secret from their external key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from gateway.protocol.mls import key_schedule, protection
from gateway.protocol.mls import tree_math as tm
from gateway.protocol.mls.commit import Commit
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.crypto import Signer, get_suite
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.extensions import external_pub
from gateway.protocol.mls.framing import AuthenticatedContent, FramedContent, FramedContentAuthData, MLSMessage, Sender
from gateway.protocol.mls.group import Group, GroupConfig, checked_tree
from gateway.protocol.mls.group_state import EpochState, new_secret_tree
from gateway.protocol.mls.key_package import Capabilities, LeafNode
from gateway.protocol.mls.key_package_bundle import DEFAULT_LIFETIME, default_capabilities
from gateway.protocol.mls.proposal_rules import ListedProposal, apply_proposals
from gateway.protocol.mls.proposals import ExternalInit, PreSharedKey, PreSharedKeyID, Proposal, Remove
from gateway.protocol.mls.psk import PskInput, psk_secret
from gateway.protocol.mls.ratchet_tree import RatchetTree
from gateway.protocol.mls.transcript import confirmation_tag, confirmed_transcript_hash, interim_transcript_hash
from gateway.protocol.mls.treekem import TreeKemPrivate, create_update_path
from gateway.protocol.mls.welcome_structs import GroupContext, GroupInfo
from gateway.protocol.mls.wire import LeafNodeSource, ProtocolVersion, PskType, SenderType, WireFormat


def join_external(
    group_info: GroupInfo,
    signer: Signer,
    credential: Credential,
    *,
    ratchet_tree: RatchetTree | None = None,
    remove_prior: int | None = None,
    psks: Sequence[PreSharedKeyID] = (),
    capabilities: Capabilities | None = None,
    config: GroupConfig | None = None,
    authenticated_data: bytes = b"",
) -> tuple[Group, MLSMessage]:
    """Build an external commit; returns the joined group (already in the new epoch) and the commit to send.

    If the delivery service refuses the commit, discard the returned group: nothing else was changed."""
    cfg = config or GroupConfig()
    gc = group_info.group_context
    if gc.version != ProtocolVersion.MLS10:
        raise MlsError(f"GroupContext version {gc.version} is not mls10")
    cs = get_suite(gc.cipher_suite)
    cfg.identity_validator(credential, signer.public_key)
    tree = checked_tree(get_suite(group_info.group_context.cipher_suite), group_info, ratchet_tree,
                        cfg.identity_validator)
    ext_pub = external_pub(group_info.extensions)
    if ext_pub is None:
        raise MlsError("the GroupInfo has no external_pub extension: the group does not accept external joins")
    kem_output, init_secret = key_schedule.external_init_sender(cs, ext_pub.external_pub)

    committer = Sender(SenderType.NEW_MEMBER_COMMIT)
    proposals: list[Proposal] = [ExternalInit(kem_output)]
    if remove_prior is not None:
        proposals.append(Remove(remove_prior))
    proposals += [PreSharedKey(p) for p in psks]
    fx = apply_proposals(cs, tree, gc.group_id, gc.extensions, committer,
                         [ListedProposal(p, committer, True) for p in proposals], cfg.identity_validator)
    # Our leaf takes the leftmost free slot, as the members will place it; its keys come from the UpdatePath.
    enc_priv, enc_pub = cs.derive_key_pair(os.urandom(cs.hash_len))
    caps = capabilities or default_capabilities(cs, credential)
    template = LeafNode(enc_pub, signer.public_key, credential, caps, LeafNodeSource.KEY_PACKAGE, DEFAULT_LIFETIME)
    own = fx.tree.add_leaf(template)
    private = TreeKemPrivate.for_leaf(own, enc_priv)

    def provisional(tree_hash: bytes) -> GroupContext:
        return GroupContext(gc.version, gc.cipher_suite, gc.group_id, gc.epoch + 1, tree_hash,
                            gc.confirmed_transcript_hash, fx.extensions)

    created = create_update_path(cs, fx.tree, private, gc.group_id, template, signer, provisional)
    content = FramedContent(gc.group_id, gc.epoch, committer, authenticated_data,
                            Commit(tuple(proposals), created.update_path))
    signature = protection.sign_content(signer, WireFormat.PUBLIC_MESSAGE, content, gc)
    interim = interim_transcript_hash(cs, gc.confirmed_transcript_hash, group_info.confirmation_tag)
    unsigned = AuthenticatedContent(WireFormat.PUBLIC_MESSAGE, content,
                                    FramedContentAuthData(signature, bytes(cs.hash_len)))
    cth = confirmed_transcript_hash(cs, interim, unsigned)
    new_ctx = GroupContext(gc.version, gc.cipher_suite, gc.group_id, gc.epoch + 1,
                           created.tree.tree_hash(cs), cth, fx.extensions)
    psk_inputs = []
    for pid in fx.psks:
        value = cfg.external_psks.get(pid.psk_id) if pid.psktype == PskType.EXTERNAL else None
        if value is None:
            raise MlsError("an external joiner can only use external PSKs it holds")
        psk_inputs.append(PskInput(pid.to_bytes(), value))
    secrets = key_schedule.advance(cs, init_secret, created.commit_secret, psk_secret(cs, psk_inputs),
                                   new_ctx.to_bytes())
    tag = confirmation_tag(cs, secrets.confirmation_key, cth)
    ac = AuthenticatedContent(WireFormat.PUBLIC_MESSAGE, content, FramedContentAuthData(signature, tag))
    message = MLSMessage(protection.protect_public(cs, ac, gc, None))
    state = EpochState(new_ctx, created.tree, created.private, secrets, interim_transcript_hash(cs, cth, tag), tag,
                       new_secret_tree(cs, secrets, created.tree, cfg.out_of_order_window, cfg.max_forward))
    if tm.leaf_to_node(own) not in created.private.keys:
        raise MlsError("internal: the UpdatePath did not install our leaf key")
    return Group(cs, state, signer, cfg), message


def external_sender_proposal(
    signer: Signer,
    sender_index: int,
    context: GroupContext,
    proposal: Proposal,
    authenticated_data: bytes = b"",
) -> MLSMessage:
    """A proposal from a non-member listed in the group's external_senders extension (e.g. the delivery
    service removing a device), as a PublicMessage without membership tag (RFC 9420 section 12.1.8.1)."""
    cs = get_suite(context.cipher_suite)
    content = FramedContent(context.group_id, context.epoch, Sender(SenderType.EXTERNAL, sender_index),
                            authenticated_data, proposal)
    ac = protection.sign_authenticated_content(signer, WireFormat.PUBLIC_MESSAGE, content, context)
    return MLSMessage(protection.protect_public(cs, ac, context, None))
