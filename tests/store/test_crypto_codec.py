"""Record sealing, blind indexes and the record codec, below the SQL layer."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.store.codec import canonical_json, pack, unpack
from gateway.store.crypto import Keyring
from gateway.store.errors import InvalidRecord, StoreCorrupt

fields = st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.binary(max_size=64), st.text(max_size=32)))


@settings(max_examples=200)
@given(fields)
def test_pack_unpack_round_trip(values: list[bytes | str | int | None]) -> None:
    assert unpack(pack(values)) == tuple(values)


def test_pack_rejects_bool_and_unknown_types() -> None:
    with pytest.raises(InvalidRecord):
        pack([True])
    with pytest.raises(InvalidRecord):
        pack([1.5])  # type: ignore[list-item]


def test_unpack_truncated_is_corrupt() -> None:
    with pytest.raises(StoreCorrupt):
        unpack(pack([b"abcdef"])[:-1])
    with pytest.raises(StoreCorrupt):
        unpack(b"\x09")


def test_canonical_json_is_sorted_and_compact() -> None:
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()
    with pytest.raises(InvalidRecord):
        canonical_json({"x": b"bytes"})
    with pytest.raises(InvalidRecord):
        canonical_json({"x": float("nan")})


def test_seal_binds_table_and_key() -> None:
    keys = Keyring(os.urandom(32))
    blob = keys.seal("outbox", b"k1", b"secret")
    assert keys.open("outbox", b"k1", blob) == b"secret"
    for table, k in (("outbox", b"k2"), ("sessions", b"k1")):
        with pytest.raises(StoreCorrupt):
            keys.open(table, k, blob)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(StoreCorrupt):
        keys.open("outbox", b"k1", bytes(flipped))
    with pytest.raises(StoreCorrupt):
        keys.open("outbox", b"k1", blob[:20])


def test_seal_uses_fresh_nonces() -> None:
    keys = Keyring(os.urandom(32))
    nonces = {keys.seal("t", b"k", b"same")[1:13] for _ in range(200)}
    assert len(nonces) == 200


def test_other_dek_cannot_open() -> None:
    blob = Keyring(os.urandom(32)).seal("t", b"k", b"v")
    with pytest.raises(StoreCorrupt):
        Keyring(os.urandom(32)).open("t", b"k", blob)


def test_blind_index_is_keyed_and_domain_separated() -> None:
    dek = os.urandom(32)
    a, b = Keyring(dek), Keyring(dek)
    assert a.blind("peers", "dev1") == b.blind("peers", "dev1")
    assert a.blind("peers", "dev1") != a.blind("sessions", "dev1")
    assert a.blind("peers", "dev1") != Keyring(os.urandom(32)).blind("peers", "dev1")
    assert len(a.blind("peers", "dev1")) == 16


def test_check_value_identifies_the_dek() -> None:
    dek = os.urandom(32)
    assert Keyring(dek).matches(Keyring(dek).check_value)
    assert not Keyring(os.urandom(32)).matches(Keyring(dek).check_value)
    assert "redacted" in repr(Keyring(dek))


def test_wrong_dek_length_is_corrupt() -> None:
    with pytest.raises(StoreCorrupt):
        Keyring(b"short")


def test_blind_is_the_documented_hmac_and_seal_the_documented_aad() -> None:
    """The fast paths (OpenSSL's HMAC object under the wrapper, the AD prefix built once per table) compute the
    documented values (gateway/store/README.md), so stores written before them still match."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from gateway.store.crypto import _subkey

    dek = os.urandom(32)
    keys = Keyring(dek)
    for domain, value in (("outbox.msg", os.urandom(16)), ("outbox.peer", "dev-b"), ("x", b"")):
        raw = value.encode() if isinstance(value, str) else value
        want = hmac.new(_subkey(dek, b"blind"), bytes([len(domain)]) + domain.encode() + raw, hashlib.sha256)
        assert keys.blind(domain, value) == keys.blind(domain, value) == want.digest()[:16]
    for table in ("outbox", "inbox", "outbox"):
        blob = keys.seal(table, b"row-key", b"value")
        ad = bytes([1, len(table)]) + table.encode() + b"row-key"
        assert AESGCM(_subkey(dek, b"record")).decrypt(blob[1:13], blob[13:], ad) == b"value"


class _Stream:
    """A stand-in for the nonce pool: hands out one fixed byte stream in order, so a batch seal and per-row
    seals can be given the same nonces."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


@pytest.mark.parametrize("n", [0, 1, 2, 341, 342, 600])
def test_seal_many_is_seal_per_row_with_the_same_nonces(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """`seal_many` (one nonce draw per batch) makes the bytes `seal` makes row by row from the same random bytes,
    across the pool's 4 KiB block (341 nonces), and every blob opens under its own key only."""
    import gateway.store.crypto as crypto

    keys = Keyring(os.urandom(32))
    stream = os.urandom(12 * n)
    row_keys = [os.urandom(16) for _ in range(n)]
    plains = [os.urandom(i % 50) for i in range(n)]
    monkeypatch.setattr(crypto, "_NONCES", _Stream(stream))
    batch = keys.seal_many("outbox", row_keys, plains)
    monkeypatch.setattr(crypto, "_NONCES", _Stream(stream))
    assert batch == [keys.seal("outbox", k, p) for k, p in zip(row_keys, plains, strict=True)]
    monkeypatch.undo()
    real = keys.seal_many("outbox", row_keys, plains)  # the real pool: a fresh nonce per row
    assert len({b[1:13] for b in real}) == n
    for k, p, blob in zip(row_keys, plains, real, strict=True):
        assert keys.open("outbox", k, blob) == p
    if n > 1:
        with pytest.raises(StoreCorrupt):
            keys.open("outbox", row_keys[1], real[0])


def test_seal_many_needs_a_key_per_plaintext() -> None:
    with pytest.raises(ValueError, match="one key per plaintext"):
        Keyring(os.urandom(32)).seal_many("outbox", [b"k"], [])


@pytest.mark.parametrize("n", [0, 1, 5])
def test_blind_many_is_blind_per_value_without_memo(n: int) -> None:
    """The same row keys as `blind(domain, v, memo=False)`, whether the domain's HMAC state exists yet or not."""
    values = [os.urandom(16) for _ in range(n)] + [b""] * min(n, 1)
    fresh, warm = Keyring(b"d" * 32), Keyring(b"d" * 32)
    warm.blind("outbox.msg", b"warm-up", memo=False)
    want = [Keyring(b"d" * 32).blind("outbox.msg", v, memo=False) for v in values]
    assert fresh.blind_many("outbox.msg", values) == want == warm.blind_many("outbox.msg", values)
    assert fresh.blind_many("other", values) != want or not values


class _CountingState:
    """Stands in for a domain's HMAC state in `Keyring._blind_domains`: counts the blind keys computed."""

    def __init__(self, real: object) -> None:
        self.real, self.copies = real, 0

    def copy(self) -> object:
        self.copies += 1
        return self.real.copy()  # type: ignore[attr-defined]


def test_blind_memo_finds_keys_used_again_soon_and_keeps_recurring_names() -> None:
    """Inbox names and message ids come again within ~1,000 new keys (stored, then published and deleted; seen,
    then marked); a name like a peer device recurs throughout. The memo computes each of them once (the memo
    before, 4,096 keys cleared when full, computed ~6% of such keys twice), a recurring name about once per
    generation, and the values stay the documented HMAC."""
    from gateway.store.crypto import BLIND_CACHE

    keys, plain = Keyring(b"k" * 32), Keyring(b"k" * 32)
    for domain, kind in (("inbox", str), ("delivered", bytes)):
        keys.blind(domain, kind())  # (makes the domain's state)
        keys.blind("peers", "dev-b")
        counting = keys._blind_domains[domain] = _CountingState(keys._blind_domains[domain])
        peers = keys._blind_domains["peers"] = _CountingState(keys._blind_domains["peers"])

        def value(i: int, kind: type = kind) -> str | bytes:
            return f"dev-a/{i:032x}" if kind is str else i.to_bytes(16, "big")

        lag = BLIND_CACHE - 24
        for i in range(12_000):
            assert keys.blind(domain, value(i)) == plain.blind(domain, value(i), memo=False)
            if i >= lag:
                assert keys.blind(domain, value(i - lag)) == plain.blind(domain, value(i - lag), memo=False)
            if i % 100 == 0:
                assert keys.blind("peers", "dev-b") == plain.blind("peers", "dev-b", memo=False)
        assert counting.copies == 12_000
        assert peers.copies <= 12_000 // BLIND_CACHE + 1  # a recurring name: once per generation at most


def test_blind_memo_holds_a_bounded_number_of_keys() -> None:
    """Two generations of `BLIND_CACHE` keys at most per memo (names, message ids): after many distinct inbox
    names the memo holds about 2,048 of them (it held up to 4,096, ~1 MB with their names, before)."""
    import gc
    import tracemalloc

    from gateway.store.crypto import BLIND_CACHE

    keys = Keyring(b"k" * 32)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(4095 + 4096):  # the old memo would hold 4,095 here
            keys.blind("inbox", f"bench-a/{i:064x}")
            keys.blind("delivered", i.to_bytes(16, "big"))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_name, per_id = 49 + 8 + 64 + 56 + 49 + 40, 49 + 16 + 56 + 49 + 40  # str, tuple key, value, dict slot
    assert held < 2 * 1024 * (per_name + per_id) * 1.15, held  # (the memo before: ~2 x 4,095 x that)
    assert BLIND_CACHE <= 1024


@settings(max_examples=200)
@given(st.text(max_size=40), st.binary(max_size=80))
def test_pack_name_value_is_pack_of_the_pair(name: str, value: bytes) -> None:
    from gateway.store.codec import pack_name_value

    assert pack_name_value(name, value) == pack((name, value))
    assert unpack(pack_name_value(name, value)) == (name, value)


def test_blind_names_is_blind_per_name_memoised_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same keys as `blind(domain, name)`, and the memo left as `blind` name after name would leave it (both
    generations, across their turnover), whether the domain's state exists yet or not; a memoised name is not
    computed again."""
    import gateway.store.crypto as crypto

    monkeypatch.setattr(crypto, "BLIND_CACHE", 5)
    one, many = Keyring(b"d" * 32), Keyring(b"d" * 32)
    assert many.blind_names("inbox", []) == []
    batches = [[f"dev-a/{i:04x}" for i in range(j, j + 4)] for j in range(0, 40, 3)]  # (overlapping)
    batches.append(["dev-a/0000", "dev-a/0000", "dev-b/x"])  # (a name twice in a batch)
    for names in batches:
        want = [one.blind("inbox", n) for n in names]
        assert many.blind_names("inbox", names) == want
        assert want == [Keyring(b"d" * 32).blind("inbox", n, memo=False) for n in names]
        assert many._blind_names == one._blind_names
    counting = many._blind_domains["inbox"] = _CountingState(many._blind_domains["inbox"])
    held = list(many._blind_names[0])[:2]
    assert many.blind_names("inbox", [n for _, n in held]) == [one.blind("inbox", n) for _, n in held]
    assert counting.copies == 0
    assert many.blind_names("sessions", ["dev-b"]) == [one.blind("sessions", "dev-b")]  # (a new domain)
