"""The Double Ratchet (Signal specification, section 3) with X25519, HKDF-SHA256 and HMAC-SHA256 chains.

Receiving is two-phase so a message that fails authentication leaves the state untouched: `prepare_receive`
computes the message key and every state change into a `_ReceivePlan` without mutating anything, the caller
runs the AEAD, and only then `commit` applies the plan. A used message key is dropped at commit, so the state
never holds a key it has already used (forward secrecy); the DH ratchet step on each new peer key heals the
state after a compromise (post-compromise security). For the next message of the current receiving chain (nearly
every message of a batch) `next_in_chain` / `commit_next` are the same two phases without the plan object.

Skipped message keys (for out-of-order delivery) are bounded twice: a single message may skip at most
`max_skip` keys in one chain (else `TooManySkippedError`, state unchanged), and the session stores at most
`max_skipped_total`, evicting the oldest first. An evicted key's message then fails as `PairwiseReplayError`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field

from gateway.protocol.pairwise import codec
from gateway.protocol.pairwise.codec import Reader
from gateway.protocol.pairwise.crypto import (
    KEY_LEN,
    RandomSource,
    dh,
    kdf_ck,
    kdf_rk,
    wipe,
    x25519_keypair,
    x25519_public,
)
from gateway.protocol.pairwise.errors import (
    PairwiseDecodeError,
    PairwiseReplayError,
    SessionExhaustedError,
    TooManySkippedError,
    UnexpectedMessageError,
)

DEFAULT_MAX_SKIP = 1000
DEFAULT_MAX_SKIPPED_TOTAL = 2000
MAX_COUNTER = 0xFFFFFFFF
PREVIOUS_PEER_KEYS = 16  # old peer ratchet keys remembered, so a replay into a closed chain reads as a replay

SkippedKey = tuple[bytes, int]  # (peer ratchet public key, message number)


@dataclass(slots=True)
class _ReceivePlan:
    """The outcome of receiving one message, applied only once its AEAD tag has verified."""

    message_key: bytes = field(repr=False)
    used_skipped: SkippedKey | None = None
    new_skipped: list[tuple[SkippedKey, bytes]] = field(default_factory=list, repr=False)
    # Set when the message starts a new peer chain (a DH ratchet step):
    dh_step: bool = False
    root_key: bytes = field(default=b"", repr=False)
    dhs_private: bytes = field(default=b"", repr=False)
    dhs_public: bytes = b""
    dhr: bytes = b""
    cks: bytes = field(default=b"", repr=False)
    # Always set unless a skipped key was used:
    ckr: bytes = field(default=b"", repr=False)
    nr: int = 0


class RatchetState:
    """One side's Double Ratchet state. Not thread-safe; one owner at a time."""

    __slots__ = (
        "_ckr", "_cks", "_dhr", "_dhs_private", "_dhs_public", "_nr", "_ns", "_pn", "_previous_dhr", "_root",
        "_skipped", "max_skip", "max_skipped_total",
    )

    def __init__(
        self,
        *,
        root_key: bytes,
        dhs_private: bytes,
        dhr: bytes | None,
        cks: bytes | None,
        ckr: bytes | None,
        ns: int = 0,
        nr: int = 0,
        pn: int = 0,
        previous_dhr: list[bytes] | None = None,
        skipped: OrderedDict[SkippedKey, bytes] | None = None,
        max_skip: int = DEFAULT_MAX_SKIP,
        max_skipped_total: int = DEFAULT_MAX_SKIPPED_TOTAL,
    ) -> None:
        if not 0 <= max_skip <= max_skipped_total <= 0xFFFFFFFF:
            raise ValueError("need 0 <= max_skip <= max_skipped_total < 2**32")
        self._root = root_key
        self._dhs_private = dhs_private
        self._dhs_public = x25519_public(dhs_private)
        self._dhr = dhr
        self._cks = cks
        self._ckr = ckr
        self._ns = ns
        self._nr = nr
        self._pn = pn
        self._previous_dhr = previous_dhr if previous_dhr is not None else []
        self._skipped: OrderedDict[SkippedKey, bytes] = skipped if skipped is not None else OrderedDict()
        self.max_skip = max_skip
        self.max_skipped_total = max_skipped_total

    @classmethod
    def for_initiator(
        cls, shared_key: bytes, peer_ratchet_key: bytes, *, random: RandomSource = os.urandom,
        max_skip: int = DEFAULT_MAX_SKIP, max_skipped_total: int = DEFAULT_MAX_SKIPPED_TOTAL,
    ) -> RatchetState:
        """The initiator sends first: it ratchets against the responder's signed prekey straight away."""
        private, _public = x25519_keypair(random)
        root, cks = kdf_rk(shared_key, dh(private, peer_ratchet_key))
        return cls(root_key=root, dhs_private=private, dhr=peer_ratchet_key, cks=cks, ckr=None,
                   max_skip=max_skip, max_skipped_total=max_skipped_total)

    @classmethod
    def for_responder(
        cls, shared_key: bytes, own_ratchet_private: bytes, *,
        max_skip: int = DEFAULT_MAX_SKIP, max_skipped_total: int = DEFAULT_MAX_SKIPPED_TOTAL,
    ) -> RatchetState:
        """The responder's first ratchet key is its signed prekey; the first receive replaces it at once."""
        return cls(root_key=shared_key, dhs_private=own_ratchet_private, dhr=None, cks=None, ckr=None,
                   max_skip=max_skip, max_skipped_total=max_skipped_total)

    # -- sending ----------------------------------------------------------------------------------------------

    def next_send(self) -> tuple[bytes, int, int, bytes]:
        """Advances the sending chain: (our ratchet public key, previous chain length, number, message key)."""
        if self._cks is None:
            raise UnexpectedMessageError("this session cannot send before it has received the peer's first message")
        if self._ns >= MAX_COUNTER:
            raise SessionExhaustedError("sending chain exhausted (2**32 messages without a reply); start a new session")
        self._cks, mk = kdf_ck(self._cks)
        n = self._ns
        self._ns += 1
        return self._dhs_public, self._pn, n, mk

    def next_send_many(self, count: int) -> tuple[bytes, int, int, list[bytes]]:
        """`count` calls of `next_send` in one (a batch): (our ratchet public key, previous chain length, number of
        the first, the message keys in order). The same keys and state, and the same error at the same message
        (the chain advanced up to it, as by the single calls)."""
        if self._cks is None:
            raise UnexpectedMessageError("this session cannot send before it has received the peer's first message")
        ck, first = self._cks, self._ns
        keys: list[bytes] = []
        try:
            for n in range(first, first + count):
                if n >= MAX_COUNTER:
                    raise SessionExhaustedError(
                        "sending chain exhausted (2**32 messages without a reply); start a new session")
                ck, mk = kdf_ck(ck)
                keys.append(mk)
        except BaseException:
            for mk in keys:  # (never handed out: overwritten, as a used one would be)
                wipe(mk)
            raise
        finally:
            self._cks, self._ns = ck, first + len(keys)
        return self._dhs_public, self._pn, first, keys

    # -- receiving --------------------------------------------------------------------------------------------

    def prepare_receive(
        self, dh_public: bytes, pn: int, n: int, *, random: RandomSource = os.urandom
    ) -> _ReceivePlan:
        """Computes the message key for a header without changing the state; see `commit`."""
        if n >= MAX_COUNTER:  # a sender stops at MAX_COUNTER - 1 (SessionExhaustedError)
            raise UnexpectedMessageError(f"message number {n} is beyond what a sender may use")
        skipped_key = (dh_public, n)
        mk = self._skipped.get(skipped_key)
        if mk is not None:
            return _ReceivePlan(message_key=mk, used_skipped=skipped_key)
        plan = _ReceivePlan(message_key=b"")
        if dh_public == self._dhr:
            if self._ckr is None:  # the initiator's dhr is the responder's signed prekey until the first reply
                raise UnexpectedMessageError("no receiving chain for this ratchet key")
            if n < self._nr:
                raise PairwiseReplayError(f"message {n} of the current chain was already received or evicted")
            ckr, nr = self._ckr, self._nr
        else:
            if dh_public in self._previous_dhr:
                raise PairwiseReplayError("message belongs to a closed chain and its key is no longer held")
            if self._ckr is not None and self._dhr is not None:
                self._check_skip(self._nr, pn)
                ck = self._ckr
                for i in range(self._nr, pn):
                    ck, skipped_mk = kdf_ck(ck)
                    plan.new_skipped.append(((self._dhr, i), skipped_mk))
            root, ckr = kdf_rk(self._root, dh(self._dhs_private, dh_public))
            private, public = x25519_keypair(random)
            plan.root_key, plan.cks = kdf_rk(root, dh(private, dh_public))
            plan.dh_step, plan.dhs_private, plan.dhs_public, plan.dhr = True, private, public, dh_public
            nr = 0
        self._check_skip(nr, n)
        for i in range(nr, n):
            ckr, skipped_mk = kdf_ck(ckr)
            plan.new_skipped.append(((dh_public, i), skipped_mk))
        plan.ckr, plan.message_key = kdf_ck(ckr)
        plan.nr = n + 1
        return plan

    def next_in_chain(self, dh_public: bytes, n: int) -> tuple[bytes, bytes] | None:
        """`prepare_receive` for the common case, without a plan: the message is the next one of the current
        receiving chain (its key is the chain's, its number the next) and no skipped key is held for it. Returns
        (the chain key after it, its message key), the plan's `ckr` and `message_key`, without changing the state;
        `commit_next` applies it once the AEAD has verified. None for anything else (a skipped key, a gap, a
        replay, a new chain, a number past the limit, no receiving chain): `prepare_receive` then decides."""
        if n != self._nr or dh_public != self._dhr or self._ckr is None or n >= MAX_COUNTER or (
                self._skipped and (dh_public, n) in self._skipped):
            return None
        return kdf_ck(self._ckr)

    def commit_next(self, ckr: bytes, message_key: bytes) -> None:
        """`commit` of the plan `next_in_chain` stands for: the used message key overwritten, the chain advanced
        by one (no skipped keys added, no DH step)."""
        wipe(message_key)
        skipped = self._skipped
        while len(skipped) > self.max_skipped_total:  # (as `commit`: a lowered limit evicts at the next receive)
            skipped.popitem(last=False)
        self._ckr = ckr
        self._nr += 1

    def _check_skip(self, nr: int, until: int) -> None:
        if until - nr > self.max_skip:
            raise TooManySkippedError(
                f"message would skip {until - nr} keys in one chain, more than the limit of {self.max_skip}"
            )

    def commit(self, plan: _ReceivePlan) -> None:
        """Applies a plan whose message has authenticated. The used message key is not kept anywhere: call it
        after the AEAD, when the key is no longer needed; its bytes are overwritten (`crypto.wipe`)."""
        if plan.used_skipped is not None:
            del self._skipped[plan.used_skipped]
            wipe(plan.message_key)
            return
        wipe(plan.message_key)
        for key, mk in plan.new_skipped:
            self._skipped[key] = mk
        while len(self._skipped) > self.max_skipped_total:
            self._skipped.popitem(last=False)
        if plan.dh_step:
            if self._dhr is not None:
                self._previous_dhr.append(self._dhr)
                del self._previous_dhr[:-PREVIOUS_PEER_KEYS]
            self._pn = self._ns
            self._ns = 0
            self._dhr = plan.dhr
            self._root = plan.root_key
            self._dhs_private, self._dhs_public = plan.dhs_private, plan.dhs_public
            self._cks = plan.cks
        self._ckr = plan.ckr
        self._nr = plan.nr

    # -- inspection (tests, metrics) --------------------------------------------------------------------------

    @property
    def skipped_count(self) -> int:
        return len(self._skipped)

    def holds_message_key(self, message_key: bytes) -> bool:
        """Whether the state still holds this message key (tests of forward secrecy use it)."""
        return message_key in self._skipped.values()

    @property
    def can_send(self) -> bool:
        return self._cks is not None

    # -- persistence ------------------------------------------------------------------------------------------

    def encode(self) -> bytes:
        parts = [
            self._root, self._dhs_private, _optional_key(self._dhr), _optional_key(self._cks),
            _optional_key(self._ckr), codec.u32(self._ns), codec.u32(self._nr), codec.u32(self._pn),
            codec.u32(self.max_skip), codec.u32(self.max_skipped_total), codec.u8(len(self._previous_dhr)),
            *self._previous_dhr, codec.u32(len(self._skipped)),
        ]
        for (dh_public, n), mk in self._skipped.items():
            parts += [dh_public, codec.u32(n), mk]
        return b"".join(parts)

    @classmethod
    def read(cls, r: Reader) -> RatchetState:
        root = r.fixed(KEY_LEN, "root key")
        dhs_private = r.fixed(KEY_LEN, "ratchet private key")
        dhr = _read_optional_key(r, "peer ratchet key")
        cks = _read_optional_key(r, "sending chain key")
        ckr = _read_optional_key(r, "receiving chain key")
        ns, nr, pn = r.u32("ns"), r.u32("nr"), r.u32("pn")
        max_skip, max_total = r.u32("max skip"), r.u32("max skipped total")
        if max_skip > max_total:
            raise PairwiseDecodeError("session state: max skip exceeds max skipped total")
        if ckr is not None and dhr is None:
            raise PairwiseDecodeError("session state: a receiving chain without a peer ratchet key")
        n_prev = r.u8("previous peer key count")
        if n_prev > PREVIOUS_PEER_KEYS:
            raise PairwiseDecodeError(f"session state: {n_prev} previous peer keys exceeds {PREVIOUS_PEER_KEYS}")
        previous = [r.fixed(KEY_LEN, "previous peer key") for _ in range(n_prev)]
        n_skipped = r.u32("skipped key count")
        if n_skipped > max_total:
            raise PairwiseDecodeError(f"session state: {n_skipped} skipped keys exceeds the limit of {max_total}")
        skipped: OrderedDict[SkippedKey, bytes] = OrderedDict()
        for _ in range(n_skipped):
            key = (r.fixed(KEY_LEN, "skipped key ratchet key"), r.u32("skipped key number"))
            skipped[key] = r.fixed(KEY_LEN, "skipped message key")
        if len(skipped) != n_skipped:
            raise PairwiseDecodeError("session state: duplicate skipped keys")
        return cls(root_key=root, dhs_private=dhs_private, dhr=dhr, cks=cks, ckr=ckr, ns=ns, nr=nr, pn=pn,
                   previous_dhr=previous, skipped=skipped, max_skip=max_skip, max_skipped_total=max_total)

    def __repr__(self) -> str:
        return f"RatchetState(ns={self._ns}, nr={self._nr}, pn={self._pn}, skipped={len(self._skipped)})"


def _optional_key(key: bytes | None) -> bytes:
    return b"\x00" if key is None else b"\x01" + key


def _read_optional_key(r: Reader, what: str) -> bytes | None:
    return r.fixed(KEY_LEN, what) if r.flag(f"{what} present") else None
