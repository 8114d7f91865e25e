"""secret-tree.json: secret tree, per-sender ratchets and sender-data keys (RFC 9420 section 9), suites 1 and 3.

Format per entry: cipher_suite, encryption_secret, sender_data{sender_data_secret, ciphertext, key, nonce},
leaves[i][{generation, handshake_key, handshake_nonce, application_key, application_nonce}] for a tree of
len(leaves) leaves. Checks: sender-data key and nonce; every key and nonce, both looked up read-only by a
receiver and produced by the sender's own ratchet; then the behaviour the vectors cannot show: consumed keys
are refused as replays, out-of-order keys within the window work once, and a lookup changes no state.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocol.mls import crypto
from gateway.protocol.mls.errors import MlsError, MlsReplayError
from gateway.protocol.mls.secret_tree import RatchetType, SecretTree, sender_data_key_nonce
from gateway.protocol.mls.tree_math import LeafIndex

from .conftest import unhex, vector_params

HS, APP = RatchetType.HANDSHAKE, RatchetType.APPLICATION


@pytest.mark.parametrize("v", vector_params("secret-tree.json"))
def test_secret_tree_vector(v: dict[str, Any]) -> None:
    cs = crypto.get_suite(v["cipher_suite"])
    sd = v["sender_data"]
    key, nonce = sender_data_key_nonce(cs, unhex(sd["sender_data_secret"]), unhex(sd["ciphertext"]))
    assert (key, nonce) == (unhex(sd["key"]), unhex(sd["nonce"]))

    n = len(v["leaves"])
    receiver = SecretTree(cs, unhex(v["encryption_secret"]), n)
    sender = SecretTree(cs, unhex(v["encryption_secret"]), n)
    for i, gens in enumerate(v["leaves"]):
        leaf = LeafIndex(i)
        for g in gens:
            gen = g["generation"]
            for rt, k, nn in ((HS, "handshake_key", "handshake_nonce"), (APP, "application_key", "application_nonce")):
                kn = receiver.key_for(leaf, rt, gen)
                assert (kn.key, kn.nonce) == (unhex(g[k]), unhex(g[nn]))
                receiver.consume(leaf, rt, gen)
                while sender.generation(leaf, rt) < gen:
                    sender.next_for_sending(leaf, rt)
                sent = sender.next_for_sending(leaf, rt)
                assert (sent.generation, sent.key, sent.nonce) == (gen, unhex(g[k]), unhex(g[nn]))
                with pytest.raises(MlsReplayError):
                    receiver.key_for(leaf, rt, gen)


def _tree(window: int = 4, max_forward: int = 50) -> SecretTree:
    return SecretTree(crypto.get_suite(1), b"\x07" * 32, 4, out_of_order_window=window, max_forward=max_forward)


def test_replay_of_consumed_generation_is_refused() -> None:
    t = _tree()
    t.key_for(LeafIndex(1), APP, 0)
    t.consume(LeafIndex(1), APP, 0)
    with pytest.raises(MlsReplayError):
        t.key_for(LeafIndex(1), APP, 0)
    with pytest.raises(MlsReplayError):
        t.consume(LeafIndex(1), APP, 0)


def test_out_of_order_within_window_then_replay_refused() -> None:
    t, ref = _tree(), _tree()
    leaf = LeafIndex(2)
    want = [ref.next_for_sending(leaf, APP) for _ in range(6)]
    t.consume(leaf, APP, 5)
    for g in (4, 3, 2):  # within the window of 4 below generation 6
        assert t.key_for(leaf, APP, g).key == want[g].key
        t.consume(leaf, APP, g)
        with pytest.raises(MlsReplayError):
            t.key_for(leaf, APP, g)
    with pytest.raises(MlsReplayError):  # older than the window: its key was never kept
        t.key_for(leaf, APP, 1)


def test_too_far_ahead_is_refused() -> None:
    t = _tree(max_forward=10)
    t.key_for(LeafIndex(0), HS, 10)
    with pytest.raises(MlsError):
        t.key_for(LeafIndex(0), HS, 11)
    with pytest.raises(MlsError):
        t.key_for(LeafIndex(4), HS, 0)


def test_lookup_changes_no_state() -> None:
    t = _tree()
    before = repr(t), t.generation(LeafIndex(3), HS)
    t.key_for(LeafIndex(3), HS, 7)
    assert (repr(t), t.generation(LeafIndex(3), HS)) == before
    assert t.key_for(LeafIndex(3), HS, 0) == _tree().next_for_sending(LeafIndex(3), HS)


def test_node_secrets_are_deleted_once_used() -> None:
    t = _tree()
    t.next_for_sending(LeafIndex(0), APP)
    # Root and its left child gave way to their children; leaf 0's own secret became its two ratchets.
    assert "live_nodes=2" in repr(t)


def test_skipped_keys_leave_the_window_as_later_generations_are_consumed() -> None:
    t, ref = _tree(), _tree()
    leaf = LeafIndex(1)
    want = [ref.next_for_sending(leaf, APP) for _ in range(12)]
    t.consume(leaf, APP, 3)  # keeps the keys of 0, 1 and 2 (window 4)
    assert t.key_for(leaf, APP, 1) == want[1]
    for g in range(4, 6):  # consumed in order: generation 6 next, floor 2, so 0 and 1 are deleted
        t.consume(leaf, APP, g)
    assert t.key_for(leaf, APP, 2) == want[2]
    for g in (0, 1):
        with pytest.raises(MlsReplayError):
            t.key_for(leaf, APP, g)
    t.consume(leaf, APP, 6)  # floor 3: the key of 2 goes as well, with no gap in between
    with pytest.raises(MlsReplayError):
        t.key_for(leaf, APP, 2)
    assert t.generation(leaf, APP) == 7
