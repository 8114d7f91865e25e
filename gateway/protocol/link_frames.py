"""Relay link frames: the codec for the messages of docs/protocol.md ("Relay link"), with strict size limits.

One link frame is one WebSocket binary message: `version u8 (=1) | type u8 | body`. Each frame type is a frozen
dataclass with `body()` (encode) and `read()` (decode from a bounded reader); `decode_frame()` rejects unknown
types, truncation, over-limit lengths and trailing bytes with a `FrameError`, and nothing else escapes it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from gateway.protocol.envelope import ENVELOPE_ID_SIZE, Envelope, EnvelopeError, check_device_id
from gateway.protocol.errors import DecodeError, ProtocolError

LINK_VERSION = 1
NONCE_SIZE = 32


class LinkError(ProtocolError):
    """The peer sent a malformed frame or a frame not allowed in the current state."""


class FrameError(LinkError, DecodeError):
    """A frame could not be decoded (truncated, trailing bytes, over a limit, unknown type)."""


class SpoofedSender(LinkError):
    """An envelope names a sender other than the device authenticated on this connection."""


class LinkUsageError(RuntimeError):
    """The local application called the link in the wrong state: a bug in the caller, not the peer's fault."""


class ErrorCode(enum.IntEnum):
    """Why a connection is being closed (ERROR frame)."""

    PROTOCOL = 1  # malformed frame or frame not allowed now
    SPOOFED_SENDER = 2
    AUTH_TIMEOUT = 3
    TOKEN_EXPIRED = 4
    REVOKED = 5
    REPLACED = 6  # the same device connected again
    IDLE = 7
    SHUTDOWN = 8
    INTERNAL = 9
    RATE_LIMITED = 10


class AuthFailCode(enum.IntEnum):
    """Why authentication failed (AUTH_FAIL frame). REVOKED and UNTRUSTED are not worth retrying."""

    INVALID_TOKEN = 1
    EXPIRED = 2
    REVOKED = 3
    UNTRUSTED = 4
    DEVICE_CHANGED = 5  # a refresh named another device
    UNAVAILABLE = 6  # the relay could not check the token right now


class UndeliverableReason(enum.IntEnum):
    """Why the relay could not pass envelopes on; the sender keeps them in its outbox."""

    OFFLINE = 1
    TOO_BIG = 2
    RATE_LIMITED = 3
    CONGESTED = 4  # the recipient is not reading fast enough (backpressure)


class DirectoryKind(enum.IntEnum):
    """Which kind of public key material a directory entry holds."""

    PREKEYS = 1  # pairwise signed prekey bundle + one-time prekeys
    KEY_PACKAGES = 2  # MLS KeyPackages (the bundle is unused, one-time entries are KeyPackages)


class GroupStatus(enum.IntEnum):
    """The Delivery Service's verdict on a GROUP_SEND (GROUP_RESULT frame)."""

    ACCEPTED = 0  # fanned out (devices it could not reach are listed)
    STALE_EPOCH = 1  # a commit lost: another commit was accepted for this epoch; process it, then retry
    MALFORMED = 2  # the message is not an MLSMessage whose cleartext header the relay can read
    TOO_BIG = 3
    RATE_LIMITED = 4


@dataclass(frozen=True, slots=True)
class LinkLimits:
    """Size limits applied by the decoder before reading; both ends should use the same values."""

    max_frame_size: int = 1024 * 1024
    max_envelopes_per_frame: int = 1024
    max_token_size: int = 16 * 1024
    max_text_size: int = 1024
    max_bundle_size: int = 16 * 1024
    max_one_time: int = 100
    max_one_time_size: int = 2048
    max_group_recipients: int = 1024


# ---------------------------------------------------------------------------------------------------- codec


class _Reader:
    """Reads exact sizes from a frame body; every shortfall is a FrameError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise FrameError(f"frame truncated in {what}")
        out = bytes(self.data[self.pos : end])
        self.pos = end
        return out

    def view(self, n: int, what: str) -> memoryview:
        """Like `take`, without the copy: for a field that is parsed (and copied) at once by the caller."""
        end = self.pos + n
        if end > len(self.data):
            raise FrameError(f"frame truncated in {what}")
        out = memoryview(self.data)[self.pos : end]
        self.pos = end
        return out

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def blob(self, len_size: int, limit: int, what: str) -> bytes:
        n = self.uint(len_size, f"{what} length")
        if n > limit:
            raise FrameError(f"{what} of {n} bytes exceeds the limit of {limit}")
        return self.take(n, what)

    def text(self, len_size: int, limit: int, what: str) -> str:
        try:
            return self.blob(len_size, limit, what).decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(f"{what} is not valid UTF-8") from None

    def device(self, what: str) -> str:
        try:
            return check_device_id(self.text(1, 64, what))
        except EnvelopeError as exc:
            raise FrameError(f"{what}: {exc}") from None

    def enum(self, cls: type[enum.IntEnum], size: int, what: str) -> int:
        value = self.uint(size, what)
        try:
            return cls(value)
        except ValueError:
            raise FrameError(f"unknown {what} {value}") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise FrameError(f"{len(self.data) - self.pos} trailing bytes after the frame")


def _blob(data: bytes, len_size: int) -> bytes:
    if len(data) >= 1 << (8 * len_size):
        raise LinkUsageError(f"field of {len(data)} bytes does not fit a {len_size}-byte length")
    return len(data).to_bytes(len_size, "big") + data


def _text(value: str, len_size: int) -> bytes:
    return _blob(value.encode("utf-8"), len_size)


@dataclass(frozen=True, slots=True)
class Challenge:
    TYPE: ClassVar[int] = 0x01
    nonce: bytes
    audience: str

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_SIZE:
            raise LinkUsageError(f"challenge nonce must be {NONCE_SIZE} bytes")

    def body(self) -> bytes:
        return self.nonce + _text(self.audience, 2)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> Challenge:
        return cls(r.take(NONCE_SIZE, "nonce"), r.text(2, lim.max_text_size, "audience"))


@dataclass(frozen=True, slots=True)
class Auth:
    TYPE: ClassVar[int] = 0x02
    token: str

    def body(self) -> bytes:
        return _text(self.token, 4)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> Auth:
        return cls(r.text(4, lim.max_token_size, "token"))


@dataclass(frozen=True, slots=True)
class AuthOk:
    TYPE: ClassVar[int] = 0x03
    device_id: str
    expires_at: int  # Unix seconds, from the token
    keepalive: int  # seconds: send something at least this often or be closed as idle

    def body(self) -> bytes:
        return _text(self.device_id, 1) + struct.pack("!QH", self.expires_at, self.keepalive)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> AuthOk:
        return cls(r.device("device id"), r.uint(8, "expiry"), r.uint(2, "keepalive"))


@dataclass(frozen=True, slots=True)
class AuthFail:
    TYPE: ClassVar[int] = 0x04
    code: AuthFailCode
    reason: str

    def body(self) -> bytes:
        return struct.pack("!H", self.code) + _text(self.reason, 2)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> AuthFail:
        return cls(AuthFailCode(r.enum(AuthFailCode, 2, "auth-fail code")), r.text(2, lim.max_text_size, "reason"))


@dataclass(frozen=True, slots=True)
class Refresh:
    TYPE: ClassVar[int] = 0x05

    def body(self) -> bytes:
        return b""

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> Refresh:
        return cls()


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[int] = 0x06

    def body(self) -> bytes:
        return b""

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> Ping:
        return cls()


def _envelopes_parts(envelopes: Sequence[Envelope]) -> list[bytes]:
    """The body of ENVELOPES / DELIVER as pieces that join into it: each envelope as its length and header, then
    its ciphertext as it is. Joined once (with the frame's header, `encode_frame`), a large ciphertext is copied
    once into the frame instead of four times (envelope, length prefix, body, frame); the bytes are the same."""
    parts = [struct.pack("!H", len(envelopes))]
    for env in envelopes:
        head = env.header()
        size = len(head) + len(env.ciphertext)
        if size >= 1 << 32:
            raise LinkUsageError(f"field of {size} bytes does not fit a 4-byte length")
        parts.append(size.to_bytes(4, "big") + head)
        parts.append(env.ciphertext)
    return parts


def _envelopes_body(envelopes: Sequence[Envelope]) -> bytes:
    return b"".join(_envelopes_parts(envelopes))


def _read_envelopes(r: _Reader, lim: LinkLimits) -> tuple[Envelope, ...]:
    count = r.uint(2, "envelope count")
    if count == 0 or count > lim.max_envelopes_per_frame:
        raise FrameError(f"envelope count {count} outside 1..{lim.max_envelopes_per_frame}")
    out = []
    for _ in range(count):
        n = r.uint(4, "envelope length")
        if n > lim.max_frame_size:
            raise FrameError(f"envelope of {n} bytes exceeds the limit of {lim.max_frame_size}")
        # a view, released here: Envelope.parse copies each field out, so the ciphertext is copied once, not twice
        with r.view(n, "envelope") as raw:
            try:
                out.append(Envelope.parse(raw, max_size=lim.max_frame_size))
            except EnvelopeError as exc:
                raise FrameError(f"bad envelope: {exc}") from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Envelopes:
    """Gateway to relay: envelopes to route (a batch)."""

    TYPE: ClassVar[int] = 0x10
    envelopes: tuple[Envelope, ...]

    def body(self) -> bytes:
        return _envelopes_body(self.envelopes)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> Envelopes:
        return cls(_read_envelopes(r, lim))


@dataclass(frozen=True, slots=True)
class Deliver:
    """Relay to gateway: envelopes addressed to this device (a batch)."""

    TYPE: ClassVar[int] = 0x11
    envelopes: tuple[Envelope, ...]

    def body(self) -> bytes:
        return _envelopes_body(self.envelopes)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> Deliver:
        return cls(_read_envelopes(r, lim))


@dataclass(frozen=True, slots=True)
class Undeliverable:
    TYPE: ClassVar[int] = 0x12
    reason: UndeliverableReason
    envelope_ids: tuple[bytes, ...]

    def body(self) -> bytes:
        return struct.pack("!BH", self.reason, len(self.envelope_ids)) + b"".join(self.envelope_ids)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> Undeliverable:
        reason = UndeliverableReason(r.enum(UndeliverableReason, 1, "undeliverable reason"))
        count = r.uint(2, "id count")
        if count == 0 or count > lim.max_envelopes_per_frame:
            raise FrameError(f"id count {count} outside 1..{lim.max_envelopes_per_frame}")
        return cls(reason, tuple(r.take(ENVELOPE_ID_SIZE, "envelope id") for _ in range(count)))


@dataclass(frozen=True, slots=True)
class PrekeysPublish:
    TYPE: ClassVar[int] = 0x20
    request_id: int
    kind: DirectoryKind
    bundle: bytes
    one_time: tuple[bytes, ...]

    def body(self) -> bytes:
        head = struct.pack("!IB", self.request_id, self.kind) + _blob(self.bundle, 4)
        return head + struct.pack("!H", len(self.one_time)) + b"".join(_blob(k, 2) for k in self.one_time)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> PrekeysPublish:
        request_id = r.uint(4, "request id")
        kind = DirectoryKind(r.enum(DirectoryKind, 1, "directory kind"))
        bundle = r.blob(4, lim.max_bundle_size, "bundle")
        count = r.uint(2, "one-time count")
        if count > lim.max_one_time:
            raise FrameError(f"{count} one-time prekeys exceed the limit of {lim.max_one_time}")
        keys = tuple(r.blob(2, lim.max_one_time_size, "one-time prekey") for _ in range(count))
        return cls(request_id, kind, bundle, keys)


@dataclass(frozen=True, slots=True)
class PrekeysStored:
    TYPE: ClassVar[int] = 0x21
    request_id: int
    remaining: int  # one-time entries now held for this device and kind

    def body(self) -> bytes:
        return struct.pack("!IH", self.request_id, self.remaining)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> PrekeysStored:
        return cls(r.uint(4, "request id"), r.uint(2, "remaining"))


@dataclass(frozen=True, slots=True)
class PrekeysFetch:
    TYPE: ClassVar[int] = 0x22
    request_id: int
    kind: DirectoryKind
    device_id: str

    def body(self) -> bytes:
        return struct.pack("!IB", self.request_id, self.kind) + _text(self.device_id, 1)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> PrekeysFetch:
        request_id = r.uint(4, "request id")
        return cls(request_id, DirectoryKind(r.enum(DirectoryKind, 1, "directory kind")), r.device("device id"))


@dataclass(frozen=True, slots=True)
class Prekeys:
    """The answer to PREKEYS_FETCH: the bundle (None if the device published none) and at most one one-time
    prekey, which the relay has removed from its directory (None when it has run out)."""

    TYPE: ClassVar[int] = 0x23
    request_id: int
    kind: DirectoryKind
    device_id: str
    bundle: bytes | None
    one_time: bytes | None

    def body(self) -> bytes:
        flags = (self.bundle is not None) | (self.one_time is not None) << 1
        out = struct.pack("!IB", self.request_id, self.kind) + _text(self.device_id, 1) + bytes((flags,))
        if self.bundle is not None:
            out += _blob(self.bundle, 4)
        if self.one_time is not None:
            out += _blob(self.one_time, 2)
        return out

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> Prekeys:
        request_id = r.uint(4, "request id")
        kind = DirectoryKind(r.enum(DirectoryKind, 1, "directory kind"))
        device = r.device("device id")
        flags = r.uint(1, "flags")
        if flags & ~3:
            raise FrameError(f"unknown prekeys flags {flags:#x}")
        bundle = r.blob(4, lim.max_bundle_size, "bundle") if flags & 1 else None
        one_time = r.blob(2, lim.max_one_time_size, "one-time prekey") if flags & 2 else None
        return cls(request_id, kind, device, bundle, one_time)


@dataclass(frozen=True, slots=True)
class GroupSend:
    """Gateway to relay: one MLS message for a group, fanned out by the relay once per listed device.
    Flags: bit 0 resend (a commit the Delivery Service accepted before, sent again to devices that missed it)."""

    TYPE: ClassVar[int] = 0x13
    request_id: int
    flags: int
    envelope_id: bytes
    recipients: tuple[str, ...]
    message: bytes

    def __post_init__(self) -> None:
        if len(self.envelope_id) != ENVELOPE_ID_SIZE:
            raise LinkUsageError(f"envelope id must be {ENVELOPE_ID_SIZE} bytes")
        if self.flags & ~1:
            raise LinkUsageError(f"unknown group-send flags {self.flags:#x}")

    def body(self) -> bytes:
        head = struct.pack("!IB", self.request_id, self.flags) + self.envelope_id
        devices = struct.pack("!H", len(self.recipients)) + b"".join(_text(d, 1) for d in self.recipients)
        return head + devices + _blob(self.message, 4)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> GroupSend:
        request_id, flags = r.uint(4, "request id"), r.uint(1, "flags")
        if flags & ~1:
            raise FrameError(f"unknown group-send flags {flags:#x}")
        envelope_id = r.take(ENVELOPE_ID_SIZE, "envelope id")
        count = r.uint(2, "recipient count")
        if count == 0 or count > lim.max_group_recipients:
            raise FrameError(f"recipient count {count} outside 1..{lim.max_group_recipients}")
        recipients = tuple(r.device("recipient") for _ in range(count))
        return cls(request_id, flags, envelope_id, recipients, r.blob(4, lim.max_frame_size, "message"))


@dataclass(frozen=True, slots=True)
class GroupResult:
    """Relay to gateway: the answer to GROUP_SEND. `epoch` is the group's epoch at the Delivery Service (the
    epoch the next commit must be made in; 0 when unknown); `undelivered` lists (device, UndeliverableReason)."""

    TYPE: ClassVar[int] = 0x14
    request_id: int
    status: GroupStatus
    epoch: int
    undelivered: tuple[tuple[str, UndeliverableReason], ...]

    def body(self) -> bytes:
        head = struct.pack("!IBQH", self.request_id, self.status, self.epoch, len(self.undelivered))
        return head + b"".join(_text(d, 1) + bytes((reason,)) for d, reason in self.undelivered)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> GroupResult:
        request_id = r.uint(4, "request id")
        status = GroupStatus(r.enum(GroupStatus, 1, "group status"))
        epoch = r.uint(8, "epoch")
        count = r.uint(2, "undelivered count")
        if count > lim.max_group_recipients:
            raise FrameError(f"undelivered count {count} exceeds {lim.max_group_recipients}")
        out = []
        for _ in range(count):
            device = r.device("device")
            out.append((device, UndeliverableReason(r.enum(UndeliverableReason, 1, "undeliverable reason"))))
        return cls(request_id, status, epoch, tuple(out))


@dataclass(frozen=True, slots=True)
class KeyPackagesPublish:
    """Gateway to relay: MLS KeyPackages of one local agent (one-time, popped once each) and an optional
    last-resort KeyPackage (handed out when the one-time ones have run out). Answered with PREKEYS_STORED."""

    TYPE: ClassVar[int] = 0x24
    request_id: int
    agent: str
    last_resort: bytes  # empty: keep the one already published
    key_packages: tuple[bytes, ...]

    def body(self) -> bytes:
        head = struct.pack("!I", self.request_id) + _text(self.agent, 1) + _blob(self.last_resort, 4)
        return head + struct.pack("!H", len(self.key_packages)) + b"".join(_blob(k, 2) for k in self.key_packages)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> KeyPackagesPublish:
        request_id = r.uint(4, "request id")
        agent = r.device("agent")
        last_resort = r.blob(4, lim.max_bundle_size, "last-resort KeyPackage")
        count = r.uint(2, "KeyPackage count")
        if count > lim.max_one_time:
            raise FrameError(f"{count} KeyPackages exceed the limit of {lim.max_one_time}")
        return cls(request_id, agent, last_resort,
                   tuple(r.blob(2, lim.max_one_time_size, "KeyPackage") for _ in range(count)))


@dataclass(frozen=True, slots=True)
class KeyPackageFetch:
    """Gateway to relay: one KeyPackage of `device`/`agent`. Answered with PREKEYS (kind 2): the bundle is the
    last-resort KeyPackage, the one-time entry a one-time KeyPackage (removed from the directory)."""

    TYPE: ClassVar[int] = 0x25
    request_id: int
    device_id: str
    agent: str

    def body(self) -> bytes:
        return struct.pack("!I", self.request_id) + _text(self.device_id, 1) + _text(self.agent, 1)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> KeyPackageFetch:
        return cls(r.uint(4, "request id"), r.device("device id"), r.device("agent"))


@dataclass(frozen=True, slots=True)
class Error:
    TYPE: ClassVar[int] = 0x7F
    code: ErrorCode
    reason: str

    def body(self) -> bytes:
        return struct.pack("!H", self.code) + _text(self.reason, 2)

    @classmethod
    def read(cls, r: _Reader, lim: LinkLimits) -> Error:
        return cls(ErrorCode(r.enum(ErrorCode, 2, "error code")), r.text(2, lim.max_text_size, "reason"))


Frame: TypeAlias = (
    Challenge | Auth | AuthOk | AuthFail | Refresh | Ping | Envelopes | Deliver | Undeliverable
    | PrekeysPublish | PrekeysStored | PrekeysFetch | Prekeys | GroupSend | GroupResult | KeyPackagesPublish
    | KeyPackageFetch | Error
)
_FRAME_TYPES: dict[int, type[Frame]] = {
    cls.TYPE: cls
    for cls in (Challenge, Auth, AuthOk, AuthFail, Refresh, Ping, Envelopes, Deliver, Undeliverable,
                PrekeysPublish, PrekeysStored, PrekeysFetch, Prekeys, GroupSend, GroupResult, KeyPackagesPublish,
                KeyPackageFetch, Error)
}


def encode_frame(frame: Frame) -> bytes:
    if isinstance(frame, (Envelopes, Deliver)):  # the large ones: one copy of each ciphertext, see _envelopes_parts
        return b"".join((bytes((LINK_VERSION, frame.TYPE)), *_envelopes_parts(frame.envelopes)))
    return bytes((LINK_VERSION, frame.TYPE)) + frame.body()


def decode_frame(data: bytes, limits: LinkLimits) -> Frame:
    """Decode one WebSocket message into a frame; only FrameError escapes on bad input."""
    if len(data) > limits.max_frame_size:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {limits.max_frame_size}")
    if len(data) < 2:
        raise FrameError("frame shorter than its 2-byte header")
    if data[0] != LINK_VERSION:
        raise FrameError(f"unsupported link version {data[0]} (expected {LINK_VERSION})")
    cls = _FRAME_TYPES.get(data[1])
    if cls is None:
        raise FrameError(f"unknown frame type {data[1]:#04x}")
    r = _Reader(data, 2)
    frame = cls.read(r, limits)
    r.end()
    return frame


def batch_envelopes(envelopes: Sequence[Envelope], limits: LinkLimits) -> list[list[Envelope]]:
    """Split envelopes into as few batches as fit one frame each (count and byte limits)."""
    batches: list[list[Envelope]] = []
    current: list[Envelope] = []
    size = 4  # header + count
    for env in envelopes:
        need = 4 + env.size
        if 4 + need > limits.max_frame_size:
            raise LinkUsageError(f"envelope of {env.size} bytes cannot fit in a frame of {limits.max_frame_size}")
        if current and (size + need > limits.max_frame_size or len(current) >= limits.max_envelopes_per_frame):
            batches.append(current)
            current, size = [], 4
        current.append(env)
        size += need
    if current:
        batches.append(current)
    return batches
