"""How the sender cuts a peer's due outbox entries into signed v2 batches (gateway/sending.py `_chunks`)."""

from __future__ import annotations

from types import SimpleNamespace

from gateway.protocol.pairwise.batch import ITEM_OVERHEAD
from gateway.sending import BATCH_BYTES, BATCH_MESSAGES, _chunks


def _entries(*sizes: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(record=bytes(n), n=i) for i, n in enumerate(sizes)]


def test_batches_keep_order_and_respect_the_message_count() -> None:
    entries = _entries(*[100] * (2 * BATCH_MESSAGES + 7))
    chunks = _chunks(entries)
    assert [len(c) for c in chunks] == [BATCH_MESSAGES, BATCH_MESSAGES, 7]
    assert [e.n for c in chunks for e in c] == list(range(len(entries)))


def test_batches_respect_the_byte_budget() -> None:
    per = 1000 - ITEM_OVERHEAD
    chunks = _chunks(_entries(*[per] * 10), 3000)
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert all(sum(len(e.record) + ITEM_OVERHEAD for e in c) <= 3000 for c in chunks)
    assert BATCH_BYTES < 256 * 1024  # below the default envelope limit of relay and link


def test_a_message_larger_than_the_budget_goes_alone() -> None:
    chunks = _chunks(_entries(10, 5000, 10, 10), 1000)
    assert [[e.n for e in c] for c in chunks] == [[0], [1], [2, 3]]
