"""Group state in the gateway's encrypted store (the `secrets` table, sealed at rest).

Names, all under `grp/`: `signer/<agent>` (the agent's MLS signing key and chain), `member/<agent>/<group>` (one
local agent's MLS state, `group_persist` format), `buffer/<agent>/<group>` (messages for a later epoch, waiting
for the commit that leads there), `kp/<agent>` and `lastresort/<agent>` (KeyPackage private halves),
`invite/<agent>/<group>` (a Welcome held for the operator's consent), `out/<id>` (a group message some devices
have not acknowledged yet), `in/<id>` (a decrypted message waiting for the broker, or handed to an agent that
acknowledges and kept until it does), `seen/<group>/<n>` (the ids of the last group messages taken, SEEN_CHUNK per
chunk, SEEN_CHUNKS chunks in a ring: duplicates are dropped and acknowledged again), `welcomed/<message id>`
(which agent and group a Welcome was for) and `index` (which exist). Callers group writes in
`store.transaction()`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from gateway.protocol.group_ack import message_id
from gateway.protocol.mls.key_package import KeyPackage
from gateway.protocol.mls.key_package_bundle import KeyPackageBundle
from gateway.store import Store


def pack(parts: list[bytes]) -> bytes:
    return b"".join(struct.pack("!I", len(p)) + p for p in parts)


def unpack(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise ValueError("corrupt group record")
        (n,) = struct.unpack_from("!I", data, pos)
        if pos + 4 + n > len(data):
            raise ValueError("corrupt group record")
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def bundle_to_bytes(b: KeyPackageBundle) -> bytes:
    return pack([b.key_package.to_bytes(), b.init_priv, b.encryption_priv])


def bundle_from_bytes(data: bytes) -> KeyPackageBundle:
    kp, init_priv, enc_priv = unpack(data)
    return KeyPackageBundle(KeyPackage.from_bytes(kp), init_priv, enc_priv)


SEEN_CHUNK = 256
SEEN_CHUNKS = 32  # the last 8,192 message ids per group


@dataclass
class OutEntry:
    """A group message some member devices have not acknowledged end to end yet: resent to them, with backoff,
    until they do, leave the group, or it expires."""

    entry_id: bytes
    message: bytes
    devices: list[str]  # the devices still to acknowledge it
    resend: bool  # a commit the relay accepted: resends must say so
    expires_ms: int
    seq: int = 0  # send order: a sender's messages reach each device in the order they were made
    next_ms: int = 0
    attempts: int = 0
    agent: str = ""  # the local member that sent it, and its group ("" in entries of older versions)
    group: str = ""
    msg_id: bytes = b""

    def __post_init__(self) -> None:
        if not self.msg_id:
            self.msg_id = message_id(self.message)

    def to_bytes(self) -> bytes:
        return json.dumps({"m": self.message.hex(), "d": self.devices, "r": self.resend,
                           "x": self.expires_ms, "q": self.seq, "a": self.agent, "g": self.group,
                           "n": self.attempts}).encode()

    @classmethod
    def from_bytes(cls, entry_id: bytes, data: bytes) -> OutEntry:
        d = json.loads(data)
        return cls(entry_id, bytes.fromhex(d["m"]), list(d["d"]), bool(d["r"]), int(d["x"]), int(d.get("q", 0)),
                   attempts=int(d.get("n", 0)), agent=str(d.get("a", "")), group=str(d.get("g", "")))


@dataclass
class InEntry:
    """A decrypted group message for a local agent, kept until the broker completed its QoS 2 exchange. Like the
    pairwise inbox (gateway/inbox.py), it records the MQTT packet id and how far that exchange got (`phase`, a
    `gateway.inbox.Phase`), so a restart resumes it instead of publishing again."""

    entry_id: bytes
    agent: str
    group: str
    sender: str
    epoch: int
    payload: bytes
    seq: int
    packet_id: int = 0
    phase: int = 0
    expires_ms: int = 0  # a HANDED entry (gateway/groups_held.py) not acknowledged by then is deleted; 0: unset
    # The broker connection its current QoS 2 exchange started in (not stored: 0 for an entry restored at start-up,
    # whose exchange began in an earlier run). An exchange that spans a reconnect may have ended in a PUBCOMP from
    # a restarted broker that lost the message (gateway/groups_held.py).
    exchange_connect: int = field(default=0, compare=False)

    def to_bytes(self) -> bytes:
        return json.dumps({"a": self.agent, "g": self.group, "s": self.sender, "e": self.epoch,
                           "p": self.payload.hex(), "q": self.seq, "i": self.packet_id, "h": self.phase,
                           "x": self.expires_ms}).encode()

    @classmethod
    def from_bytes(cls, entry_id: bytes, data: bytes) -> InEntry:
        d = json.loads(data)
        return cls(entry_id, d["a"], d["g"], d["s"], int(d["e"]), bytes.fromhex(d["p"]), int(d["q"]),
                   int(d.get("i", 0)), int(d.get("h", 0)), int(d.get("x", 0)))


@dataclass
class GroupIndex:
    members: set[tuple[str, str]] = field(default_factory=set)
    out: set[bytes] = field(default_factory=set)
    inbox: set[bytes] = field(default_factory=set)
    invites: set[tuple[str, str]] = field(default_factory=set)

    def to_bytes(self) -> bytes:
        return json.dumps({"members": sorted(self.members), "out": sorted(i.hex() for i in self.out),
                           "in": sorted(i.hex() for i in self.inbox), "invites": sorted(self.invites)}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupIndex:
        d = json.loads(data)
        return cls({(a, g) for a, g in d["members"]}, {bytes.fromhex(i) for i in d["out"]},
                   {bytes.fromhex(i) for i in d["in"]}, {(a, g) for a, g in d.get("invites", [])})


class GroupRecords:
    """Typed access to the group records; the index is kept in memory and written when it changes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.secrets = store.secrets
        raw = self.secrets.get("grp/index")
        self.index = GroupIndex.from_bytes(raw) if raw else GroupIndex()
        self._inbox: dict[bytes, InEntry] | None = None
        self.deferred = 0  # > 0: index writes wait for flush_index() (one write per batch, same transaction)
        self._dirty = False
        self._seen: dict[str, _Seen] = {}
        self._seen_dirty: set[tuple[str, int]] = set()

    def _save_index(self) -> None:
        if self.deferred:
            self._dirty = True
            return
        self.secrets.put("grp/index", self.index.to_bytes())
        self._dirty = False

    def flush_index(self) -> None:
        self._flush_seen()
        if self._dirty:
            self.secrets.put("grp/index", self.index.to_bytes())
            self._dirty = False

    # signers and KeyPackages
    def signer(self, agent: str) -> bytes | None:
        return self.secrets.get(f"grp/signer/{agent}")

    def put_signer(self, agent: str, data: bytes) -> None:
        self.secrets.put(f"grp/signer/{agent}", data)

    def key_packages(self, agent: str) -> list[KeyPackageBundle]:
        raw = self.secrets.get(f"grp/kp/{agent}")
        return [bundle_from_bytes(b) for b in unpack(raw)] if raw else []

    def put_key_packages(self, agent: str, bundles: list[KeyPackageBundle]) -> None:
        self.secrets.put(f"grp/kp/{agent}", pack([bundle_to_bytes(b) for b in bundles]))

    def last_resort(self, agent: str) -> KeyPackageBundle | None:
        raw = self.secrets.get(f"grp/lastresort/{agent}")
        return bundle_from_bytes(raw) if raw else None

    def put_last_resort(self, agent: str, bundle: KeyPackageBundle) -> None:
        self.secrets.put(f"grp/lastresort/{agent}", bundle_to_bytes(bundle))

    # memberships
    def member(self, agent: str, group: str) -> bytes | None:
        return self.secrets.get(f"grp/member/{agent}/{group}")

    def put_member(self, agent: str, group: str, state: bytes) -> None:
        self.secrets.put(f"grp/member/{agent}/{group}", state)
        if (agent, group) not in self.index.members:
            self.index.members.add((agent, group))
            self._save_index()

    def drop_member(self, agent: str, group: str) -> None:
        self.secrets.delete(f"grp/member/{agent}/{group}")
        self.secrets.delete(f"grp/buffer/{agent}/{group}")
        self.index.members.discard((agent, group))
        self._save_index()

    def buffer(self, agent: str, group: str) -> list[bytes]:
        raw = self.secrets.get(f"grp/buffer/{agent}/{group}")
        return unpack(raw) if raw else []

    def put_buffer(self, agent: str, group: str, messages: list[bytes]) -> None:
        if messages:
            self.secrets.put(f"grp/buffer/{agent}/{group}", pack(messages))
        else:
            self.secrets.delete(f"grp/buffer/{agent}/{group}")

    # invitations held for the operator's consent
    def invitation(self, agent: str, group: str) -> bytes | None:
        return self.secrets.get(f"grp/invite/{agent}/{group}")

    def put_invitation(self, agent: str, group: str, data: bytes) -> None:
        self.secrets.put(f"grp/invite/{agent}/{group}", data)
        self.index.invites.add((agent, group))
        self._save_index()

    def drop_invitation(self, agent: str, group: str) -> None:
        self.secrets.delete(f"grp/invite/{agent}/{group}")
        self.index.invites.discard((agent, group))
        self._save_index()

    # outbox and inbox
    def outbox(self) -> list[OutEntry]:
        out = []
        for i in sorted(self.index.out):
            raw = self.secrets.get(f"grp/out/{i.hex()}")
            if raw is not None:
                out.append(OutEntry.from_bytes(i, raw))
        return out

    def put_out(self, entry: OutEntry) -> None:
        self.secrets.put(f"grp/out/{entry.entry_id.hex()}", entry.to_bytes())
        if entry.entry_id not in self.index.out:
            self.index.out.add(entry.entry_id)
            self._save_index()

    def drop_out(self, entry_ids: list[bytes]) -> None:
        for i in entry_ids:
            self.secrets.delete(f"grp/out/{i.hex()}")
            self.index.out.discard(i)
        self._save_index()

    def inbox(self) -> list[InEntry]:
        """Inbox entries in arrival order (mirrored in memory: read from the store once)."""
        if self._inbox is None:
            self._inbox = {}
            for i in self.index.inbox:
                raw = self.secrets.get(f"grp/in/{i.hex()}")
                if raw is not None:
                    self._inbox[i] = InEntry.from_bytes(i, raw)
        return sorted(self._inbox.values(), key=lambda e: e.seq)

    def put_in(self, entry: InEntry) -> None:
        if self._inbox is None:
            self.inbox()
        self.secrets.put(f"grp/in/{entry.entry_id.hex()}", entry.to_bytes())
        self.index.inbox.add(entry.entry_id)
        assert self._inbox is not None
        self._inbox[entry.entry_id] = entry
        self._save_index()

    def update_in(self, entry: InEntry) -> None:
        """Rewrite an entry that is already in the inbox (its publish state changed); no index change."""
        if self._inbox is not None and entry.entry_id in self._inbox:
            self.secrets.put(f"grp/in/{entry.entry_id.hex()}", entry.to_bytes())
            self._inbox[entry.entry_id] = entry

    def inbox_entry(self, entry_id: bytes) -> InEntry | None:
        """One inbox entry by id (from the in-memory mirror)."""
        if self._inbox is None:
            self.inbox()
        assert self._inbox is not None
        return self._inbox.get(entry_id)

    def drop_in(self, entry_ids: list[bytes]) -> None:
        for i in entry_ids:
            self.secrets.delete(f"grp/in/{i.hex()}")
            self.index.inbox.discard(i)
            if self._inbox is not None:
                self._inbox.pop(i, None)
        self._save_index()

    # ids of the group messages taken (inbox, epoch buffer or processed), for duplicate detection
    def _seen_ids(self, group: str) -> _Seen:
        seen = self._seen.get(group)
        if seen is None:
            seen = self._seen[group] = _Seen()
            for n in range(SEEN_CHUNKS):
                raw = self.secrets.get(f"grp/seen/{group}/{n}")
                if raw and len(raw) >= 8:
                    (seq,) = struct.unpack_from("!Q", raw)
                    seen.chunks[seq] = [raw[i:i + 16] for i in range(8, len(raw) - 15, 16)]
            seen.chunks = dict(sorted(seen.chunks.items()))
            for ids in seen.chunks.values():
                seen.ids.update(ids)
        return seen

    def seen(self, group: str, msg_id: bytes) -> bool:
        return msg_id in self._seen_ids(group).ids

    def mark_seen(self, group: str, msg_id: bytes) -> None:
        """Remember a taken message id; written with the batch's transaction (one chunk write per batch)."""
        seen = self._seen_ids(group)
        if msg_id in seen.ids:
            return
        seq = max(seen.chunks, default=0)
        if len(seen.chunks.get(seq, ())) >= SEEN_CHUNK:
            seq += 1
        seen.chunks.setdefault(seq, []).append(msg_id)
        seen.ids.add(msg_id)
        while len(seen.chunks) > SEEN_CHUNKS:
            old = min(seen.chunks)
            seen.ids.difference_update(seen.chunks.pop(old))
        self._seen_dirty.add((group, seq))
        if not self.deferred:
            self._flush_seen()

    def _flush_seen(self) -> None:
        """The ring: chunk number `seq` lives in slot seq % SEEN_CHUNKS, prefixed by seq (load order)."""
        for group, seq in sorted(self._seen_dirty):
            ids = self._seen_ids(group).chunks.get(seq)
            if ids is not None:
                self.secrets.put(f"grp/seen/{group}/{seq % SEEN_CHUNKS}", struct.pack("!Q", seq) + b"".join(ids))
        self._seen_dirty.clear()

    def welcomed(self, msg_id: bytes) -> tuple[str, str] | None:
        raw = self.secrets.get(f"grp/welcomed/{msg_id.hex()}")
        if raw is None:
            return None
        agent, _, group = raw.decode().partition("\n")
        return agent, group

    def put_welcomed(self, msg_id: bytes, agent: str, group: str) -> None:
        self.secrets.put(f"grp/welcomed/{msg_id.hex()}", f"{agent}\n{group}".encode())


@dataclass
class _Seen:
    chunks: dict[int, list[bytes]] = field(default_factory=dict)
    ids: set[bytes] = field(default_factory=set)
