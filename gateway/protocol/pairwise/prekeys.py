"""Prekeys: what a device publishes in the relay directory so others can open a session while it is offline.

`PrekeyBundle` is the public side (device id, credential, one signed X25519 prekey, any number of one-time
X25519 prekeys, each signed by the delegated Ed25519 key). It arrives from the relay, so it is unchecked until
`verify()` has run the credential callback and every signature. `PrekeyStore` is the private side the device
keeps in its encrypted store: it hands out private keys to session setup, forgets each one-time prekey once a
session has used it, and keeps a few retired signed prekeys so setups in flight during a rotation still work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from gateway.protocol.pairwise import codec
from gateway.protocol.pairwise.codec import Reader
from gateway.protocol.pairwise.crypto import (
    KEY_LEN,
    SIGNATURE_LEN,
    MessageSigner,
    RandomSource,
    Verifier,
    VerifyCredential,
    check_credential,
    check_sizes,
    check_u32,
    x25519_keypair,
    x25519_public,
)
from gateway.protocol.pairwise.errors import PairwiseDecodeError, PairwiseVerificationError, PrekeyError

BUNDLE_VERSION = 1
STORE_VERSION = 1
MAX_CREDENTIAL_LEN = 16384
MAX_ONE_TIME_PREKEYS = 1000
MAX_RETIRED_SIGNED_PREKEYS = 4
MAX_PREKEY_ID = 0xFFFFFFFF

_SPK_CONTEXT = b"agw pairwise v1 signed prekey\x00"
_OPK_CONTEXT = b"agw pairwise v1 one-time prekey\x00"


def signed_prekey_tbs(device_id: str, prekey_id: int, public_key: bytes, created_at_ms: int) -> bytes:
    """The bytes the delegated key signs for a signed prekey (documented in docs/protocol.md ("Pairwise"))."""
    return _SPK_CONTEXT + codec.text8(device_id) + codec.u32(prekey_id) + public_key + codec.u64(created_at_ms)


def one_time_prekey_tbs(device_id: str, prekey_id: int, public_key: bytes) -> bytes:
    return _OPK_CONTEXT + codec.text8(device_id) + codec.u32(prekey_id) + public_key


@dataclass(frozen=True, slots=True)
class SignedPrekey:
    prekey_id: int
    public_key: bytes
    created_at_ms: int
    signature: bytes

    def __post_init__(self) -> None:
        check_sizes("signed prekey", public_key=(self.public_key, KEY_LEN), signature=(self.signature, SIGNATURE_LEN))
        check_u32("signed prekey", prekey_id=self.prekey_id)
        if not 0 <= self.created_at_ms < 1 << 64:
            raise ValueError("signed prekey: created_at_ms must fit in 64 bits")


@dataclass(frozen=True, slots=True)
class OneTimePrekey:
    prekey_id: int
    public_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        check_sizes("one-time prekey", public_key=(self.public_key, KEY_LEN),
                    signature=(self.signature, SIGNATURE_LEN))
        check_u32("one-time prekey", prekey_id=self.prekey_id)


@dataclass(frozen=True, slots=True)
class PrekeyBundle:
    """A device's published prekeys. Unverified until `verify()`; `decode()` checks only the shape."""

    device_id: str
    credential: bytes
    signed_prekey: SignedPrekey
    one_time_prekeys: tuple[OneTimePrekey, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= len(self.credential) <= MAX_CREDENTIAL_LEN:
            raise ValueError(f"prekey bundle: credential must be 1..{MAX_CREDENTIAL_LEN} bytes")
        if len(self.one_time_prekeys) > MAX_ONE_TIME_PREKEYS:
            raise ValueError(f"prekey bundle: more than {MAX_ONE_TIME_PREKEYS} one-time prekeys")
        if not 1 <= len(self.device_id.encode()) <= 0xFF:
            raise ValueError("prekey bundle: device id must be 1..255 bytes of UTF-8")

    def encode(self) -> bytes:
        spk = self.signed_prekey
        parts = [
            codec.u8(BUNDLE_VERSION),
            codec.text8(self.device_id),
            codec.opaque16(self.credential),
            codec.u32(spk.prekey_id),
            spk.public_key,
            codec.u64(spk.created_at_ms),
            spk.signature,
            codec.u16(len(self.one_time_prekeys)),
        ]
        for opk in self.one_time_prekeys:
            parts += [codec.u32(opk.prekey_id), opk.public_key, opk.signature]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> PrekeyBundle:
        r = Reader(data, "prekey bundle")
        version = r.u8("version")
        if version != BUNDLE_VERSION:
            raise PairwiseDecodeError(f"prekey bundle: unsupported version {version} (expected {BUNDLE_VERSION})")
        device_id = r.text8("device id")
        credential = r.opaque16("credential", min_len=1, max_len=MAX_CREDENTIAL_LEN)
        spk = SignedPrekey(
            r.u32("signed prekey id"), r.fixed(KEY_LEN, "signed prekey"), r.u64("created at"),
            r.fixed(SIGNATURE_LEN, "signed prekey signature"),
        )
        count = r.u16("one-time prekey count")
        if count > MAX_ONE_TIME_PREKEYS:
            raise PairwiseDecodeError(f"prekey bundle: {count} one-time prekeys exceeds {MAX_ONE_TIME_PREKEYS}")
        opks = tuple(
            OneTimePrekey(r.u32("one-time prekey id"), r.fixed(KEY_LEN, "one-time prekey"),
                          r.fixed(SIGNATURE_LEN, "one-time prekey signature"))
            for _ in range(count)
        )
        r.done()
        return cls(device_id, credential, spk, opks)

    def verify(
        self,
        verify_credential: VerifyCredential,
        *,
        now_ms: int | None = None,
        max_signed_prekey_age_ms: int | None = None,
    ) -> Verifier:
        """Checks the credential and every prekey signature; returns the device's verify key.

        With `now_ms` and `max_signed_prekey_age_ms`, a signed prekey older than that (or from the future by
        more than that) is refused, so a directory replaying a stale bundle cannot pin a long-retired key.
        """
        verifier = check_credential(verify_credential, self.device_id, self.credential)
        spk = self.signed_prekey
        verifier.verify(
            signed_prekey_tbs(self.device_id, spk.prekey_id, spk.public_key, spk.created_at_ms),
            spk.signature,
            f"signed prekey {spk.prekey_id} of {self.device_id!r}",
        )
        if now_ms is not None and max_signed_prekey_age_ms is not None:
            if abs(now_ms - spk.created_at_ms) > max_signed_prekey_age_ms:
                raise PairwiseVerificationError(
                    f"signed prekey {spk.prekey_id} of {self.device_id!r} created at {spk.created_at_ms} ms is "
                    f"more than {max_signed_prekey_age_ms} ms away from now ({now_ms} ms); fetch a fresh bundle"
                )
        seen = {spk.prekey_id}
        for opk in self.one_time_prekeys:
            if opk.prekey_id in seen:
                raise PairwiseVerificationError(f"prekey bundle of {self.device_id!r}: duplicate id {opk.prekey_id}")
            seen.add(opk.prekey_id)
            verifier.verify(
                one_time_prekey_tbs(self.device_id, opk.prekey_id, opk.public_key),
                opk.signature,
                f"one-time prekey {opk.prekey_id} of {self.device_id!r}",
            )
        return verifier

    def with_one_time_prekeys(self, one_time_prekeys: tuple[OneTimePrekey, ...]) -> PrekeyBundle:
        """The same bundle with another set of one-time prekeys (a directory hands out one per fetch)."""
        return replace(self, one_time_prekeys=one_time_prekeys)


@dataclass(slots=True)
class _SignedPrekeySecret:
    prekey_id: int
    private_key: bytes = field(repr=False)
    public_key: bytes
    created_at_ms: int
    retired_at_ms: int  # 0 while current


class PrekeyStore:
    """The private halves of this device's prekeys. Serialise it with `encode()` into the encrypted store.

    Ids are allocated from one counter, never reused. One-time prekeys are handed out by `one_time_prekey()`
    and removed by `consume_one_time_prekey()` once a session built on it has been accepted, so a replayed
    setup message cannot rebuild that session.
    """

    __slots__ = ("_next_id", "_one_time", "_signed")

    def __init__(self, next_id: int, signed: list[_SignedPrekeySecret], one_time: dict[int, bytes]) -> None:
        self._next_id = next_id
        self._signed = signed  # current first, then retired ones, newest first
        self._one_time = one_time

    @classmethod
    def generate(cls, *, now_ms: int, one_time_count: int = 100, random: RandomSource = os.urandom) -> PrekeyStore:
        store = cls(1, [], {})
        store.rotate_signed_prekey(now_ms=now_ms, random=random)
        store.add_one_time_prekeys(one_time_count, random=random)
        return store

    def _allocate_id(self) -> int:
        if self._next_id > MAX_PREKEY_ID:
            raise PrekeyError("prekey id space exhausted; generate a new prekey store")
        pid = self._next_id
        self._next_id += 1
        return pid

    def rotate_signed_prekey(self, *, now_ms: int, random: RandomSource = os.urandom) -> int:
        """Makes a new current signed prekey; the old one is kept (retired) for setups still in flight."""
        if self._signed:
            self._signed[0].retired_at_ms = max(now_ms, 1)
        private, public = x25519_keypair(random)
        pid = self._allocate_id()
        self._signed.insert(0, _SignedPrekeySecret(pid, private, public, now_ms, 0))
        del self._signed[1 + MAX_RETIRED_SIGNED_PREKEYS :]
        return pid

    def prune_retired(self, *, now_ms: int, max_retired_age_ms: int) -> None:
        """Forgets signed prekeys retired longer ago than `max_retired_age_ms` (forward secrecy of setup)."""
        self._signed = [self._signed[0]] + [
            s for s in self._signed[1:] if now_ms - s.retired_at_ms <= max_retired_age_ms
        ]

    def add_one_time_prekeys(self, count: int, *, random: RandomSource = os.urandom) -> list[int]:
        if count < 0 or len(self._one_time) + count > MAX_ONE_TIME_PREKEYS:
            raise PrekeyError(f"cannot hold more than {MAX_ONE_TIME_PREKEYS} one-time prekeys")
        ids = []
        for _ in range(count):
            private, _public = x25519_keypair(random)
            pid = self._allocate_id()
            self._one_time[pid] = private
            ids.append(pid)
        return ids

    @property
    def one_time_count(self) -> int:
        return len(self._one_time)

    @property
    def current_signed_prekey_id(self) -> int:
        return self._signed[0].prekey_id

    def signed_prekey(self, prekey_id: int) -> tuple[bytes, bytes]:
        """(private, public) of a current or retired signed prekey."""
        for s in self._signed:
            if s.prekey_id == prekey_id:
                return s.private_key, s.public_key
        raise PrekeyError(f"signed prekey {prekey_id} unknown or rotated out; the peer must fetch a fresh bundle")

    def one_time_prekey(self, prekey_id: int) -> tuple[bytes, bytes]:
        """(private, public) without consuming it; see `consume_one_time_prekey`."""
        private = self._one_time.get(prekey_id)
        if private is None:
            raise PrekeyError(f"one-time prekey {prekey_id} unknown or already used; the setup may be a replay")
        return private, x25519_public(private)

    def consume_one_time_prekey(self, prekey_id: int) -> None:
        if self._one_time.pop(prekey_id, None) is None:
            raise PrekeyError(f"one-time prekey {prekey_id} unknown or already used")

    def bundle(
        self, *, device_id: str, credential: bytes, signer: MessageSigner, include_one_time: bool = True
    ) -> PrekeyBundle:
        """The public bundle to publish, signed now by the current delegated key."""
        cur = self._signed[0]
        spk = SignedPrekey(
            cur.prekey_id, cur.public_key, cur.created_at_ms,
            signer.sign(signed_prekey_tbs(device_id, cur.prekey_id, cur.public_key, cur.created_at_ms)),
        )
        opks: list[OneTimePrekey] = []
        if include_one_time:
            for pid, private in self._one_time.items():
                public = x25519_public(private)
                opks.append(OneTimePrekey(pid, public, signer.sign(one_time_prekey_tbs(device_id, pid, public))))
        return PrekeyBundle(device_id, credential, spk, tuple(opks))

    def encode(self) -> bytes:
        parts = [codec.u8(STORE_VERSION), codec.u64(self._next_id), codec.u8(len(self._signed))]
        for s in self._signed:
            parts += [codec.u32(s.prekey_id), s.private_key, codec.u64(s.created_at_ms), codec.u64(s.retired_at_ms)]
        parts.append(codec.u16(len(self._one_time)))
        for pid, private in self._one_time.items():
            parts += [codec.u32(pid), private]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> PrekeyStore:
        r = Reader(data, "prekey store")
        version = r.u8("version")
        if version != STORE_VERSION:
            raise PairwiseDecodeError(f"prekey store: unsupported version {version} (expected {STORE_VERSION})")
        next_id = r.u64("next id")
        n_signed = r.u8("signed prekey count")
        if not 1 <= n_signed <= 1 + MAX_RETIRED_SIGNED_PREKEYS:
            raise PairwiseDecodeError(f"prekey store: {n_signed} signed prekeys is not a valid count")
        signed = []
        for i in range(n_signed):
            pid, private = r.u32("signed prekey id"), r.fixed(KEY_LEN, "signed prekey")
            created, retired = r.u64("created at"), r.u64("retired at")
            if (retired == 0) != (i == 0):
                raise PairwiseDecodeError("prekey store: exactly the first signed prekey must be current")
            signed.append(_SignedPrekeySecret(pid, private, x25519_public(private), created, retired))
        n_one_time = r.u16("one-time prekey count")
        if n_one_time > MAX_ONE_TIME_PREKEYS:
            raise PairwiseDecodeError(f"prekey store: {n_one_time} one-time prekeys exceeds {MAX_ONE_TIME_PREKEYS}")
        one_time: dict[int, bytes] = {}
        for _ in range(n_one_time):
            pid = r.u32("one-time prekey id")
            one_time[pid] = r.fixed(KEY_LEN, "one-time prekey")
        r.done()
        ids = [s.prekey_id for s in signed] + list(one_time)
        if len(set(ids)) != len(ids) or len(one_time) != n_one_time or any(i >= next_id or i == 0 for i in ids):
            raise PairwiseDecodeError("prekey store: duplicate or out-of-range prekey ids")
        return cls(next_id, signed, one_time)

    def __repr__(self) -> str:
        return (
            f"PrekeyStore(signed={[s.prekey_id for s in self._signed]}, one_time={len(self._one_time)}, "
            f"next_id={self._next_id})"
        )
