"""Saving and restoring a member's group state, so that a restart continues the group exactly.

The blob holds every secret of the epoch (HPKE private keys, epoch secrets, the secret tree): the caller must
store it encrypted (the gateway's store does). The signer and the policy (`GroupConfig`) are not in it: they
are supplied again on restore (after a key rotation, a caller unsure which of its keys a saved group uses
passes them all; the one our leaf holds is taken). Decoding is strict; a corrupt blob raises `MlsDecodeError`,
and a restored group is checked against itself (tree hash and our leaf's private key) before it is returned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gateway.protocol.mls.codec import Reader, Writer, decode_all
from gateway.protocol.mls.crypto import Signer, get_suite
from gateway.protocol.mls.errors import MlsDecodeError, MlsError
from gateway.protocol.mls.framing import Sender
from gateway.protocol.mls.group import Group, GroupConfig
from gateway.protocol.mls.group_state import CachedProposal, EpochState, PastEpoch
from gateway.protocol.mls.key_schedule import EpochSecrets
from gateway.protocol.mls.proposals import ReInit, decode_proposal, encode_proposal
from gateway.protocol.mls.ratchet_tree import RatchetTree
from gateway.protocol.mls.secret_tree import SecretTree, strictly_increasing
from gateway.protocol.mls.tree_math import LeafIndex, NodeIndex, node_width
from gateway.protocol.mls.treekem import TreeKemPrivate
from gateway.protocol.mls.welcome_structs import GroupContext

FORMAT_VERSION = 1
_SECRET_FIELDS = [f.name for f in dataclasses.fields(EpochSecrets)]


def group_to_bytes(group: Group) -> bytes:
    st = group.state
    w = Writer().u16(FORMAT_VERSION).u16(group.cs.suite_id).u8(1 if group.active else 0)
    st.context.encode(w)
    w.opaque(st.tree.to_wire())
    w.u32(st.private.leaf_index)
    w.vector(sorted(st.private.keys.items()), lambda w2, kv: w2.u32(kv[0]).opaque(kv[1]))
    for name in _SECRET_FIELDS:
        w.opaque(getattr(st.secrets, name))
    w.opaque(st.interim_transcript_hash).opaque(st.confirmation_tag)
    st.secret_tree.encode(w)

    def put_cached(w2: Writer, item: tuple[bytes, CachedProposal]) -> None:
        ref, cached = item
        w2.opaque(ref)
        cached.sender.encode(w2)
        encode_proposal(w2, cached.proposal)

    w.vector(list(st.proposals.items()), put_cached)
    w.vector(sorted(group.resumption_psks().items()), lambda w2, kv: w2.u64(kv[0]).opaque(kv[1]))
    w.vector(sorted(st.pending_update_keys.items()), lambda w2, kv: w2.opaque(kv[0]).opaque(kv[1]))
    w.optional(group.reinit, lambda w2, ri: ri.encode(w2))

    def put_past(w2: Writer, past: PastEpoch) -> None:
        past.context.encode(w2)
        w2.opaque(past.tree.to_wire())
        past.secret_tree.encode(w2)
        w2.opaque(past.sender_data_secret)

    w.vector([p for _, p in sorted(group.past_epochs().items())], put_past)
    return w.bytes()


def _decode(r: Reader, signers: Sequence[Signer], config: GroupConfig) -> Group:
    version = r.u16()
    if version != FORMAT_VERSION:
        raise MlsDecodeError(f"group state format {version}, expected {FORMAT_VERSION}")
    cs = get_suite(r.u16())
    active = r.u8()
    if active > 1:
        raise MlsDecodeError("bad active flag")
    context = GroupContext.decode(r)
    tree = RatchetTree.from_wire(r.opaque())
    own = LeafIndex(r.u32())
    width = node_width(tree.n_leaves)
    keys: dict[NodeIndex, bytes] = {}
    key_items = r.vector(lambda r2: (r2.u32(), r2.opaque()))
    strictly_increasing([n for n, _ in key_items], "private keys")
    for node, priv in key_items:
        if node >= width:
            raise MlsDecodeError(f"private key for node {node} outside the tree")
        keys[NodeIndex(node)] = priv
    secrets = EpochSecrets(**{name: r.opaque() for name in _SECRET_FIELDS})
    interim, tag = r.opaque(), r.opaque()
    secret_tree = SecretTree.decode(cs, r)

    def get_cached(r2: Reader) -> tuple[bytes, CachedProposal]:
        ref = r2.opaque()
        sender = Sender.decode(r2)
        return ref, CachedProposal(decode_proposal(r2), sender)

    cached_items = r.vector(get_cached)
    proposals = dict(cached_items)
    if len(proposals) != len(cached_items):
        raise MlsDecodeError("proposal cache: duplicated reference")
    resumption_items = r.vector(lambda r2: (r2.u64(), r2.opaque()))
    strictly_increasing([e for e, _ in resumption_items], "resumption PSKs")
    resumption = dict(resumption_items)
    update_items = r.vector(lambda r2: (r2.opaque(), r2.opaque()))
    strictly_increasing([k for k, _ in update_items], "pending update keys")
    pending_updates = dict(update_items)
    reinit = r.optional(ReInit.decode)

    def get_past(r2: Reader) -> PastEpoch:
        ctx = GroupContext.decode(r2)
        past_tree = RatchetTree.from_wire(r2.opaque())
        past_secrets = SecretTree.decode(cs, r2)
        if past_secrets.n_leaves != past_tree.n_leaves or ctx.epoch >= context.epoch:
            raise MlsError("restored past epoch is inconsistent")
        return PastEpoch(ctx, past_tree, past_secrets, r2.opaque())

    past_items = r.vector(get_past)
    strictly_increasing([p.context.epoch for p in past_items], "past epochs")
    past = {p.context.epoch: p for p in past_items}
    if resumption.get(context.epoch) != secrets.resumption_psk:
        raise MlsError("restored group state is inconsistent (resumption PSK of the current epoch)")
    if context.cipher_suite != cs.suite_id or secret_tree.n_leaves != tree.n_leaves:
        raise MlsError("restored group state is inconsistent (suite or tree size)")
    if tree.tree_hash(cs) != context.tree_hash:
        raise MlsError("restored ratchet tree does not match the GroupContext tree hash")
    private = TreeKemPrivate(own, keys)
    signer = signers[0]
    if active:
        private.check_leaf(cs, tree)
        leaf = tree.leaf(own)
        held = [s for s in signers if leaf is not None and s.public_key == leaf.signature_key]
        if not held:
            raise MlsError("no signer supplied holds our leaf's signature key")
        signer = held[0]
    state = EpochState(context, tree, private, secrets, interim, tag, secret_tree, proposals, pending_updates)
    group = Group(cs, state, signer, config, resumption)
    group.active = bool(active)
    group.reinit = reinit
    group.restore_past_epochs(past)
    return group


def group_from_bytes(data: bytes, signer: Signer | Sequence[Signer], config: GroupConfig | None = None) -> Group:
    """Restore a saved group; `signer` is our signing key, or several (after a rotation) to pick from."""
    signers = list(signer) if isinstance(signer, Sequence) else [signer]
    if not signers:
        raise MlsError("no signer supplied")
    try:
        return decode_all(data, lambda r: _decode(r, signers, config or GroupConfig()))
    except (ValueError, KeyError) as e:  # structural rules of the wire dataclasses
        raise MlsDecodeError(f"group state: {e}") from None

