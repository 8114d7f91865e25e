"""One member's view of an MLS group (RFC 9420 sections 11-12): create, join from a Welcome, send and receive
application messages and proposals, create commits, and stage then merge received commits.

Rules kept here:
- every received message is authenticated (membership tag or AEAD, and the sender's signature) before it is
  used; group id and epoch must be the current ones;
- a commit is staged: `process()` returns a `StagedCommit` holding a complete next `EpochState` built on copies;
  nothing changes until `merge_staged_commit()`. A message that fails any check raises `MlsError` and leaves the
  group exactly as it was (for a PrivateMessage, its ratchet key is consumed only once the message is accepted);
- the committer never processes its own commit: it merges its `PendingCommit` when the delivery service has
  accepted it;
- a commit may rotate the committer's signature key and credential (`commit(new_signer=, new_credential=)`):
  the commit's FramedContent is signed with the key the committer's leaf holds before the commit, the new
  LeafNode of its UpdatePath with the new key. Receivers check the new leaf like any leaf (credential, signature
  by its own signature_key, source commit, unique keys) and ask `GroupConfig.credential_successor` whether the
  new credential is the same client. The committer keeps signing with the old key until it merges the commit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.protocol.mls import key_schedule, protection
from gateway.protocol.mls import tree_math as tm
from gateway.protocol.mls.commit import Commit, ProposalOrRef, ProposalRef
from gateway.protocol.mls.credentials import (
    Credential,
    IdentityValidator,
    SuccessorValidator,
    accept_any_identity,
    accept_any_successor,
)
from gateway.protocol.mls.crypto import CipherSuite, Signer, get_suite, ref_hash
from gateway.protocol.mls.errors import MlsDecodeError, MlsError
from gateway.protocol.mls.extensions import Extension, ExternalPub, external_senders, find_extension
from gateway.protocol.mls.framing import (
    AuthenticatedContent,
    FramedContent,
    FramedContentAuthData,
    MLSMessage,
    PrivateMessage,
    PublicMessage,
    Sender,
)
from gateway.protocol.mls.group_state import (
    ApplicationMessage,
    CachedProposal,
    EpochState,
    PastEpoch,
    PendingCommit,
    ProposalReceived,
    StagedCommit,
    new_secret_tree,
)
from gateway.protocol.mls.key_package import Capabilities, KeyPackage, LeafNode
from gateway.protocol.mls.key_package_bundle import (
    DEFAULT_LIFETIME,
    KeyPackageBundle,
    default_capabilities,
    sign_leaf_node,
)
from gateway.protocol.mls.proposal_rules import ListedProposal, apply_proposals, check_successor, select_pending
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
from gateway.protocol.mls.psk import PskInput, psk_secret
from gateway.protocol.mls.ratchet_tree import RatchetTree, validate_leaf_node
from gateway.protocol.mls.secret_tree import RatchetType
from gateway.protocol.mls.transcript import (
    check_confirmation_tag,
    confirmation_tag,
    confirmed_transcript_hash,
    initial_interim_transcript_hash,
    interim_transcript_hash,
)
from gateway.protocol.mls.tree_math import LeafIndex
from gateway.protocol.mls.treekem import TreeKemPrivate, create_update_path, process_update_path
from gateway.protocol.mls.welcome import NewMember, create_welcome, open_welcome, sign_group_info, verify_group_info
from gateway.protocol.mls.welcome_structs import GroupContext, GroupInfo, GroupSecrets, Welcome
from gateway.protocol.mls.wire import (
    ContentType,
    ExtensionType,
    LeafNodeSource,
    ProtocolVersion,
    PskType,
    SenderType,
    WireFormat,
)

PROPOSAL_REF_LABEL = b"MLS 1.0 Proposal Reference"


@dataclass
class GroupConfig:
    """Policy a member applies; none of it is sent on the wire."""

    identity_validator: IdentityValidator = accept_any_identity
    credential_successor: SuccessorValidator = accept_any_successor
    """Whether a member's new credential (a leaf replaced with another credential or signature key) is the same
    client as the old one (RFC 9420 section 5.3.1); the default accepts any, for tests and vectors only."""
    allow_external_commits: bool = True
    """Whether to accept commits from new members (external joins, RFC 9420 section 12.4.3.2). An application
    that never uses them turns them off: then no one can join, or replace a member, without a member's commit."""
    external_psks: dict[bytes, bytes] = field(default_factory=dict, repr=False)
    padding_block: int = 32
    out_of_order_window: int = 32
    max_forward: int = 1000
    resumption_epochs_kept: int = 16
    max_past_epochs: int = 1
    """Previous epochs whose remaining application keys are kept for late messages (0: none; forward secrecy
    for those keys then waits until this many further epochs have passed)."""
    handshake_wire_format: WireFormat = WireFormat.PUBLIC_MESSAGE


def proposal_ref(cs: CipherSuite, ac: AuthenticatedContent) -> bytes:
    return ref_hash(cs, PROPOSAL_REF_LABEL, ac.to_bytes())


class Group:
    """A member of one group. Not thread-safe; the I/O layer serialises calls."""

    def __init__(self, cs: CipherSuite, state: EpochState, signer: Signer, config: GroupConfig,
                 resumption_psks: dict[int, bytes] | None = None) -> None:
        self.cs = cs
        self._state = state
        self._signer = signer
        self.config = config
        self._resumption = dict(resumption_psks or {})
        self._resumption[state.context.epoch] = state.secrets.resumption_psk
        self.active = True
        self._past: dict[int, PastEpoch] = {}
        self.reinit: ReInit | None = None
        """Set once a ReInit commit is merged: the group is closed and only its successor may be created."""

    # --- creation and joining ----------------------------------------------------------------------------

    @classmethod
    def create(cls, suite_id: int, group_id: bytes, signer: Signer, credential: Credential, *,
               capabilities: Capabilities | None = None, extensions: tuple[Extension, ...] = (),
               config: GroupConfig | None = None) -> Group:
        """A one-member group at epoch 0 (section 11)."""
        cs = get_suite(suite_id)
        cfg = config or GroupConfig()
        cfg.identity_validator(credential, signer.public_key)
        enc_priv, enc_pub = cs.derive_key_pair(_rand(cs))
        caps = capabilities or default_capabilities(cs, credential)
        leaf = sign_leaf_node(signer, LeafNode(enc_pub, signer.public_key, credential, caps,
                                               LeafNodeSource.KEY_PACKAGE, DEFAULT_LIFETIME, None, ()))
        tree = RatchetTree.one_member(leaf)
        ctx = GroupContext(ProtocolVersion.MLS10, suite_id, group_id, 0, tree.tree_hash(cs), b"", extensions)
        secrets = key_schedule.advance(cs, _rand(cs), bytes(cs.hash_len), bytes(cs.hash_len), ctx.to_bytes())
        tag = confirmation_tag(cs, secrets.confirmation_key, b"")
        state = EpochState(ctx, tree, TreeKemPrivate.for_leaf(LeafIndex(0), enc_priv), secrets,
                           initial_interim_transcript_hash(cs, secrets.confirmation_key), tag,
                           new_secret_tree(cs, secrets, tree, cfg.out_of_order_window, cfg.max_forward))
        return cls(cs, state, signer, cfg)

    @classmethod
    def join(cls, welcome: Welcome, bundle: KeyPackageBundle, signer: Signer, *,
             ratchet_tree: RatchetTree | None = None, config: GroupConfig | None = None) -> Group:
        """Join from a Welcome (section 12.4.3.1); the tree comes from the GroupInfo or out of band."""
        cfg = config or GroupConfig()
        kp = bundle.key_package
        cs = get_suite(kp.cipher_suite)
        if signer.public_key != kp.leaf_node.signature_key:
            raise MlsError("the signer does not hold the KeyPackage's signature key")
        if cs.hpke_public_key(bundle.encryption_priv) != kp.leaf_node.encryption_key:
            raise MlsError("the encryption private key does not match the KeyPackage leaf")
        opened = open_welcome(cs, welcome, kp, bundle.init_priv, lambda gs: _external_psk_inputs(cfg, gs))
        gi = opened.group_info
        gc = gi.group_context
        if gc.version != ProtocolVersion.MLS10:
            raise MlsError(f"GroupContext version {gc.version} is not mls10")
        tree = checked_tree(cs, gi, ratchet_tree, cfg.identity_validator)
        own = next((i for i, leaf in tree.leaves() if leaf == kp.leaf_node), None)
        if own is None:
            raise MlsError("our KeyPackage's leaf is not in the tree")
        private = TreeKemPrivate.for_leaf(own, bundle.encryption_priv)
        if opened.group_secrets.path_secret is not None:
            start = tm.common_ancestor(tm.leaf_to_node(own), tm.leaf_to_node(LeafIndex(gi.signer)))
            private.install_path_secret(cs, tree, start, opened.group_secrets.path_secret)
        secrets = opened.epoch_secrets
        state = EpochState(gc, tree, private, secrets,
                           interim_transcript_hash(cs, gc.confirmed_transcript_hash, gi.confirmation_tag),
                           gi.confirmation_tag,
                           new_secret_tree(cs, secrets, tree, cfg.out_of_order_window, cfg.max_forward))
        return cls(cs, state, signer, cfg)

    # --- read-only views ---------------------------------------------------------------------------------

    @property
    def group_id(self) -> bytes:
        return self._state.context.group_id

    @property
    def epoch(self) -> int:
        return self._state.context.epoch

    @property
    def context(self) -> GroupContext:
        return self._state.context

    @property
    def own_leaf(self) -> LeafIndex:
        return self._state.own_leaf

    @property
    def tree(self) -> RatchetTree:
        return self._state.tree.copy()

    @property
    def signature_key(self) -> bytes:
        """The public key this member signs with (its leaf's signature key)."""
        return self._signer.public_key

    @property
    def epoch_authenticator(self) -> bytes:
        return self._state.secrets.epoch_authenticator

    @property
    def state(self) -> EpochState:
        """The current epoch state (for serialisation); do not modify it."""
        return self._state

    def members(self) -> list[tuple[LeafIndex, LeafNode]]:
        return list(self._state.tree.leaves())

    def resumption_psks(self) -> dict[int, bytes]:
        """Resumption PSKs of the last few epochs, by epoch (kept for PSK proposals and persistence)."""
        return dict(self._resumption)

    def export_secret(self, label: bytes, context: bytes, length: int) -> bytes:
        return self._state.secrets.exporter(self.cs, label, context, length)

    def __repr__(self) -> str:
        return f"Group(group_id={self.group_id.hex()}, epoch={self.epoch}, own_leaf={self.own_leaf})"

    # --- sending -----------------------------------------------------------------------------------------

    def _check_active(self) -> None:
        if not self.active:
            raise MlsError("this member was removed from the group")
        if self.reinit is not None:
            raise MlsError("the group was closed by a ReInit commit; continue in the reinitialised group")

    def _framed(self, body: bytes | Proposal | Commit, authenticated_data: bytes) -> FramedContent:
        return FramedContent(self.group_id, self.epoch, Sender.member(self.own_leaf), authenticated_data, body)

    def _protect(self, ac: AuthenticatedContent) -> MLSMessage:
        st = self._state
        if ac.wire_format == WireFormat.PUBLIC_MESSAGE:
            return MLSMessage(protection.protect_public(self.cs, ac, st.context, st.secrets.membership_key))
        return MLSMessage(protection.protect_private(self.cs, ac, st.secret_tree, st.secrets.sender_data_secret,
                                                     padding_block=self.config.padding_block))

    def encrypt_application(self, data: bytes, authenticated_data: bytes = b"") -> MLSMessage:
        self._check_active()
        st = self._state
        if type(data) is not bytes or type(authenticated_data) is not bytes:  # the generic path decides
            ac = protection.sign_authenticated_content(self._signer, WireFormat.PRIVATE_MESSAGE,
                                                       self._framed(data, authenticated_data), st.context)
            return self._protect(ac)
        return MLSMessage(protection.seal_application(self.cs, self._signer, st.context, st.secret_tree,
                                                      st.secrets.sender_data_secret, st.own_leaf, data,
                                                      authenticated_data, padding_block=self.config.padding_block))

    def propose(self, proposal: Proposal, authenticated_data: bytes = b"") -> MLSMessage:
        """Send a proposal by reference (Add, Remove, PreSharedKey, GroupContextExtensions)."""
        self._check_active()
        if not isinstance(proposal, (Add, Remove, PreSharedKey, GroupContextExtensions)):
            raise MlsError(f"{type(proposal).__name__} proposals are not supported here (use propose_update)")
        return self._send_proposal(proposal, authenticated_data)

    def _send_proposal(self, proposal: Proposal, authenticated_data: bytes) -> MLSMessage:
        wf = self.config.handshake_wire_format
        ac = protection.sign_authenticated_content(self._signer, wf, self._framed(proposal, authenticated_data),
                                                   self._state.context)
        msg = self._protect(ac)
        self._state.proposals[proposal_ref(self.cs, ac)] = CachedProposal(proposal, ac.content.sender)
        return msg

    def propose_update(self, authenticated_data: bytes = b"") -> MLSMessage:
        """Propose fresh leaf keys (another member commits them); the private key waits for that commit."""
        self._check_active()
        old = self._state.tree.leaf(self.own_leaf)
        assert old is not None
        enc_priv, enc_pub = self.cs.derive_key_pair(_rand(self.cs))
        leaf = sign_leaf_node(self._signer, LeafNode(enc_pub, old.signature_key, old.credential, old.capabilities,
                                                     LeafNodeSource.UPDATE, None, None, old.extensions),
                              self.group_id, self.own_leaf)
        msg = self._send_proposal(Update(leaf), authenticated_data)
        self._state.pending_update_keys[enc_pub] = enc_priv
        return msg

    def commit(self, *, add: Sequence[KeyPackage] = (), remove: Sequence[int] = (),
               psks: Sequence[PreSharedKeyID] = (), extensions: tuple[Extension, ...] | None = None,
               reinit: ReInit | None = None,
               force_path: bool = True, include_pending: bool = True, ratchet_tree_in_welcome: bool = True,
               authenticated_data: bytes = b"", now: int | None = None,
               new_signer: Signer | None = None, new_credential: Credential | None = None) -> PendingCommit:
        """Create a commit over the given proposals (by value) and the pending ones (by reference). Pass `now`
        (seconds since the epoch) to refuse KeyPackages outside their lifetime.

        `new_signer` and/or `new_credential` rotate our leaf's signature key and credential: the UpdatePath's
        LeafNode carries them and is signed by `new_signer`; the commit itself is signed with our current key.
        The group signs with `new_signer` once `merge_pending_commit()` merged this commit."""
        self._check_active()
        cs, st = self.cs, self._state
        leaf_signer = self._signer
        rotated: LeafNode | None = None
        if new_signer is not None or new_credential is not None:
            current = st.tree.leaf(self.own_leaf)
            assert current is not None
            leaf_signer = new_signer or self._signer
            rotated = dataclasses.replace(current, signature_key=leaf_signer.public_key,
                                          credential=new_credential or current.credential)
            self.config.identity_validator(rotated.credential, rotated.signature_key)
            check_successor(current, rotated, self.config.credential_successor)
            force_path = True
        me = Sender.member(self.own_leaf)
        items: list[ListedProposal] = []
        refs: list[ProposalOrRef] = []
        if include_pending:
            for ref, cached in select_pending(st.tree, st.proposals, self.own_leaf):
                items.append(ListedProposal(cached.proposal, cached.sender, False))
                refs.append(ProposalRef(ref))
        inline: list[Proposal] = [*(Add(kp) for kp in add), *(Remove(r) for r in remove),
                                  *(PreSharedKey(p) for p in psks)]
        if extensions is not None:
            inline.append(GroupContextExtensions(extensions))
        if reinit is not None:
            inline.append(reinit)
        items += [ListedProposal(p, me, True) for p in inline]
        refs += inline
        fx = apply_proposals(cs, st.tree, self.group_id, st.context.extensions, me, items,
                             self.config.identity_validator, now, self.config.credential_successor)
        private = st.private.copy()
        private.prune(fx.tree)
        commit_secret = bytes(cs.hash_len)
        path = None
        path_secrets = {}
        tree = fx.tree
        added = tuple(fx.added)
        if fx.path_required or force_path:
            own_leaf = rotated or fx.tree.leaf(self.own_leaf)
            assert own_leaf is not None
            created = create_update_path(
                cs, fx.tree, private, self.group_id, own_leaf, leaf_signer,
                lambda th: self._provisional_context(th, fx.extensions),
                frozenset(i for i, _ in added))
            tree, private, commit_secret = created.tree, created.private, created.commit_secret
            path, path_secrets = created.update_path, created.path_secrets
        wf = self.config.handshake_wire_format
        content = self._framed(Commit(tuple(refs), path), authenticated_data)
        signature = protection.sign_content(self._signer, wf, content, st.context)
        unsigned = AuthenticatedContent(wf, content, _auth(signature, bytes(cs.hash_len)))
        cth = confirmed_transcript_hash(cs, st.interim_transcript_hash, unsigned)
        new_ctx = GroupContext(st.context.version, st.context.cipher_suite, self.group_id, self.epoch + 1,
                               tree.tree_hash(cs), cth, fx.extensions)
        psk_value = psk_secret(cs, self._psk_inputs(fx.psks))
        secrets = key_schedule.advance(cs, st.secrets.init_secret, commit_secret, psk_value, new_ctx.to_bytes())
        tag = confirmation_tag(cs, secrets.confirmation_key, cth)
        ac = AuthenticatedContent(wf, content, _auth(signature, tag))
        message = self._protect(ac)
        next_state = EpochState(new_ctx, tree, private, secrets, interim_transcript_hash(cs, cth, tag), tag,
                                new_secret_tree(cs, secrets, tree, self.config.out_of_order_window,
                                                self.config.max_forward))
        welcome = None
        if added:
            gi_ext: tuple[Extension, ...] = ()
            if ratchet_tree_in_welcome:
                gi_ext = (Extension(ExtensionType.RATCHET_TREE, tree.to_wire()),)
            gi = sign_group_info(leaf_signer, GroupInfo(new_ctx, gi_ext, tag, self.own_leaf))
            own_node = tm.leaf_to_node(self.own_leaf)
            members = []
            for index, kp in added:
                start = tm.common_ancestor(own_node, tm.leaf_to_node(index))
                members.append(NewMember(kp, path_secrets.get(start)))
            welcome = MLSMessage(create_welcome(cs, gi, secrets.joiner_secret, psk_value, members, tuple(fx.psks)))
        return PendingCommit(self.epoch, message, welcome, added, next_state, fx.reinit,
                             leaf_signer if rotated is not None else None)

    def merge_pending_commit(self, pending: PendingCommit) -> None:
        if pending.base_epoch != self.epoch:
            raise MlsError(f"pending commit was made in epoch {pending.base_epoch}, the group is at {self.epoch}")
        self._install(pending.next_state)
        self.reinit = pending.reinit
        if pending.new_signer is not None:
            self._signer = pending.new_signer

    def group_info(self, *, with_ratchet_tree: bool = True, with_external_pub: bool = True) -> GroupInfo:
        """A signed GroupInfo for the current epoch (for external joins)."""
        st = self._state
        exts: list[Extension] = []
        if with_ratchet_tree:
            exts.append(Extension(ExtensionType.RATCHET_TREE, st.tree.to_wire()))
        if with_external_pub:
            exts.append(ExternalPub(st.secrets.external_key_pair(self.cs)[1]).to_extension())
        return sign_group_info(self._signer, GroupInfo(st.context, tuple(exts), st.confirmation_tag, self.own_leaf))

    # --- receiving ---------------------------------------------------------------------------------------

    def process(self, message: MLSMessage | bytes, now: int | None = None
                ) -> ApplicationMessage | ProposalReceived | StagedCommit:
        """Authenticate and interpret one handshake or application message from the delivery service. Pass
        `now` (seconds since the epoch) to refuse commits adding KeyPackages outside their lifetime."""
        self._check_active()
        try:
            msg = message if isinstance(message, MLSMessage) else MLSMessage.from_bytes(message)
        except ValueError as e:  # a structural rule of a wire dataclass; the codec raises MlsDecodeError itself
            raise MlsDecodeError(f"MLSMessage: {e}") from None
        if msg.version != ProtocolVersion.MLS10:
            raise MlsError(f"unsupported protocol version {msg.version}")
        body = msg.body
        st = self._state
        if isinstance(body, PublicMessage):
            self._check_epoch(body.content.group_id, body.content.epoch)
            ac = protection.unprotect_public(self.cs, body, st.context, st.secrets.membership_key,
                                             lambda s: self._signature_key(s, body.content))
            opened = None
        elif isinstance(body, PrivateMessage) and body.epoch in self._past and body.group_id == self.group_id:
            return self._process_past_application(body)
        elif isinstance(body, PrivateMessage):
            self._check_epoch(body.group_id, body.epoch)
            if body.content_type == ContentType.APPLICATION:
                return self._process_application(body)
            opened = protection.unprotect_private(self.cs, body, st.context, st.secret_tree,
                                                  st.secrets.sender_data_secret,
                                                  lambda s: self._signature_key(s, None), consume=False)
            ac = opened.content
        else:
            raise MlsError(f"expected a PublicMessage or PrivateMessage, got {type(body).__name__}")
        content = ac.content
        if content.sender.sender_type == SenderType.MEMBER and content.sender.index == self.own_leaf:
            raise MlsError("a message from our own leaf: own messages are not processed")
        result: ApplicationMessage | ProposalReceived | StagedCommit
        if isinstance(content.content, bytes):
            assert opened is not None  # PublicMessage application data is refused by unprotect_public
            result = ApplicationMessage(opened.leaf, content.content, content.authenticated_data, opened.generation,
                                        self.epoch)
        elif isinstance(content.content, Commit):
            result = self._stage_commit(ac, content.content, now)
        else:
            result = self._receive_proposal(ac, content.content)
        if opened is not None and not isinstance(result, StagedCommit):
            opened.consume(st.secret_tree)
        return result

    def _process_application(self, body: PrivateMessage) -> ApplicationMessage:
        """What the generic path of `process` does for application data of the current epoch, through
        `protection.open_application`: the same checks in the same order, the key consumed last."""
        st = self._state
        leaf, generation, data = protection.open_application(self.cs, body, st.context, st.secret_tree,
                                                             st.secrets.sender_data_secret,
                                                             self._member_signature_key)
        if leaf == st.own_leaf:
            raise MlsError("a message from our own leaf: own messages are not processed")
        result = ApplicationMessage(leaf, data, body.authenticated_data, generation, st.context.epoch)
        st.secret_tree.consume(leaf, RatchetType.APPLICATION, generation)
        return result

    def merge_staged_commit(self, staged: StagedCommit) -> None:
        if staged.base_epoch != self.epoch:
            raise MlsError(f"staged commit was for epoch {staged.base_epoch}, the group is at {self.epoch}")
        if staged.self_removed or staged.next_state is None:
            self.active = False
            return
        self._install(staged.next_state)
        self.reinit = next((p for p in staged.proposals if isinstance(p, ReInit)), None)

    # --- internals ---------------------------------------------------------------------------------------

    def past_epochs(self) -> dict[int, PastEpoch]:
        """The previous epochs still readable for late application messages (for persistence)."""
        return dict(self._past)

    def restore_past_epochs(self, past: dict[int, PastEpoch]) -> None:
        """Used by persistence only."""
        self._past = dict(past)

    def _process_past_application(self, body: PrivateMessage) -> ApplicationMessage:
        """A late application message from a previous epoch we still hold keys for; nothing else is accepted."""
        if body.content_type != ContentType.APPLICATION:
            raise MlsError(f"handshake message for past epoch {body.epoch}; the group is at epoch {self.epoch}")
        past = self._past[body.epoch]

        def key_for(sender: Sender) -> bytes:
            leaf = past.tree.leaf(LeafIndex(sender.index if sender.index is not None else -1))
            if leaf is None:
                raise MlsError(f"sender {sender.index} was not a member in epoch {body.epoch}")
            return leaf.signature_key

        opened = protection.unprotect_private(self.cs, body, past.context, past.secret_tree, past.sender_data_secret,
                                              key_for)
        data = opened.content.content.content
        assert isinstance(data, bytes)
        return ApplicationMessage(opened.leaf, data, opened.content.content.authenticated_data, opened.generation,
                                  body.epoch)

    def _install(self, state: EpochState) -> None:
        prev = self._state
        if self.config.max_past_epochs > 0 and prev is not state:
            self._past[prev.context.epoch] = PastEpoch(prev.context, prev.tree, prev.secret_tree,
                                                       prev.secrets.sender_data_secret)
            for epoch in sorted(self._past)[: -self.config.max_past_epochs]:
                del self._past[epoch]
        self._state = state
        self._resumption[state.context.epoch] = state.secrets.resumption_psk
        for epoch in sorted(self._resumption)[: -max(1, self.config.resumption_epochs_kept)]:
            del self._resumption[epoch]

    def _check_epoch(self, group_id: bytes, epoch: int) -> None:
        if group_id != self.group_id:
            raise MlsError("message for another group")
        if epoch != self.epoch:
            raise MlsError(f"message for epoch {epoch}; the group is at epoch {self.epoch}")

    def _member_signature_key(self, index: LeafIndex) -> bytes:
        leaf = self._state.tree.leaf(index)
        if leaf is None:
            raise MlsError(f"sender leaf {index} is not a member")
        return leaf.signature_key

    def _signature_key(self, sender: Sender, content: FramedContent | None) -> bytes:
        st = self._state
        if sender.sender_type == SenderType.MEMBER:
            assert sender.index is not None
            return self._member_signature_key(LeafIndex(sender.index))
        if sender.sender_type == SenderType.EXTERNAL:
            assert sender.index is not None
            ext = external_senders(st.context.extensions)
            if ext is None or sender.index >= len(ext.senders):
                raise MlsError(f"unknown external sender {sender.index}")
            return ext.senders[sender.index].signature_key
        if content is None:
            raise MlsError("non-member senders must use PublicMessage")
        body = content.content
        if sender.sender_type == SenderType.NEW_MEMBER_COMMIT and isinstance(body, Commit) and body.path is not None:
            return body.path.leaf_node.signature_key
        if sender.sender_type == SenderType.NEW_MEMBER_PROPOSAL and isinstance(body, Add):
            return body.key_package.leaf_node.signature_key
        raise MlsError(f"sender type {sender.sender_type.name} cannot send this content")

    def _receive_proposal(self, ac: AuthenticatedContent, proposal: Proposal) -> ProposalReceived:
        sender = ac.content.sender
        if sender.sender_type == SenderType.NEW_MEMBER_PROPOSAL and not isinstance(proposal, Add):
            raise MlsError("a new_member_proposal sender may only propose Add")
        allowed_external = (Add, Remove, PreSharedKey, ReInit, GroupContextExtensions)
        if sender.sender_type == SenderType.EXTERNAL and not isinstance(proposal, allowed_external):
            raise MlsError(f"external senders may not propose {type(proposal).__name__}")
        if isinstance(proposal, ExternalInit):
            raise MlsError("ExternalInit proposals are only valid inside an external commit")
        ref = proposal_ref(self.cs, ac)
        self._state.proposals[ref] = CachedProposal(proposal, sender)
        return ProposalReceived(ref, proposal, sender)

    def _provisional_context(self, tree_hash: bytes, extensions: tuple[Extension, ...]) -> GroupContext:
        c = self._state.context
        return GroupContext(c.version, c.cipher_suite, c.group_id, c.epoch + 1, tree_hash,
                            c.confirmed_transcript_hash, extensions)

    def _psk_inputs(self, ids: Sequence[PreSharedKeyID]) -> list[PskInput]:
        out = []
        for pid in ids:
            if pid.psktype == PskType.EXTERNAL:
                value = self.config.external_psks.get(pid.psk_id)
            elif pid.psk_group_id == self.group_id:
                value = self._resumption.get(pid.psk_epoch)
            else:
                value = None
            if value is None:
                raise MlsError(f"unknown PSK ({pid.psktype.name}); cannot derive the epoch")
            out.append(PskInput(pid.to_bytes(), value))
        return out

    def _stage_commit(self, ac: AuthenticatedContent, commit: Commit, now: int | None) -> StagedCommit:
        cs, st = self.cs, self._state
        committer = ac.content.sender
        if committer.sender_type not in (SenderType.MEMBER, SenderType.NEW_MEMBER_COMMIT):
            raise MlsError(f"a {committer.sender_type.name} sender cannot commit")
        if committer.sender_type == SenderType.NEW_MEMBER_COMMIT and not self.config.allow_external_commits:
            raise MlsError("this group does not accept external commits")
        items: list[ListedProposal] = []
        for por in commit.proposals:
            if isinstance(por, ProposalRef):
                cached = st.proposals.get(por.ref)
                if cached is None:
                    raise MlsError("commit references a proposal we have not received in this epoch")
                items.append(ListedProposal(cached.proposal, cached.sender, False))
            else:
                items.append(ListedProposal(por, committer, True))
        fx = apply_proposals(cs, st.tree, self.group_id, st.context.extensions, committer, items,
                             self.config.identity_validator, now, self.config.credential_successor)
        if fx.path_required and commit.path is None:
            raise MlsError("this commit's proposals require an UpdatePath")
        proposals = tuple(i.proposal for i in items)
        if self.own_leaf in fx.removed:
            return StagedCommit(self.epoch, committer, proposals, tuple(i for i, _ in fx.added), tuple(fx.removed),
                                True, None)
        tree, private = fx.tree, st.private.copy()
        private.prune(tree)
        if self.own_leaf in fx.updated:
            own_leaf = tree.leaf(self.own_leaf)
            assert own_leaf is not None
            priv = st.pending_update_keys.get(own_leaf.encryption_key)
            if priv is None:
                raise MlsError("the commit applies an Update to our leaf that we did not propose")
            private.keys[tm.leaf_to_node(self.own_leaf)] = priv
        commit_secret = bytes(cs.hash_len)
        if committer.sender_type == SenderType.NEW_MEMBER_COMMIT:
            assert commit.path is not None
            for gone in fx.removed:
                # Resync: the joiner may remove only its own former leaf, so the new leaf must be the same
                # client as the removed one (RFC 9420 section 12.2).
                previous = st.tree.leaf(gone)
                assert previous is not None
                check_successor(previous, commit.path.leaf_node, self.config.credential_successor)
            committer_leaf = tree.add_leaf(commit.path.leaf_node)
        else:
            assert committer.index is not None
            committer_leaf = LeafIndex(committer.index)
        if commit.path is not None:
            validate_leaf_node(cs, tree, commit.path.leaf_node, committer_leaf, self.group_id, fx.extensions,
                               self.config.identity_validator, expected_source=LeafNodeSource.COMMIT)
            if committer.sender_type == SenderType.MEMBER:
                # The commit was verified with the committer's current key (above, before staging); a new key or
                # credential in its UpdatePath leaf must be the same client's (RFC 9420 5.3.1, 7.5).
                previous = st.tree.leaf(committer_leaf)
                assert previous is not None
                check_successor(previous, commit.path.leaf_node, self.config.credential_successor)
            processed = process_update_path(cs, tree, private, committer_leaf, commit.path, self.group_id,
                                            lambda th: self._provisional_context(th, fx.extensions),
                                            frozenset(i for i, _ in fx.added))
            tree, private, commit_secret = processed.tree, processed.private, processed.commit_secret
        cth = confirmed_transcript_hash(cs, st.interim_transcript_hash, ac)
        new_ctx = GroupContext(st.context.version, st.context.cipher_suite, self.group_id, self.epoch + 1,
                               tree.tree_hash(cs), cth, fx.extensions)
        psk_value = psk_secret(cs, self._psk_inputs(fx.psks))
        init_secret = st.secrets.init_secret
        if fx.external_init is not None:
            external_priv, _ = st.secrets.external_key_pair(cs)
            init_secret = key_schedule.external_init_receiver(cs, external_priv, fx.external_init.kem_output)
        secrets = key_schedule.advance(cs, init_secret, commit_secret, psk_value, new_ctx.to_bytes())
        tag = ac.auth.confirmation_tag
        assert tag is not None
        check_confirmation_tag(cs, secrets.confirmation_key, cth, tag)
        next_state = EpochState(new_ctx, tree, private, secrets, interim_transcript_hash(cs, cth, tag), tag,
                                new_secret_tree(cs, secrets, tree, self.config.out_of_order_window,
                                                self.config.max_forward))
        return StagedCommit(self.epoch, committer, proposals, tuple(i for i, _ in fx.added), tuple(fx.removed),
                            False, next_state)


def checked_tree(cs: CipherSuite, gi: GroupInfo, ratchet_tree: RatchetTree | None,
                 identity_validator: IdentityValidator) -> RatchetTree:
    """The ratchet tree a joiner (by Welcome or external commit) may trust: from the GroupInfo's ratchet_tree
    extension or supplied out of band, with the GroupInfo signed by a member, matching the tree hash, valid."""
    ext = find_extension(gi.extensions, ExtensionType.RATCHET_TREE)
    if ext is not None:
        tree = RatchetTree.from_wire(ext.extension_data)
    elif ratchet_tree is not None:
        tree = ratchet_tree.copy()
    else:
        raise MlsError("the GroupInfo has no ratchet_tree extension and no tree was supplied")
    signer_leaf = tree.leaf(LeafIndex(gi.signer))
    if signer_leaf is None:
        raise MlsError(f"GroupInfo signer {gi.signer} is not a member")
    verify_group_info(cs, gi, signer_leaf.signature_key)
    if tree.tree_hash(cs) != gi.group_context.tree_hash:
        raise MlsError("the ratchet tree does not match the GroupInfo's tree hash")
    tree.validate(cs, gi.group_context.group_id, gi.group_context.extensions, identity_validator)
    return tree


def _auth(signature: bytes, tag: bytes) -> FramedContentAuthData:
    return FramedContentAuthData(signature, tag)


def _external_psk_inputs(cfg: GroupConfig, secrets: GroupSecrets) -> list[PskInput]:
    out = []
    for pid in secrets.psks:
        value = cfg.external_psks.get(pid.psk_id) if pid.psktype == PskType.EXTERNAL else None
        if value is None:
            raise MlsError("the Welcome needs a PSK this client does not hold")
        out.append(PskInput(pid.to_bytes(), value))
    return out


def _rand(cs: CipherSuite) -> bytes:
    return os.urandom(cs.hash_len)
