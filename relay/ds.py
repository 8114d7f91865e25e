"""The MLS Delivery Service: orders commits per group, so every member sees the same one per epoch.

The relay reads only the cleartext header of an MLSMessage (RFC 9420 section 6): the wire format, the group id,
the epoch and the content type. Everything else stays opaque. Rules:

- exactly one commit is accepted per (group, epoch): the first that arrives for the group's current epoch (or a
  later one: after a relay restart the relay learns the epoch again from the next commit). A commit for an
  older epoch lost the race: the sender is told STALE_EPOCH with the current epoch, processes the winner's
  commit (already on its way to it) and retries;
- a commit sent again (resend flag) to devices that missed it is passed on only if it is the very commit that
  was accepted for its epoch (same SHA-256), so a resend cannot smuggle in a second commit;
- application messages, proposals and Welcomes are passed on unordered.

State is in memory only and bounded: at most `max_groups` groups (least recently used forgotten) and the
digests of the last `epochs_kept` accepted commits per group.
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from gateway.protocol.link import GroupStatus
from gateway.protocol.mls.codec import Reader
from gateway.protocol.mls.errors import MlsDecodeError

_MLS10 = 1
_SENDER_WITH_INDEX = (1, 2)  # member, external: a u32 index follows the sender type


class WireFormat(enum.IntEnum):
    PUBLIC_MESSAGE = 1
    PRIVATE_MESSAGE = 2
    WELCOME = 3
    GROUP_INFO = 4
    KEY_PACKAGE = 5


class ContentType(enum.IntEnum):
    APPLICATION = 1
    PROPOSAL = 2
    COMMIT = 3


class MalformedMessage(ValueError):
    """The bytes are not an MLSMessage whose cleartext header can be read."""


@dataclass(frozen=True, slots=True)
class MessageHeader:
    """What the relay may know about a group message."""

    wire_format: WireFormat
    group_id: bytes | None = None  # None for Welcome, GroupInfo and KeyPackage
    epoch: int = 0
    content_type: ContentType | None = None


def read_header(message: bytes) -> MessageHeader:
    """Parse the cleartext header of an MLSMessage; raise MalformedMessage on anything unreadable."""
    r = Reader(message)
    try:
        if r.u16() != _MLS10:
            raise MalformedMessage("not an MLS 1.0 message")
        try:
            wf = WireFormat(r.u16())
        except ValueError:
            raise MalformedMessage("unknown wire format") from None
        if wf not in (WireFormat.PUBLIC_MESSAGE, WireFormat.PRIVATE_MESSAGE):
            return MessageHeader(wf)
        group_id = r.opaque()
        epoch = r.u64()
        if wf is WireFormat.PUBLIC_MESSAGE:
            sender_type = r.u8()
            if sender_type in _SENDER_WITH_INDEX:
                r.u32()
            elif sender_type not in (3, 4):
                raise MalformedMessage(f"unknown sender type {sender_type}")
            r.opaque()  # authenticated data
        try:
            content_type = ContentType(r.u8())
        except ValueError:
            raise MalformedMessage("unknown content type") from None
    except MlsDecodeError as exc:
        raise MalformedMessage(f"truncated MLS header: {exc}") from None
    if not group_id:
        raise MalformedMessage("empty group id")
    return MessageHeader(wf, group_id, epoch, content_type)


@dataclass(slots=True)
class _Group:
    epoch: int  # the epoch the next commit must be made in
    accepted: OrderedDict[int, bytes] = field(default_factory=OrderedDict)  # epoch -> digest of the winner


@dataclass(frozen=True, slots=True)
class Verdict:
    status: GroupStatus
    epoch: int  # the group's epoch at the Delivery Service after this message (0: unknown)

    @property
    def accepted(self) -> bool:
        return self.status is GroupStatus.ACCEPTED


class DeliveryService:
    """Decides, message by message, whether a group send may be fanned out. Single-threaded (asyncio)."""

    def __init__(self, *, max_groups: int = 100_000, epochs_kept: int = 64) -> None:
        self._groups: OrderedDict[bytes, _Group] = OrderedDict()
        self.max_groups = max_groups
        self.epochs_kept = epochs_kept
        self.commits_accepted = 0
        self.commits_refused = 0

    def __len__(self) -> int:
        return len(self._groups)

    def epoch_of(self, group_id: bytes) -> int:
        g = self._groups.get(group_id)
        return g.epoch if g else 0

    def check(self, message: bytes, *, resend: bool = False) -> Verdict:
        try:
            header = read_header(message)
        except MalformedMessage:
            return Verdict(GroupStatus.MALFORMED, 0)
        if header.group_id is None:
            return Verdict(GroupStatus.ACCEPTED, 0)
        group = self._groups.get(header.group_id)
        if group is not None:
            self._groups.move_to_end(header.group_id)
        if header.content_type is not ContentType.COMMIT:
            return Verdict(GroupStatus.ACCEPTED, group.epoch if group else 0)
        digest = hashlib.sha256(message).digest()
        if resend:
            if group is None or group.accepted.get(header.epoch) == digest:
                return Verdict(GroupStatus.ACCEPTED, group.epoch if group else 0)
            self.commits_refused += 1
            return Verdict(GroupStatus.STALE_EPOCH, group.epoch)
        if group is not None and header.epoch < group.epoch:
            self.commits_refused += 1
            return Verdict(GroupStatus.STALE_EPOCH, group.epoch)
        if group is None:
            group = self._groups[header.group_id] = _Group(header.epoch + 1)
            while len(self._groups) > self.max_groups:
                self._groups.popitem(last=False)
        group.epoch = header.epoch + 1
        group.accepted[header.epoch] = digest
        while len(group.accepted) > self.epochs_kept:
            group.accepted.popitem(last=False)
        self.commits_accepted += 1
        return Verdict(GroupStatus.ACCEPTED, group.epoch)
