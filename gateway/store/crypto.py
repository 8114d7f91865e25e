"""Keys and record sealing for the store.

One random 32-byte data-encryption key (DEK) per store, kept on disk only wrapped by the hardware storage key.
Every purpose gets its own subkey from HKDF-SHA256 of the DEK, so a weakness in one use (say, blind indexes,
which are deterministic by design) says nothing about another:

- `record`: AES-256-GCM for every stored value. Nonce: 12 random bytes per write (from `os.urandom`, read in
  4 KiB blocks). Associated data: a format
  byte, the table name and the row key, so a ciphertext copied into another row or table fails to open.
- `audit`: HMAC-SHA256 chaining the audit log.
- `blind`: HMAC-SHA256 "blind indexes", so peer ids, message ids and secret names need not appear in the file
  while rows can still be found by them. Each table has its own domain: the same peer gets unrelated row keys in
  different tables.
- `check`: a MAC over a constant, stored in the meta table, proving an unwrapped DEK is this store's DEK.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.protocol.message import RandomPool

from .errors import StoreCorrupt

DEK_BYTES = 32
NONCE_BYTES = 12
BLIND_BYTES = 16
BLIND_CACHE = 1024  # memoised keys per generation; two generations each for names and for message ids (see `blind`)
MAC_BYTES = 32
RECORD_FORMAT = 1
_INFO_PREFIX = b"agw-store v1 "
_CHECK_LABEL = b"agw-store dek check"
_RECORD_FORMAT_BYTE = bytes([RECORD_FORMAT])
_NONCES = RandomPool()  # record nonces: random, one system call per 4 KiB of them


def new_dek() -> bytes:
    """A fresh random data-encryption key."""
    return os.urandom(DEK_BYTES)


def _subkey(dek: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO_PREFIX + purpose).derive(dek)


class Keyring:
    """The purpose subkeys derived from one DEK. Holds no reference to the DEK itself except for re-wrapping."""

    __slots__ = ("_aead", "_audit_key", "_blind_domains", "_blind_ids", "_blind_key", "_blind_names", "_check",
                 "_dek", "_seal_ad")

    def __init__(self, dek: bytes) -> None:
        if len(dek) != DEK_BYTES:
            raise StoreCorrupt(f"unwrapped data key has {len(dek)} bytes, expected {DEK_BYTES}: restore the store")
        self._dek = dek
        self._aead = AESGCM(_subkey(dek, b"record"))
        self._audit_key = _subkey(dek, b"audit")
        self._blind_key = _subkey(dek, b"blind")
        # Memoised blind keys, [current generation, previous generation] (see `blind`).
        self._blind_names: list[dict[tuple[str, bytes | str], bytes]] = [{}, {}]
        self._blind_ids: list[dict[tuple[str, bytes | str], bytes]] = [{}, {}]
        self._blind_domains: dict[str, Any] = {}  # domain -> HMAC state after its prefix (see `blind`)
        self._seal_ad: dict[str, bytes] = {}  # table -> the start of its records' associated data (see `_ad`)
        self._check = hmac.new(_subkey(dek, b"check"), _CHECK_LABEL, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "Keyring(<redacted>)"

    @property
    def dek(self) -> bytes:
        """The raw DEK, needed only to wrap it under a new storage key."""
        return self._dek

    @property
    def check_value(self) -> bytes:
        """Stored in meta at creation; compared on open to detect a wrong (but well-formed) unwrapped key."""
        return self._check

    def matches(self, stored_check: bytes) -> bool:
        return hmac.compare_digest(self._check, stored_check)

    # -- records -------------------------------------------------------------------------------------------------
    @staticmethod
    def _ad(table: str, key: bytes) -> bytes:
        t = table.encode()
        return bytes([RECORD_FORMAT, len(t)]) + t + key

    def seal(self, table: str, key: bytes, plaintext: bytes) -> bytes:
        """Encrypt one value bound to its row: `format || nonce || ciphertext || tag`."""
        nonce = _NONCES.take(NONCE_BYTES)
        ad = self._seal_ad.get(table)
        if ad is None:  # (the AD's table part is the same for every row of a table: built once)
            ad = self._seal_ad[table] = self._ad(table, b"")
        return _RECORD_FORMAT_BYTE + nonce + self._aead.encrypt(nonce, plaintext, ad + key)

    def seal_many(self, table: str, keys: list[bytes], plaintexts: list[bytes]) -> list[bytes]:
        """`seal` for each (key, plaintext) pair, byte for byte as `seal` builds them: the nonces in one draw
        from the pool (each still 12 random bytes of its own), the associated data's table part looked up once."""
        n = len(keys)
        if n != len(plaintexts):
            raise ValueError("seal_many needs one key per plaintext")
        ad = self._seal_ad.get(table)
        if ad is None:
            ad = self._seal_ad[table] = self._ad(table, b"")
        nonces = _NONCES.take(NONCE_BYTES * n)
        encrypt = self._aead.encrypt
        out = []
        pos = 0
        for key, plaintext in zip(keys, plaintexts, strict=True):
            nonce = nonces[pos:pos + NONCE_BYTES]
            pos += NONCE_BYTES
            out.append(b"".join((_RECORD_FORMAT_BYTE, nonce, encrypt(nonce, plaintext, ad + key))))
        return out

    def open(self, table: str, key: bytes, blob: bytes) -> bytes:
        """Decrypt a value sealed for exactly this (table, key); anything else raises `StoreCorrupt`."""
        if not isinstance(blob, bytes) or len(blob) < 1 + NONCE_BYTES + 16 or blob[0] != RECORD_FORMAT:
            raise StoreCorrupt(f"a record in table {table!r} is malformed: the file was damaged; restore a backup")
        try:
            return self._aead.decrypt(blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :], self._ad(table, key))
        except InvalidTag:
            raise StoreCorrupt(
                f"a record in table {table!r} failed authentication (modified, or moved from another row): "
                "the file was tampered with or damaged; restore a backup"
            ) from None

    # -- blind indexes and MACs ----------------------------------------------------------------------------------
    def blind(self, domain: str, value: bytes | str, *, memo: bool = True) -> bytes:
        """A deterministic, keyed row key for `value` within `domain` (a table or column name).

        Names (peer devices, agents, secret names) recur on every message, so their keys are memoised; message
        ids (bytes) and inbox entry names are looked up several times each within a short time (seen, then
        marked; stored, published, deleted at PUBCOMP), so the most recent ones are memoised too, the bytes apart
        from the strings. `memo=False`: the caller keeps the key itself (the outbox, for its rows' lifetime), not
        memoised here.

        Each memo is two generations of at most `BLIND_CACHE` keys: when the current one is full it becomes the
        previous one and the one before is dropped. So a key is found for at least `BLIND_CACHE` new keys after
        it was added (a recurring name is computed again about once per `BLIND_CACHE` new keys), and at most 2 x
        `BLIND_CACHE` keys (with their values) are held per memo. (Measured on a receiver under load: every inbox
        name and message id came again within 1,024 new keys; one memo of 4,096 keys cleared when full held ~1 MB
        at its fullest and computed ~6% of them twice.)
        """
        gens = self._blind_names if isinstance(value, str) else self._blind_ids
        cache = gens[0]
        if memo:
            key = (domain, value)
            cached = cache.get(key)
            if cached is not None:
                return cached
            cached = gens[1].get(key)
            if cached is not None:
                return cached
        raw = value.encode() if isinstance(value, str) else value
        base = self._blind_domains.get(domain)
        if base is None:  # HMAC state after the domain prefix, copied for each value (half the work of a new HMAC)
            d = domain.encode()
            mac = hmac.new(self._blind_key, bytes([len(d)]) + d, hashlib.sha256)
            # OpenSSL's HMAC object under the `hmac.HMAC` wrapper, when there is one: its copy/update/digest are
            # the same computation without the wrapper's Python layer (~0.8 against ~1.1 us per value).
            base = self._blind_domains[domain] = getattr(mac, "_hmac", None) or mac
        mac = base.copy()
        mac.update(raw)
        out = mac.digest()[:BLIND_BYTES]
        if not memo:
            return out
        if len(cache) >= BLIND_CACHE:
            gens[1], gens[0] = cache, {}
        gens[0][(domain, value)] = out
        return out

    def _domain_state(self, domain: str, first: bytes | str) -> Any:
        """The domain's HMAC state, made by blinding `first` (not memoised) if there is none yet."""
        base = self._blind_domains.get(domain)
        if base is None:
            self.blind(domain, first, memo=False)
            base = self._blind_domains[domain]
        return base

    def blind_many(self, domain: str, values: list[bytes]) -> list[bytes]:
        """`blind(domain, v, memo=False)` for each of `values` (bytes): the same keys, the domain's HMAC state
        looked up once for the batch."""
        if not values:
            return []
        base = self._domain_state(domain, values[0])
        out = []
        for raw in values:
            mac = base.copy()
            mac.update(raw)
            out.append(mac.digest()[:BLIND_BYTES])
        return out

    def blind_names(self, domain: str, names: list[str]) -> list[bytes]:
        """`blind(domain, name)` for each of `names` (str), memoised as `blind` memoises them (found in either
        generation, else computed and added to the current one, which turns over at `BLIND_CACHE` keys as there):
        the same keys, the domain's HMAC state and the memo looked up once for the batch, no tuple built twice
        per name. For a frame's new inbox entries, whose keys the deletes at PUBCOMP look up again."""
        if not names:
            return []
        gens = self._blind_names
        base = self._domain_state(domain, names[0])
        out = []
        for name in names:
            key = (domain, name)
            cached = gens[0].get(key)
            if cached is None:
                cached = gens[1].get(key)
                if cached is None:
                    mac = base.copy()
                    mac.update(name.encode())
                    cached = mac.digest()[:BLIND_BYTES]
                    if len(gens[0]) >= BLIND_CACHE:
                        gens[1], gens[0] = gens[0], {}
                    gens[0][key] = cached
            out.append(cached)
        return out

    def audit_mac(self, *parts: bytes) -> bytes:
        """HMAC-SHA256 under the audit subkey over the concatenation of `parts`."""
        mac = hmac.new(self._audit_key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.digest()
