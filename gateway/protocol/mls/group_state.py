"""The state of one member in one epoch, and the results a group hands back to its caller.

`EpochState` is replaced whole when a commit is merged, never edited in place: staging a commit builds the next
`EpochState` beside the current one, so a rejected commit cannot leave a half-applied state behind. Within an
epoch only two things change: the secret tree (keys consumed) and the proposal cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.protocol.mls.crypto import CipherSuite, Signer
from gateway.protocol.mls.framing import MLSMessage, Sender
from gateway.protocol.mls.key_package import KeyPackage
from gateway.protocol.mls.key_schedule import EpochSecrets
from gateway.protocol.mls.proposals import Proposal, ReInit
from gateway.protocol.mls.ratchet_tree import RatchetTree
from gateway.protocol.mls.secret_tree import SecretTree
from gateway.protocol.mls.tree_math import LeafIndex
from gateway.protocol.mls.treekem import TreeKemPrivate
from gateway.protocol.mls.welcome_structs import GroupContext


@dataclass(frozen=True)
class CachedProposal:
    """A verified proposal received (or sent) in the current epoch, kept until the next commit."""

    proposal: Proposal
    sender: Sender


@dataclass
class EpochState:
    """Everything a member knows in one epoch."""

    context: GroupContext
    tree: RatchetTree
    private: TreeKemPrivate
    secrets: EpochSecrets
    interim_transcript_hash: bytes
    confirmation_tag: bytes
    secret_tree: SecretTree
    proposals: dict[bytes, CachedProposal] = field(default_factory=dict)
    pending_update_keys: dict[bytes, bytes] = field(default_factory=dict)
    """Our Update proposals of this epoch: new leaf encryption key -> its private key."""

    @property
    def own_leaf(self) -> LeafIndex:
        return self.private.leaf_index

    def __repr__(self) -> str:
        return (f"EpochState(epoch={self.context.epoch}, n_leaves={self.tree.n_leaves}, own_leaf={self.own_leaf}, "
                f"pending_proposals={len(self.proposals)})")


@dataclass
class PastEpoch:
    """What is kept of a previous epoch to read application messages that arrive late (bounded by
    `GroupConfig.max_past_epochs`): its context, tree (senders' keys) and remaining message keys."""

    context: GroupContext
    tree: RatchetTree
    secret_tree: SecretTree
    sender_data_secret: bytes = field(repr=False)


def new_secret_tree(
    cs: CipherSuite, secrets: EpochSecrets, tree: RatchetTree, out_of_order_window: int, max_forward: int
) -> SecretTree:
    return SecretTree(cs, secrets.encryption_secret, tree.n_leaves, out_of_order_window=out_of_order_window,
                      max_forward=max_forward)


# --- what `Group.process()` returns ------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplicationMessage:
    sender: LeafIndex
    data: bytes
    authenticated_data: bytes
    generation: int
    epoch: int


@dataclass(frozen=True)
class ProposalReceived:
    ref: bytes
    proposal: Proposal
    sender: Sender


@dataclass(frozen=True)
class StagedCommit:
    """A fully validated commit, not yet applied. `Group.merge_staged_commit()` applies it."""

    base_epoch: int
    committer: Sender
    proposals: tuple[Proposal, ...]
    added: tuple[LeafIndex, ...]
    removed: tuple[LeafIndex, ...]
    self_removed: bool
    next_state: EpochState | None = field(repr=False)

    @property
    def new_epoch(self) -> int:
        return self.base_epoch + 1


@dataclass(frozen=True)
class PendingCommit:
    """A commit this member created: send `message` (and `welcome` to the new members), then merge it once the
    delivery service has accepted it."""

    base_epoch: int
    message: MLSMessage
    welcome: MLSMessage | None
    added: tuple[tuple[LeafIndex, KeyPackage], ...]
    next_state: EpochState = field(repr=False)
    reinit: ReInit | None = None
    new_signer: Signer | None = field(default=None, repr=False)
    """Set when the commit rotates our signature key: the group signs with it once the commit is merged."""
