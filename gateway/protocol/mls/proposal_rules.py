"""Validating and applying the proposal list of a commit (RFC 9420 sections 12.2 and 12.3).

The same code serves the committer (building its commit) and every receiver (checking it), so both sides
derive the same tree. Everything works on a copy of the tree; the caller's state is untouched on failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.protocol.mls import tree_math as tm
from gateway.protocol.mls.credentials import IdentityValidator, SuccessorValidator, accept_any_successor
from gateway.protocol.mls.crypto import CipherSuite, verify_with_label
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.extensions import Extension, required_capabilities
from gateway.protocol.mls.framing import Sender
from gateway.protocol.mls.group_state import CachedProposal
from gateway.protocol.mls.key_package import KEY_PACKAGE_SIGN_LABEL, KeyPackage, LeafNode
from gateway.protocol.mls.proposals import (
    Add,
    ExternalInit,
    GroupContextExtensions,
    PreSharedKey,
    PreSharedKeyID,
    Proposal,
    ReInit,
    Remove,
    Update,
)
from gateway.protocol.mls.ratchet_tree import (
    DEFAULT_EXTENSION_TYPES,
    DEFAULT_PROPOSAL_TYPES,
    RatchetTree,
    validate_leaf_node,
)
from gateway.protocol.mls.tree_math import LeafIndex
from gateway.protocol.mls.wire import LeafNodeSource, ProtocolVersion, PskType, ResumptionPskUsage, SenderType


class MlsProposalError(MlsError):
    """A commit's proposal list breaks the rules of RFC 9420 section 12.2, or a proposal is invalid."""


# Proposal types a commit may carry by value (section 12.2); Update must come by reference.
_BY_VALUE = (Add, Remove, PreSharedKey, ReInit, ExternalInit, GroupContextExtensions)
# Proposal types that do not require an UpdatePath (section 12.4).
_PATH_OPTIONAL = (Add, PreSharedKey, ReInit)


@dataclass(frozen=True)
class ListedProposal:
    """A proposal in a commit, with who proposed it and whether it came by value."""

    proposal: Proposal
    sender: Sender
    by_value: bool


@dataclass
class ProposalEffects:
    """The result of applying a proposal list to a copy of the tree."""

    tree: RatchetTree
    extensions: tuple[Extension, ...]
    added: list[tuple[LeafIndex, KeyPackage]] = field(default_factory=list)
    removed: list[LeafIndex] = field(default_factory=list)
    updated: list[LeafIndex] = field(default_factory=list)
    psks: list[PreSharedKeyID] = field(default_factory=list)
    external_init: ExternalInit | None = None
    reinit: ReInit | None = None
    path_required: bool = True


def validate_key_package(
    cs: CipherSuite, kp: KeyPackage, identity_validator: IdentityValidator
) -> None:
    """KeyPackage checks independent of the group (section 10.1)."""
    if kp.version != ProtocolVersion.MLS10:
        raise MlsProposalError(f"KeyPackage version {kp.version} is not mls10")
    if kp.cipher_suite != cs.suite_id:
        raise MlsProposalError(f"KeyPackage cipher suite {kp.cipher_suite} is not the group's {cs.suite_id}")
    if kp.leaf_node.leaf_node_source != LeafNodeSource.KEY_PACKAGE:
        raise MlsProposalError("KeyPackage leaf node must have source key_package")
    if kp.init_key == kp.leaf_node.encryption_key:
        raise MlsProposalError("KeyPackage init key equals its leaf encryption key")
    if not verify_with_label(cs, kp.leaf_node.signature_key, KEY_PACKAGE_SIGN_LABEL, kp.tbs(), kp.signature):
        raise MlsProposalError("KeyPackage signature is invalid")
    identity_validator(kp.leaf_node.credential, kp.leaf_node.signature_key)


def _check_extensions_supported(tree: RatchetTree, extensions: tuple[Extension, ...]) -> None:
    """Every member must support every group extension and the required capabilities (section 12.1.7)."""
    req = required_capabilities(extensions)
    types = {e.extension_type for e in extensions}
    for index, leaf in tree.leaves():
        caps = leaf.capabilities
        missing = types - set(caps.extensions) - DEFAULT_EXTENSION_TYPES
        if req is not None:
            missing |= set(req.extension_types) - set(caps.extensions) - DEFAULT_EXTENSION_TYPES
            missing |= set(req.proposal_types) - set(caps.proposals) - DEFAULT_PROPOSAL_TYPES
            if not set(req.credential_types) <= set(caps.credentials):
                raise MlsProposalError(f"member {index} lacks a credential type the group requires")
        if missing:
            raise MlsProposalError(f"member {index} does not support extensions/proposals {sorted(missing)}")


def _check_list(items: Sequence[ListedProposal], committer: Sender, cs: CipherSuite) -> None:
    external = committer.sender_type == SenderType.NEW_MEMBER_COMMIT
    touched: set[int] = set()
    psk_ids: set[bytes] = set()
    n_gce = n_ext_init = n_reinit = 0
    for item in items:
        p = item.proposal
        if item.by_value and not isinstance(p, _BY_VALUE):
            raise MlsProposalError(f"{type(p).__name__} proposals may only be committed by reference")
        if external and not item.by_value:
            raise MlsProposalError("an external commit carries proposals by value only")
        if isinstance(p, Update):
            if item.sender == committer:
                raise MlsProposalError("the committer cannot commit its own Update proposal")
            if item.sender.sender_type != SenderType.MEMBER or item.sender.index is None:
                raise MlsProposalError("Update proposals come from members")
            if item.sender.index in touched:
                raise MlsProposalError(f"leaf {item.sender.index} is updated or removed twice")
            touched.add(item.sender.index)
        elif isinstance(p, Remove):
            if committer.sender_type == SenderType.MEMBER and p.removed == committer.index:
                raise MlsProposalError("a commit cannot remove its committer")
            if p.removed in touched:
                raise MlsProposalError(f"leaf {p.removed} is updated or removed twice")
            touched.add(p.removed)
        elif isinstance(p, PreSharedKey):
            key = p.psk.to_bytes()
            if key in psk_ids:
                raise MlsProposalError("the same PSK is proposed twice")
            psk_ids.add(key)
            if len(p.psk.psk_nonce) != cs.hash_len:
                raise MlsProposalError("PSK nonce length must equal the hash length")
            if p.psk.psktype == PskType.RESUMPTION and p.psk.usage != ResumptionPskUsage.APPLICATION:
                raise MlsProposalError("only application resumption PSKs may be proposed")
        elif isinstance(p, GroupContextExtensions):
            n_gce += 1
        elif isinstance(p, ExternalInit):
            n_ext_init += 1
        elif isinstance(p, ReInit):
            n_reinit += 1
    if n_gce > 1:
        raise MlsProposalError("more than one GroupContextExtensions proposal")
    if n_reinit and len(items) != 1:
        raise MlsProposalError("a ReInit proposal must be the only proposal in its commit")
    if external:
        if n_ext_init != 1:
            raise MlsProposalError("an external commit needs exactly one ExternalInit proposal")
        if any(not isinstance(i.proposal, (ExternalInit, Remove, PreSharedKey)) for i in items):
            raise MlsProposalError("an external commit may carry only ExternalInit, Remove and PreSharedKey")
        if sum(isinstance(i.proposal, Remove) for i in items) > 1:
            raise MlsProposalError("an external commit may remove at most one (stale) leaf")
    elif n_ext_init:
        raise MlsProposalError("ExternalInit is only allowed in an external commit")


def check_successor(old: LeafNode, new: LeafNode, successor_validator: SuccessorValidator) -> None:
    """A member's leaf replaced by one with another credential or signature key (Update, or a commit's
    UpdatePath): the application decides whether the new credential is the same client (RFC 9420 5.3.1)."""
    if new.credential != old.credential or new.signature_key != old.signature_key:
        successor_validator(old.credential, new.credential)


def apply_proposals(
    cs: CipherSuite,
    tree: RatchetTree,
    group_id: bytes,
    extensions: tuple[Extension, ...],
    committer: Sender,
    items: Sequence[ListedProposal],
    identity_validator: IdentityValidator,
    now: int | None = None,
    successor_validator: SuccessorValidator = accept_any_successor,
) -> ProposalEffects:
    """Check the list, then apply it in the order of section 12.3 to a copy of `tree`. With `now` (seconds
    since the epoch, from the caller's clock), added KeyPackages must be within their lifetime."""
    _check_list(items, committer, cs)
    new_tree = tree.copy()
    fx = ProposalEffects(new_tree, extensions)
    fx.path_required = not items or any(not isinstance(i.proposal, _PATH_OPTIONAL) for i in items)

    for item in items:
        if isinstance(item.proposal, GroupContextExtensions):
            fx.extensions = item.proposal.extensions
    for item in items:
        p = item.proposal
        if isinstance(p, Update):
            assert item.sender.index is not None
            leaf_index = LeafIndex(item.sender.index)
            old = new_tree.leaf(leaf_index)
            if old is None:
                raise MlsProposalError(f"Update from blank leaf {leaf_index}")
            if p.leaf_node.encryption_key == old.encryption_key:
                raise MlsProposalError(f"Update for leaf {leaf_index} keeps the old encryption key")
            validate_leaf_node(cs, new_tree, p.leaf_node, leaf_index, group_id, fx.extensions, identity_validator,
                               expected_source=LeafNodeSource.UPDATE)
            check_successor(old, p.leaf_node, successor_validator)
            new_tree.update_leaf(leaf_index, p.leaf_node)
            fx.updated.append(leaf_index)
    for item in items:
        p = item.proposal
        if isinstance(p, Remove):
            if new_tree.leaf(LeafIndex(p.removed)) is None:
                raise MlsProposalError(f"Remove of blank or absent leaf {p.removed}")
            # Keep the tree wide enough for the removals still to come; truncate once at the end.
            new_tree.set_node(tm.leaf_to_node(LeafIndex(p.removed)), None)
            new_tree.blank_path(LeafIndex(p.removed))
            fx.removed.append(LeafIndex(p.removed))
    if fx.removed:
        new_tree.truncate()
    adds = [item.proposal for item in items if isinstance(item.proposal, Add)]
    # Validate every new leaf against the tree before any is added (the tree's credential summary stays cached:
    # one pass for the whole batch), then check once that all credential types in use are supported by all.
    placeholder = LeafIndex(new_tree.n_leaves)  # key_package leaves do not sign their index
    for p in adds:
        validate_key_package(cs, p.key_package, identity_validator)
        validate_leaf_node(cs, new_tree, p.key_package.leaf_node, placeholder, group_id, fx.extensions,
                           identity_validator, expected_source=LeafNodeSource.KEY_PACKAGE, now=now)
    for p in adds:
        fx.added.append((new_tree.add_leaf(p.key_package.leaf_node), p.key_package))
    if adds:
        in_use, supported_by_all = new_tree.credential_summary()
        if not in_use <= supported_by_all:
            raise MlsProposalError(f"credential types {sorted(in_use - supported_by_all)} are not supported by all")
    for item in items:
        p = item.proposal
        if isinstance(p, PreSharedKey):
            fx.psks.append(p.psk)
        elif isinstance(p, ExternalInit):
            fx.external_init = p
        elif isinstance(p, ReInit):
            fx.reinit = p
    if any(isinstance(i.proposal, GroupContextExtensions) for i in items):
        _check_extensions_supported(new_tree, fx.extensions)
    new_tree.check_unique_keys()
    return fx


def select_pending(
    tree: RatchetTree, proposals: dict[bytes, CachedProposal], own_leaf: LeafIndex
) -> list[tuple[bytes, CachedProposal]]:
    """A valid subset of the cached proposals for our commit (section 12.2): our own Update is superseded
    by the path; of conflicting proposals for one leaf a Remove wins over an Update and the first wins
    otherwise; duplicate PSKs, a second GroupContextExtensions, Removes of blank leaves or of us, Adds of
    clients already present and a ReInit among other proposals are left out."""
    me = Sender.member(own_leaf)
    chosen: dict[bytes, CachedProposal] = {}
    by_leaf: dict[int, bytes] = {}
    psks: set[bytes] = set()
    sig_keys = {leaf.signature_key for _, leaf in tree.leaves()}
    has_gce = False
    for ref, cached in proposals.items():
        p = cached.proposal
        if isinstance(p, Update):
            if cached.sender == me or cached.sender.index is None or cached.sender.index in by_leaf:
                continue
            by_leaf[cached.sender.index] = ref
        elif isinstance(p, Remove):
            if p.removed == own_leaf or tree.leaf(LeafIndex(p.removed)) is None:
                continue
            prior = by_leaf.get(p.removed)
            if prior is not None:
                if isinstance(chosen[prior].proposal, Remove):
                    continue
                del chosen[prior]
            by_leaf[p.removed] = ref
        elif isinstance(p, PreSharedKey):
            key = p.psk.to_bytes()
            if key in psks:
                continue
            psks.add(key)
        elif isinstance(p, GroupContextExtensions):
            if has_gce:
                continue
            has_gce = True
        elif isinstance(p, Add):
            key = p.key_package.leaf_node.signature_key
            if key in sig_keys:
                continue
            sig_keys.add(key)
        elif isinstance(p, ReInit):
            continue  # a ReInit must be committed alone: use commit(reinit=...)
        chosen[ref] = cached
    return list(chosen.items())
