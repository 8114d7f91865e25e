"""The secret tree and per-sender hash ratchets (RFC 9420 section 9), with forward secrecy and replay protection.

Node secrets are derived lazily from encryption_secret and deleted as soon as their children exist; a
ratchet's secret is replaced by the next one as soon as a generation's key is derived. Keys for generations
skipped by out-of-order delivery are kept in a bounded window and deleted when used; a generation that is
neither ahead nor in the window is refused as a replay.

Lookups are split in two so a rejected message changes nothing: `key_for()` computes a key without touching
the state, and `consume()` (called only once the message has been authenticated) deletes it and advances.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeVar

from gateway.protocol.mls import tree_math as tm
from gateway.protocol.mls.codec import Reader, Writer, encode_varint
from gateway.protocol.mls.crypto import CipherSuite, derive_tree_secret, expand_with_label, kdf_label_head
from gateway.protocol.mls.errors import MlsDecodeError, MlsError, MlsReplayError
from gateway.protocol.mls.tree_math import LeafIndex, NodeIndex

K = TypeVar("K", bound=Any)

DEFAULT_OUT_OF_ORDER_WINDOW = 32
DEFAULT_MAX_FORWARD = 1000


def strictly_increasing(keys: list[K], what: str) -> None:
    """Persisted maps are written in sorted order; anything else (including a duplicate) is corruption."""
    for a, b in itertools.pairwise(keys):
        if not a < b:
            raise MlsDecodeError(f"{what}: entries out of order or duplicated")


class RatchetType(IntEnum):
    HANDSHAKE = 0
    APPLICATION = 1


@dataclass(frozen=True)
class KeyNonce:
    generation: int
    key: bytes = field(repr=False)
    nonce: bytes = field(repr=False)


def ratchet_key_nonce(cs: CipherSuite, secret: bytes, generation: int) -> KeyNonce:
    """The generic derivation; `SecretTree._key_nonce` is the same with its label heads precomputed."""
    return KeyNonce(
        generation,
        derive_tree_secret(cs, secret, b"key", generation, cs.aead_key_len),
        derive_tree_secret(cs, secret, b"nonce", generation, cs.aead_nonce_len),
    )


def ratchet_next(cs: CipherSuite, secret: bytes, generation: int) -> bytes:
    """The generic derivation; `SecretTree._next_secret` is the same with its label head precomputed."""
    return derive_tree_secret(cs, secret, b"secret", generation, cs.hash_len)


@dataclass
class HashRatchet:
    """One sender's chain of one type: the secret of `generation` and the keys of skipped generations."""

    secret: bytes = field(repr=False)
    generation: int = 0
    skipped: dict[int, KeyNonce] = field(default_factory=dict, repr=False)


class SecretTree:
    """Per-epoch secret tree over `n_leaves` leaves (a power of two)."""

    def __init__(
        self,
        cs: CipherSuite,
        encryption_secret: bytes,
        n_leaves: int,
        *,
        out_of_order_window: int = DEFAULT_OUT_OF_ORDER_WINDOW,
        max_forward: int = DEFAULT_MAX_FORWARD,
    ) -> None:
        if n_leaves <= 0 or n_leaves & (n_leaves - 1):
            raise MlsError(f"secret tree needs a power-of-two leaf count, got {n_leaves}")
        self._cs = cs
        self._n_leaves = n_leaves
        self._nodes: dict[NodeIndex, bytes] = {tm.root(n_leaves): encryption_secret}
        self._ratchets: dict[tuple[LeafIndex, RatchetType], HashRatchet] = {}
        self.out_of_order_window = out_of_order_window
        self.max_forward = max_forward
        # DeriveTreeSecret for the ratchet's fixed labels: the constant KDFLabel head, with the length (4) of
        # the uint32 generation context, is computed once per tree.
        self._key_len, self._nonce_len, self._hash_len = cs.aead_key_len, cs.aead_nonce_len, cs.hash_len
        self._key_head = kdf_label_head(b"key", self._key_len) + b"\x04"
        self._nonce_head = kdf_label_head(b"nonce", self._nonce_len) + b"\x04"
        self._secret_head = kdf_label_head(b"secret", self._hash_len) + b"\x04"

    def __repr__(self) -> str:
        return f"SecretTree(n_leaves={self._n_leaves}, live_nodes={len(self._nodes)}, ratchets={len(self._ratchets)})"

    @property
    def n_leaves(self) -> int:
        return self._n_leaves

    # -- derivation -------------------------------------------------------------------------------------------

    def _key_nonce(self, secret: bytes, generation: int) -> KeyNonce:
        """`ratchet_key_nonce` with the KDFLabel heads precomputed."""
        return KeyNonce(generation, *self._key_and_nonce(secret, generation))

    def _key_and_nonce(self, secret: bytes, generation: int) -> tuple[bytes, bytes]:
        context = generation.to_bytes(4, "big")
        expand = self._cs.kdf_expand
        return (expand(secret, self._key_head + context, self._key_len),
                expand(secret, self._nonce_head + context, self._nonce_len))

    def _next_secret(self, secret: bytes, generation: int) -> bytes:
        """`ratchet_next` with the KDFLabel head precomputed."""
        return self._cs.kdf_expand(secret, self._secret_head + generation.to_bytes(4, "big"), self._hash_len)

    def _leaf_secret_pure(self, leaf: LeafIndex) -> tuple[bytes, list[NodeIndex]]:
        """The leaf's node secret, derived from the nearest stored ancestor without storing anything."""
        target = tm.leaf_to_node(leaf)
        path = [target, *tm.direct_path(target, self._n_leaves)]
        for i, node in enumerate(path):
            secret = self._nodes.get(node)
            if secret is None:
                continue
            for child in reversed(path[:i]):
                parent = tm.parent(child, self._n_leaves)
                side = b"left" if child < parent else b"right"
                secret = expand_with_label(self._cs, secret, b"tree", side, self._cs.hash_len)
            return secret, path[:i + 1]
        raise MlsReplayError(f"the secrets of leaf {leaf} were already consumed in this epoch")

    def _materialise(self, leaf: LeafIndex) -> None:
        """Create the two ratchets of a leaf, deleting every node secret used on the way down."""
        target = tm.leaf_to_node(leaf)
        _, used = self._leaf_secret_pure(leaf)
        node = used[-1]
        while node != target:
            secret = self._nodes.pop(node)
            lft, rgt = tm.left(node), tm.right(node)
            self._nodes[lft] = expand_with_label(self._cs, secret, b"tree", b"left", self._cs.hash_len)
            self._nodes[rgt] = expand_with_label(self._cs, secret, b"tree", b"right", self._cs.hash_len)
            node = lft if tm.is_in_subtree(target, lft) else rgt
        leaf_secret = self._nodes.pop(target)
        for rt, label in ((RatchetType.HANDSHAKE, b"handshake"), (RatchetType.APPLICATION, b"application")):
            self._ratchets[(leaf, rt)] = HashRatchet(expand_with_label(self._cs, leaf_secret, label, b"",
                                                                       self._cs.hash_len))

    def _ratchet_pure(self, leaf: LeafIndex, rt: RatchetType) -> HashRatchet:
        r = self._ratchets.get((leaf, rt))
        if r is not None:
            return r
        leaf_secret, _ = self._leaf_secret_pure(leaf)
        label = b"handshake" if rt == RatchetType.HANDSHAKE else b"application"
        return HashRatchet(expand_with_label(self._cs, leaf_secret, label, b"", self._cs.hash_len))

    def _check_leaf(self, leaf: LeafIndex) -> None:
        if not 0 <= leaf < self._n_leaves:
            raise MlsError(f"leaf {leaf} outside a tree of {self._n_leaves} leaves")

    # -- public API -------------------------------------------------------------------------------------------

    def key_for(self, leaf: LeafIndex, rt: RatchetType, generation: int) -> KeyNonce:
        """The key and nonce a receiver needs for (leaf, type, generation); changes no state."""
        return KeyNonce(generation, *self.key_and_nonce_for(leaf, rt, generation))

    def key_and_nonce_for(self, leaf: LeafIndex, rt: RatchetType, generation: int) -> tuple[bytes, bytes]:
        """`key_for` without the KeyNonce around it (the application-message path)."""
        self._check_leaf(leaf)
        r = self._ratchet_pure(leaf, rt)
        if generation < r.generation:
            kn = r.skipped.get(generation)
            if kn is None:
                raise MlsReplayError(
                    f"generation {generation} of leaf {leaf} was already used or is older than the out-of-order window"
                )
            return kn.key, kn.nonce
        if generation - r.generation > self.max_forward:
            raise MlsError(f"generation {generation} is more than {self.max_forward} ahead of {r.generation}")
        secret, g = r.secret, r.generation
        while g < generation:
            secret = self._next_secret(secret, g)
            g += 1
        return self._key_and_nonce(secret, generation)

    def _ratchet(self, leaf: LeafIndex, rt: RatchetType) -> HashRatchet:
        """The ratchet of (leaf, type), created (and the node secrets above it deleted) on first use."""
        r = self._ratchets.get((leaf, rt))
        if r is None:
            self._materialise(leaf)
            r = self._ratchets[(leaf, rt)]
        return r

    def _advance(self, r: HashRatchet) -> None:
        """Replace the ratchet's secret by the next one and drop skipped keys that fell out of the window."""
        r.secret = self._next_secret(r.secret, r.generation)
        r.generation += 1
        if r.skipped:
            floor = r.generation - self.out_of_order_window
            for g in [g for g in r.skipped if g < floor]:
                del r.skipped[g]

    def consume(self, leaf: LeafIndex, rt: RatchetType, generation: int) -> None:
        """Delete the key of `generation` and advance past it, keeping skipped keys within the window."""
        self._check_leaf(leaf)
        r = self._ratchet(leaf, rt)
        if generation < r.generation:
            if r.skipped.pop(generation, None) is None:
                raise MlsReplayError(f"generation {generation} of leaf {leaf} was already used")
            return
        if generation - r.generation > self.max_forward:
            raise MlsError(f"generation {generation} is more than {self.max_forward} ahead of {r.generation}")
        if generation > r.generation:
            keep_from = generation + 1 - self.out_of_order_window  # the same floor as `_advance` applies
            while r.generation < generation:
                if r.generation >= keep_from:
                    r.skipped[r.generation] = self._key_nonce(r.secret, r.generation)
                r.secret = self._next_secret(r.secret, r.generation)
                r.generation += 1
        self._advance(r)

    def next_for_sending(self, leaf: LeafIndex, rt: RatchetType) -> KeyNonce:
        """The key of this member's next generation; the key is deleted from the tree as it is returned."""
        return KeyNonce(*self.next_key_and_nonce_for_sending(leaf, rt))

    def next_key_and_nonce_for_sending(self, leaf: LeafIndex, rt: RatchetType) -> tuple[int, bytes, bytes]:
        """`next_for_sending` as (generation, key, nonce), without the KeyNonce around it."""
        self._check_leaf(leaf)
        r = self._ratchet(leaf, rt)
        generation = r.generation
        key, nonce = self._key_and_nonce(r.secret, generation)
        self._advance(r)  # `consume(leaf, rt, generation)`: the key of the ratchet's own generation
        return generation, key, nonce

    # -- persistence ------------------------------------------------------------------------------------------

    def encode(self, w: Writer) -> None:
        """The live secrets (remaining node secrets, ratchets, skipped keys); store it encrypted."""
        w.u32(self._n_leaves).u32(self.out_of_order_window).u32(self.max_forward)
        w.vector(sorted(self._nodes.items()), lambda w2, kv: w2.u32(kv[0]).opaque(kv[1]))

        def put_ratchet(w2: Writer, item: tuple[tuple[LeafIndex, RatchetType], HashRatchet]) -> None:
            (leaf, rt), r = item
            w2.u32(leaf).u8(rt).opaque(r.secret).u32(r.generation)
            w2.vector(sorted(r.skipped.values(), key=lambda k: k.generation),
                      lambda w3, kn: w3.u32(kn.generation).opaque(kn.key).opaque(kn.nonce))

        w.vector(sorted(self._ratchets.items()), put_ratchet)

    @classmethod
    def decode(cls, cs: CipherSuite, r: Reader) -> SecretTree:
        n_leaves, window, max_forward = r.u32(), r.u32(), r.u32()
        if n_leaves == 0 or n_leaves & (n_leaves - 1):
            raise MlsDecodeError(f"secret tree leaf count {n_leaves} is not a power of two")
        t = cls(cs, b"", n_leaves, out_of_order_window=window, max_forward=max_forward)
        width = tm.node_width(n_leaves)
        t._nodes = {}
        node_items = r.vector(lambda r2: (r2.u32(), r2.opaque()))
        strictly_increasing([n for n, _ in node_items], "secret tree nodes")
        for node, secret in node_items:
            if node >= width:
                raise MlsDecodeError(f"secret tree node {node} outside the tree")
            t._nodes[NodeIndex(node)] = secret

        def get_ratchet(r2: Reader) -> tuple[tuple[LeafIndex, RatchetType], HashRatchet]:
            leaf, rt_raw, secret, gen = r2.u32(), r2.u8(), r2.opaque(), r2.u32()
            if leaf >= n_leaves or rt_raw > 1:
                raise MlsDecodeError("secret tree ratchet names a leaf outside the tree or an unknown type")
            kns = r2.vector(lambda r3: KeyNonce(r3.u32(), r3.opaque(), r3.opaque()))
            strictly_increasing([kn.generation for kn in kns], "skipped keys")
            skipped = {kn.generation: kn for kn in kns}
            return (LeafIndex(leaf), RatchetType(rt_raw)), HashRatchet(secret, gen, skipped)

        ratchets = r.vector(get_ratchet)
        strictly_increasing([k for k, _ in ratchets], "ratchets")
        t._ratchets = dict(ratchets)
        return t

    def generation(self, leaf: LeafIndex, rt: RatchetType) -> int:
        """The next generation not yet used for (leaf, type)."""
        r = self._ratchets.get((leaf, rt))
        return 0 if r is None else r.generation


def sender_data_key_nonce(cs: CipherSuite, sender_data_secret: bytes, ciphertext: bytes) -> tuple[bytes, bytes]:
    """Key and nonce for SenderData, bound to the first Nh bytes of the content ciphertext (section 6.3.2)."""
    sample = ciphertext[: cs.hash_len]
    context = encode_varint(len(sample)) + sample  # ExpandWithLabel's context, encoded once for both
    key_len, nonce_len = cs.aead_key_len, cs.aead_nonce_len
    return (
        cs.kdf_expand(sender_data_secret, kdf_label_head(b"key", key_len) + context, key_len),
        cs.kdf_expand(sender_data_secret, kdf_label_head(b"nonce", nonce_len) + context, nonce_len),
    )
