"""Agent groups over MLS: the daemon's `GroupService`.

Each local agent that belongs to a group holds its own MLS member state (leaf signed by its delegated key, X.509
credential chain, see groups_identity). Group id = the group's name (a topic segment). The relay is the Delivery
Service: one GROUP_SEND per message, fanned out once per member device, one commit accepted per epoch.

- Agents publish on agw/<agent>/group/<group>/out (message to the group) and .../ctl (JSON: {"op": "create" |
  "add" | "remove", "members": ["<device>/<agent>", ...], "admins": [...], "id": ...}); results and membership
  events arrive as JSON on .../events, group messages on .../in with `agw:from`, `agw:group`, `agw:epoch`.
- Operators use the same operations through the control socket (`agw group ...`).
- Sending: encrypt, persist the advanced state and an outbox entry in one transaction (then the broker gets its
  PUBACK), hand the message to the relay; devices the relay could not reach stay in the outbox and get it again
  (commits with the resend flag) until they do or it expires. Other local members get it directly.
- Receiving: messages for a later epoch wait (persisted) for the commit leading there; a commit is merged only
  if its committer may make it (admins in the group context); application messages are checked to come from
  the agent their credential names, then go through a persisted inbox to the broker.
- Joining: a Welcome is accepted for a local agent only if its operator allows the adder (the agent's allow
  list, or `agw consent allow`); otherwise it is refused and audited.
- Commits: create, send, merge once the Delivery Service accepted it; if another commit won the epoch, wait to
  process the winner, then retry (up to COMMIT_ATTEMPTS times).
- Key rotation: an agent's leaf follows its delegated key. When the key is renewed (a day before it expires,
  by this service, or by the operator with `agw keys delegate --agent NAME --force`, noticed within a second),
  or found newer than its leaves at start-up, the agent commits in each of its groups an UpdatePath whose leaf
  carries the new key and chain (any commit it makes carries it; the loser of an epoch retries). Until that
  commit is merged the membership signs with the old key, kept as a retired signer while a leaf or a held
  KeyPackage still uses it. New KeyPackages use the new key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from gateway import topics
from gateway.bridge import AgentMessage, BrokerUnavailable, MqttBridge
from gateway.config import GatewayConfig
from gateway.device_identity import DeviceIdentity
from gateway.groups_delivery import RETRY_MS, GroupDelivery
from gateway.groups_held import GroupHeld
from gateway.groups_identity import (
    SUITE,
    AgentSigner,
    admins_extension,
    admins_of,
    agent_of,
    capabilities,
    fleet_successor,
    fleet_validator,
)
from gateway.groups_keys import GroupError, GroupKeys
from gateway.groups_membership import ORPHANS, ORPHANS_MAX, RECENT_MAX, GroupMembership, _epoch, _group_id
from gateway.groups_store import InEntry, OutEntry
from gateway.link import RelayLink
from gateway.protocol.envelope import Envelope
from gateway.protocol.group_ack import is_group_ack, message_id
from gateway.protocol.identity.errors import BadName
from gateway.protocol.identity.names import check_id
from gateway.protocol.link import GroupStatus
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.key_package import KeyPackage
from gateway.protocol.mls.tree_math import LeafIndex
from gateway.protocol.receipts import ReceiptFormatError, derive_group_send_id, parse_sdk_id
from gateway.store import Store

if TYPE_CHECKING:
    # The MLS engine (framing, group state, TreeKEM, Welcome; ~2 MB of RSS) is imported where it is first used:
    # a gateway whose agents are in no group only publishes KeyPackages (gateway/protocol/mls/key_package_bundle).
    from gateway.protocol.mls.group import Group, GroupConfig
    from gateway.protocol.mls.group_state import ApplicationMessage, StagedCommit

log = logging.getLogger("agw.groups")

MESSAGE_TTL_MS = 24 * 3_600_000
BUFFER_MAX = 1_000
COMMIT_ATTEMPTS = 5
COMMIT_WAIT_S = 10.0
# Keys of skipped generations kept per sender (MLS default 32): a message the relay lost (kill -9) is resent
# after later ones arrived, and must still be readable then (the same bound as max_forward).
OUT_OF_ORDER_WINDOW = 1_000
SELF_UPDATE_S = 86_400.0  # each local member commits fresh keys this often (post-compromise security)
ROTATION_RETRY_S = 10.0  # a failed rotation commit is tried again after this long, doubling up to 10 minutes
ROTATION_RETRY_MAX_S = 600.0


@dataclass
class _Op:
    """A control-socket operation that needs the relay: polled with group.op."""

    state: str = "pending"
    result: Any = None
    error: str | None = None


class Groups(GroupMembership, GroupDelivery, GroupHeld, GroupKeys):
    """The GroupService the daemon wires in (gateway/group_hooks.py) once a group is used: `GroupKeys` (signers,
    KeyPackages, key renewal, the CRL) becomes a `Groups` then (`GroupKeys.become_full`)."""

    def __init__(self, store: Store, identity: DeviceIdentity, link: RelayLink, bridge: MqttBridge,
                 cfg: GatewayConfig, now_ms: Callable[[], int]) -> None:
        super().__init__(store, identity, link, bridge, cfg, now_ms)
        self._init_service()

    def _init_service(self) -> None:
        """The state of the full service, on top of `GroupKeys.__init__`'s."""
        self.bridge.on_session_lost.append(self._broker_lost_session)  # (groups_delivery)
        self._rotating: dict[tuple[str, str], float] = {}  # rotation commits in flight or failed: retry time
        self._rotation_failures: dict[tuple[str, str], int] = {}
        self.members: dict[tuple[str, str], Group] = {}
        self.outbox: dict[bytes, OutEntry] = {}
        self.ops: dict[str, _Op] = {}
        self._epoch_changed = asyncio.Condition()
        self._commit_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self._inbox_wake = asyncio.Event()
        self._seq = 0
        self._out_seq = 0
        self._recent: dict[str, collections.deque[bytes]] = {}
        self._last_update: dict[tuple[str, str], float] = {}
        self._dirty: set[tuple[str, str]] | None = None
        self.self_update_s = SELF_UPDATE_S
        self._publishing: set[bytes] = set()

    @cached_property
    def mls_config(self) -> GroupConfig:
        from gateway.protocol.mls.group import GroupConfig

        return GroupConfig(
            identity_validator=fleet_validator(lambda: self.identity.trust, lambda: dt.datetime.now(dt.UTC)),
            credential_successor=fleet_successor(lambda: self.identity.trust, lambda: dt.datetime.now(dt.UTC)),
            allow_external_commits=False,  # members join by Welcome only; see docs/threat-model.md
            max_past_epochs=2, out_of_order_window=OUT_OF_ORDER_WINDOW)

    # -- start-up ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        for agent in self.cfg.agents:
            await self._load_signer(agent)
        self._start_service()

    def _start_service(self) -> None:
        """Restore the memberships and both boxes, start the loops (those `GroupKeys` started keep running)."""
        for agent, group in sorted(self.records.index.members):
            raw = self.records.member(agent, group)
            if raw is None or agent not in self.signers:
                continue
            from gateway.protocol.mls.group_persist import group_from_bytes

            self.members[(agent, group)] = group_from_bytes(raw, [s.signer for s in self._all_signers(agent)],
                                                            self.mls_config)
        for agent in self.signers:
            self._prune_retired(agent)
        self.outbox = {e.entry_id: e for e in self.records.outbox()}
        self._seq = max((e.seq for e in self.records.inbox()), default=0)
        self._claim_inbox_ids()
        self._restore_held()
        self._spawn(self._loop(), "groups")
        self._spawn(self._inbox_loop(), "group-inbox")
        self._spawn(self._self_updates(), "group-self-updates")
        self._spawn(self._invitations(), "group-invitations")
        if not self._key_loops:
            self._key_loops = True
            self._spawn(self._revocations(), "group-revocations")
            self._spawn(self._rotations(), "group-rotations")
        log.info("groups: %d membership(s) restored, %d outbox entr(ies)", len(self.members), len(self.outbox))

    # -- daemon hooks ----------------------------------------------------------------------------------------------
    async def on_agent_messages(self, messages: list[AgentMessage]) -> list[tuple[AgentMessage, str]]:
        """Group publishes of a batch become durable in one transaction; a broker redelivery (DUP) of a publish
        already taken (same packet id and content) is not sent twice, nor an SDK retransmission (same
        `agw:sdk-id`). Returns the group messages refused, with the reason (for the SDK's receipts)."""
        with self._batch():
            return self._take(messages)

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """One transaction for a batch of messages: each touched membership's state and the record index are
        written once, at the end, inside it (state, outbox and inbox entries commit together)."""
        outer = self._dirty is None
        with self.store.transaction():
            self.records.deferred += 1
            if outer:
                self._dirty = set()
            try:
                yield
                for key in self._dirty or ():
                    g = self.members.get(key)
                    if g is not None:
                        self.records.put_member(*key, _group_to_bytes(g))
            finally:
                if outer:
                    self._dirty = None
                self.records.deferred -= 1
                if not self.records.deferred:
                    self.records.flush_index()

    def _save(self, agent: str, group: str) -> None:
        if self._dirty is not None:
            self._dirty.add((agent, group))
        else:
            self.records.put_member(agent, group, _group_to_bytes(self.members[(agent, group)]))

    def _take(self, messages: list[AgentMessage]) -> list[tuple[AgentMessage, str]]:
        refused: list[tuple[AgentMessage, str]] = []
        for m in messages:
            parts = m.topic.split("/")
            agent, group, verb = parts[1], parts[3], parts[4]
            mark, digest = f"grp/mqtt-in/{m.mid}", _digest(m)
            if m.dup and self.records.secrets.get(mark) == digest:
                continue
            try:
                if verb == "out":
                    send_id = _sdk_send_id(m, agent, group)
                    if send_id is None or not self.store.delivered.seen(send_id):
                        self.send(agent, group, m.payload)
                        if send_id is not None:  # (in this batch's transaction: remembered iff it was queued)
                            self.store.delivered.mark(send_id, self._send_id_mark_ms())
                else:
                    self._spawn(self._ctl(agent, group, m.payload), f"group-ctl-{agent}-{group}")
            except (GroupError, MlsError, BadName) as exc:
                self.counters.dropped += 1
                log.warning("group publish on %s refused: %s", m.topic, exc)
                self._spawn(self._event(agent, group, {"ok": False, "error": str(exc)}), "group-event")
                if verb == "out":
                    refused.append((m, str(exc)))
            self.records.secrets.put(mark, digest)
        return refused

    def _send_id_mark_ms(self) -> int:
        """The time an SDK group send's id is marked at: back-dated so that the daemon's hourly prune (by
        `store.delivered_retention_days`) drops it after MESSAGE_TTL_MS, the group message's own lifetime, not 30
        days later: one row per group message sent."""
        retention_ms = self.cfg.store.delivered_retention_days * 86_400_000
        return self.now_ms() - max(0, retention_ms - MESSAGE_TTL_MS)

    async def on_envelopes(self, envelopes: list[Envelope]) -> None:
        with self._batch():
            for env in envelopes:
                self.receive(env.sender, env.ciphertext)
        self._inbox_wake.set()

    async def on_link_event(self, event: object) -> None:
        return None

    async def on_link_ready(self) -> None:
        self._spawn(self._replenish_all(), "group-key-packages")
        self._wake.set()

    def status(self) -> dict[str, Any]:
        return {"memberships": [self._describe(a, g) for a, g in sorted(self.members)],
                "outbox": len(self.outbox), "held": self.held_count(),
                "counters": {k: v for k, v in vars(self.counters).items()
                                                         if k != "extra"}}

    def control(self, request: dict[str, Any]) -> Any:
        cmd = str(request.get("cmd", ""))
        if cmd == "group.list":
            agent = request.get("agent")
            return [self._describe(a, g) for a, g in sorted(self.members) if agent in (None, a)]
        if cmd == "group.op":
            op = self.ops.get(str(request.get("op")))
            if op is None:
                raise GroupError(f"unknown operation {request.get('op')!r}")
            return {"state": op.state, "result": op.result, "error": op.error}
        agent, group = str(request.get("agent", "")), str(request.get("group", ""))
        if agent not in self.cfg.agents:
            raise GroupError(f"{agent!r} is not an agent of this gateway")
        check_id("group", group)
        if cmd == "group.show":
            if (agent, group) not in self.members:
                raise GroupError(f"{agent} is not a member of group {group}")
            return self._describe(agent, group)
        if cmd == "group.create":
            return self.create(agent, group, [str(a) for a in request.get("admins") or []])
        if cmd in ("group.add", "group.remove", "group.update"):
            names = [str(n) for n in request.get("members") or []]
            op_id = os.urandom(8).hex()
            self.ops[op_id] = op = _Op()
            verb = cmd.split(".")[1]
            kwargs: dict[str, Any] = {"update": True} if verb == "update" else {verb: names}

            async def run() -> None:
                try:
                    op.result = await self.change(agent, group, **kwargs)
                    op.state = "done"
                except Exception as exc:
                    op.state, op.error = "failed", f"{type(exc).__name__}: {exc}"

            self._spawn(run(), f"group-{verb}")
            return {"op": op_id}
        raise GroupError(f"unknown group command {cmd!r}")

    # -- operations ----------------------------------------------------------------------------------------------
    def _describe(self, agent: str, group: str) -> dict[str, Any]:
        g = self.members[(agent, group)]
        return {"agent": agent, "group": group, "epoch": g.epoch, "members": self._member_names(g),
                "admins": admins_of(g.context.extensions), "epoch_authenticator": g.epoch_authenticator.hex(),
                "keys": {agent_of(leaf.credential): key_fingerprint(leaf.signature_key) for _, leaf in g.members()}}

    def _member_names(self, g: Group) -> list[str]:
        return sorted(agent_of(leaf.credential) for _, leaf in g.members())

    def _me(self, agent: str) -> str:
        return f"{self.device}/{agent}"

    def create(self, agent: str, group: str, admins: list[str] | None = None) -> dict[str, Any]:
        check_id("group", group)
        if (agent, group) in self.members:
            raise GroupError(f"{agent} is already a member of group {group}")
        signer = self.signers.get(agent)
        if signer is None:
            raise GroupError(f"{agent!r} is not an agent of this gateway")
        admin_list = [self._me(agent), *[a for a in admins or [] if a != self._me(agent)]]
        from gateway.protocol.mls.group import Group

        g = Group.create(SUITE, group.encode(), signer.signer, signer.credential, capabilities=capabilities(),
                         extensions=(admins_extension(admin_list),), config=self.mls_config)
        with self.store.transaction():
            self.members[(agent, group)] = g
            self.records.put_member(agent, group, _group_to_bytes(g))
        log.info("group %s created by %s", group, agent)
        return self._describe(agent, group)

    def send(self, agent: str, group: str, payload: bytes) -> None:
        """Encrypt for the group and make it durable (state + outbox) before returning."""
        g = self._member(agent, group)
        msg = g.encrypt_application(payload, authenticated_data=self._me(agent).encode()).to_bytes()
        self._queue(agent, group, g, msg, resend=False)
        self.counters.sent += 1

    def _member(self, agent: str, group: str) -> Group:
        g = self.members.get((agent, group))
        if g is None:
            raise GroupError(f"{agent} is not a member of group {group}")
        return g

    def _devices(self, g: Group) -> list[str]:
        return sorted({agent_of(leaf.credential).split("/")[0] for _, leaf in g.members()} - {self.device})

    def _queue(self, agent: str, group: str, g: Group, msg: bytes, *, resend: bool,
               devices: list[str] | None = None, welcome: bool = False) -> None:
        """Persist our state and an outbox entry in one transaction, deliver to other local members now. The entry
        waits for every member device's end-to-end ack (groups_delivery); a commit already sent once by `change`
        (resend) waits for all current member devices too, plus those the relay could not reach (a removed
        device among them is not waited for: it left), and is resent only if they do not ack in time."""
        if devices is None:
            devices = self._devices(g)
        elif resend and not welcome:
            prev = g.past_epochs().get(g.epoch - 1)  # the commit is for the members of the epoch before it
            before = {agent_of(leaf.credential).split("/")[0] for _, leaf in prev.tree.leaves()} if prev else set()
            devices = sorted(({*devices} | before) - {self.device})
        self._out_seq = max(self._out_seq + 1, time.time_ns())
        first = self.now_ms() + RETRY_MS if resend else 0
        entry = OutEntry(os.urandom(16), msg, devices, resend, self.now_ms() + MESSAGE_TTL_MS, seq=self._out_seq,
                         next_ms=first, attempts=1 if resend else 0, agent=agent, group=group)
        with self._batch() if self._dirty is None else contextlib.nullcontext():
            self._save(agent, group)
            if devices:
                self.records.put_out(entry)
                self._track(entry)
            if not welcome:
                self._process_local(agent, group, msg)
        self._wake.set()

    def _process_local(self, sender_agent: str, group: str, msg: bytes) -> None:
        for (a, gname) in list(self.members):
            if gname == group and a != sender_agent:
                self._process_for(a, group, msg)

    async def change(self, agent: str, group: str, *, add: list[str] | None = None,
                     remove: list[str] | None = None, update: bool = False) -> dict[str, Any]:
        """Add and/or remove members in one commit (or, with `update`, refresh our path secrets: post-compromise
        security); retried when another commit wins the epoch. If the agent's delegated key was renewed since
        its leaf was signed, the commit also moves the leaf to the new key (with nothing else asked, only that)."""
        g = self._member(agent, group)
        if (add or remove) and self._me(agent) not in admins_of(g.context.extensions):
            raise GroupError(f"{self._me(agent)} is not an admin of group {group}")
        for name in [*(add or []), *(remove or [])]:
            device, _, peer = name.partition("/")
            check_id("device", device)
            check_id("agent", peer)
        key_packages = {name: await self._key_package(name) for name in add or []
                        if name not in self._member_names(g)}
        lock = self._commit_locks.setdefault((agent, group), asyncio.Lock())
        async with lock:
            for _attempt in range(COMMIT_ATTEMPTS):
                g = self._member(agent, group)
                current = {agent_of(leaf.credential): i for i, leaf in g.members()}
                adds = [kp for name, kp in key_packages.items() if name not in current]
                removes = [int(current[n]) for n in remove or [] if n in current]
                new = self._rotation_signer(agent, g)
                if not adds and not removes and not update and new is None:
                    return self._describe(agent, group)
                devices = self._devices(g)
                pending = g.commit(add=adds, remove=removes, now=self.now_ms() // 1000,
                                   new_signer=new.signer if new else None,
                                   new_credential=new.credential if new else None)
                base = g.epoch
                status, ds_epoch, missed = GroupStatus.ACCEPTED, base + 1, list[str]()
                if devices:
                    res = await self.link.group_send(devices, os.urandom(16), pending.message.to_bytes())
                    status, ds_epoch, missed = res.status, res.epoch, [d for d, _ in res.undelivered]
                if status is GroupStatus.ACCEPTED:
                    if g.epoch != base:
                        raise GroupError("the group changed while our accepted commit was in flight")
                    g.merge_pending_commit(pending)
                    self.counters.commits += 1
                    self._last_update[(agent, group)] = time.monotonic()
                    self._queue(agent, group, g, pending.message.to_bytes(), resend=True, devices=missed)
                    if new is not None:
                        log.info("group %s: %s's leaf now holds its renewed delegated key (certificate serial %#x, "
                                 "valid until %s), epoch %d", group, agent, new.certificate.serial_number,
                                 new.certificate.not_valid_after_utc.isoformat(), g.epoch)
                        self._prune_retired(agent)
                    if pending.welcome is not None:
                        await self._send_welcome(agent, group, pending.welcome.to_bytes(), pending.added)
                    await self._notify_epoch()
                    self._inbox_wake.set()
                    return self._describe(agent, group)
                if status is not GroupStatus.STALE_EPOCH:
                    raise GroupError(f"the relay refused the commit: {status.name}")
                self.counters.commits_lost += 1
                log.info("group %s: our commit lost epoch %d; catching up to %d", group, base, ds_epoch)
                await self._wait_epoch(agent, group, ds_epoch)
        raise GroupError(f"could not commit to group {group} after {COMMIT_ATTEMPTS} attempts")

    async def _send_welcome(self, agent: str, group: str, welcome: bytes,
                            added: tuple[tuple[LeafIndex, KeyPackage], ...]) -> None:
        devices = sorted({agent_of(kp.leaf_node.credential).split("/")[0] for _, kp in added})
        remote = [d for d in devices if d != self.device]
        if self.device in devices:
            self.receive(self.device, welcome)
        if remote:
            log.debug("group %s: Welcome for %s queued", group, remote)
            self._queue(agent, group, self._member(agent, group), welcome, resend=False, devices=remote, welcome=True)

    async def _key_package(self, name: str) -> KeyPackage:
        device, _, agent = name.partition("/")
        if device == self.device:
            if agent not in self.signers:
                raise GroupError(f"{name} is not an agent of this gateway")
            bundle = self._new_bundle(agent)
            held = self.records.key_packages(agent)
            self.records.put_key_packages(agent, [*held, bundle])
            return bundle.key_package
        got = await self.link.fetch_key_package(device, agent)
        raw = got.one_time or got.bundle
        if raw is None:
            raise GroupError(f"no KeyPackage published for {name} (its gateway has never been online?)")
        kp = KeyPackage.from_bytes(raw)
        self.mls_config.identity_validator(kp.leaf_node.credential, kp.leaf_node.signature_key)
        if agent_of(kp.leaf_node.credential) != name:
            raise GroupError(f"the KeyPackage published for {name} belongs to someone else")
        return kp

    async def _self_updates(self) -> None:
        """Every local member commits an update (new path secrets) at least every `self_update_s` seconds."""
        started = time.monotonic()
        while True:
            await asyncio.sleep(min(60.0, self.self_update_s / 4))
            for key in due_for_update(self._last_update, list(self.members), time.monotonic(), started,
                                      self.self_update_s):
                self._last_update[key] = time.monotonic()  # not again before the interval, even on failure
                self._spawn(self._update(*key), "group-self-update")

    async def _update(self, agent: str, group: str) -> None:
        try:
            await self.change(agent, group, update=True)
        except Exception as exc:
            log.warning("group %s: self-update of %s failed: %s", group, agent, exc)

    # -- key rotation --------------------------------------------------------------------------------------------
    def _rotation_signer(self, agent: str, g: Group) -> AgentSigner | None:
        """The agent's current signer if this membership's leaf still holds an older key, else None."""
        current = self.signers.get(agent)
        return current if current is not None and g.signature_key != current.public_key else None

    def _start_rotations(self) -> None:
        now = time.monotonic()
        for (agent, group), g in list(self.members.items()):
            key = (agent, group)
            if self._rotation_signer(agent, g) is None or now < self._rotating.get(key, 0.0):
                continue
            self._rotating[key] = math.inf  # in flight
            self._spawn(self._rotate(agent, group), "group-rotate")

    async def _rotate(self, agent: str, group: str) -> None:
        key = (agent, group)
        try:
            log.info("group %s: moving %s's leaf to its renewed delegated key", group, agent)
            await self.change(agent, group)
            self._rotating.pop(key, None)
            self._rotation_failures.pop(key, None)
        except Exception as exc:
            failures = self._rotation_failures[key] = self._rotation_failures.get(key, 0) + 1
            delay = min(ROTATION_RETRY_MAX_S, ROTATION_RETRY_S * 2 ** (failures - 1))
            self._rotating[key] = time.monotonic() + delay
            log.warning("group %s: key rotation commit of %s failed (retried in %.0f s): %s", group, agent, delay,
                        exc)

    async def _wait_epoch(self, agent: str, group: str, epoch: int) -> None:
        async with self._epoch_changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._epoch_changed.wait_for(
                    lambda: (agent, group) not in self.members or self.members[(agent, group)].epoch >= epoch),
                    COMMIT_WAIT_S)

    async def _notify_epoch(self) -> None:
        async with self._epoch_changed:
            self._epoch_changed.notify_all()

    async def _ctl(self, agent: str, group: str, payload: bytes) -> None:
        try:
            req = json.loads(payload)
            if not isinstance(req, dict):
                raise GroupError("a control message is a JSON object")
            op = req.get("op")
            members = [str(m) for m in req.get("members") or []]
            if op == "create":
                result = self.create(agent, group, [str(a) for a in req.get("admins") or []])
            elif op == "add":
                result = await self.change(agent, group, add=members)
            elif op == "remove":
                result = await self.change(agent, group, remove=members)
            elif op == "update":
                result = await self.change(agent, group, update=True)
            else:
                raise GroupError(f"unknown op {op!r} (create, add, remove)")
            await self._event(agent, group, {"id": req.get("id"), "op": op, "ok": True, **result})
        except Exception as exc:
            log.warning("group control for %s/%s failed: %s", agent, group, exc)
            with contextlib.suppress(Exception):
                req_id = json.loads(payload).get("id") if payload.startswith(b"{") else None
                await self._event(agent, group, {"id": req_id, "ok": False, "error": f"{exc}"})

    async def _event(self, agent: str, group: str, body: dict[str, Any]) -> None:
        with contextlib.suppress(BrokerUnavailable, TimeoutError):
            await self.bridge.publish(f"{self.prefix}/{agent}/group/{group}/events", json.dumps(body).encode(),
                                      content_type="application/json", payload_utf8=True)

    # -- receiving -----------------------------------------------------------------------------------------------
    def receive(self, sender_device: str, data: bytes) -> None:
        """One MLSMessage from the relay (or from a local member): Welcome, commit or application message; or an
        end-to-end GroupAck for our own messages. What is durably taken (inbox, epoch buffer, merged, or refused
        for good) or a known duplicate (same message id) is acknowledged to the sending device."""
        if is_group_ack(data):
            self._on_group_ack(sender_device, data)
            return
        from gateway.protocol.mls.framing import MLSMessage
        from gateway.protocol.mls.welcome_structs import Welcome

        try:
            msg = MLSMessage.from_bytes(data)
        except (MlsError, ValueError) as exc:
            self.counters.dropped += 1
            log.warning("undecodable group message from %s: %s", sender_device, exc)
            return
        msg_id = message_id(data)
        if isinstance(msg.body, Welcome):
            self._receive_welcome(sender_device, msg.body, msg_id)
            return
        group_id = _group_id(msg)
        if group_id is None:
            self.counters.dropped += 1
            return
        group = group_id.decode(errors="replace")
        targets = [a for (a, gname) in self.members if gname == group]
        if not targets:
            # Perhaps for a group a local agent is being added to, whose Welcome (from another sender) is late.
            # Held durably, it counts as seen: a resend is then acknowledged by whichever local agent the Welcome
            # made a member (none yet: no ack, and the sender resends later).
            orphans = self.records.buffer(ORPHANS, group)
            if data not in orphans and len(orphans) < ORPHANS_MAX:
                self.records.put_buffer(ORPHANS, group, [*orphans, data])
                self.records.mark_seen(group, message_id(msg_id + sender_device.encode()))
            return
        # Seen per (message, sending device): a sender's resend is a duplicate (dropped, acknowledged again);
        # the same bytes from another device are a replay that MLS refuses and the audit log records.
        seen_key = message_id(msg_id + sender_device.encode())
        if self.records.seen(group, seen_key):
            self.counters.duplicates += 1
            self._ack_later(sender_device, group, msg_id)
            return
        recent = self._recent.setdefault(group, collections.deque(maxlen=RECENT_MAX))
        recent.append(data)
        before = (self.counters.dropped, self._seq, self.counters.buffered,
                  [self.members[(a, group)].epoch for a in targets])
        with self._batch() if self._dirty is None else contextlib.nullcontext():
            for agent in targets:
                self._process_for(agent, group, data)
            self.records.mark_seen(group, seen_key)
            if sender_device != self.device:
                self._audit_refusal(sender_device, group, msg, targets, before)
        self._ack_later(sender_device, group, msg_id)

    def _process_for(self, agent: str, group: str, data: bytes) -> None:
        g = self.members.get((agent, group))
        if g is None:
            return
        from gateway.protocol.mls.framing import MLSMessage, PublicMessage
        from gateway.protocol.mls.group_state import ApplicationMessage, StagedCommit

        msg = MLSMessage.from_bytes(data)
        epoch = _epoch(msg)
        if epoch > g.epoch:
            buffered = self.records.buffer(agent, group)
            if data not in buffered and len(buffered) < BUFFER_MAX:
                self.records.put_buffer(agent, group, [*buffered, data])
                self.counters.buffered += 1
            return
        try:
            result = g.process(msg, now=self.now_ms() // 1000)
        except MlsError as exc:
            if isinstance(msg.body, PublicMessage):
                # A handshake message the relay ordered into this epoch and we refuse: say so, because the
                # members that accepted it have moved on (a fork only an operator can resolve).
                # (`receive` audits it as group.message_refused.)
                log.warning("group %s: refused a handshake message for %s at epoch %d: %s", group, agent, epoch,
                            exc)
            else:
                log.debug("group %s: message for %s dropped: %s", group, agent, exc)
            return
        if isinstance(result, ApplicationMessage):
            self._accept_application(agent, group, g, result)
        elif isinstance(result, StagedCommit):
            self._merge(agent, group, g, result)
        else:
            self._save(agent, group)

    def _accept_application(self, agent: str, group: str, g: Group, app: ApplicationMessage) -> None:
        tree = g.tree if app.epoch == g.epoch else g.past_epochs()[app.epoch].tree
        leaf = tree.leaf(app.sender)
        sender = agent_of(leaf.credential) if leaf is not None else "?"
        self._save(agent, group)
        if app.authenticated_data.decode(errors="replace") != sender:
            self.counters.dropped += 1
            log.warning("group %s: a message claims %r but is signed by %s", group, app.authenticated_data, sender)
            return
        self._seq += 1
        self.records.put_in(InEntry(os.urandom(16), agent, group, sender, app.epoch, app.data, self._seq))

    def _merge(self, agent: str, group: str, g: Group, staged: StagedCommit) -> None:
        if staged.committer.index is None:  # only members commit here (external commits are refused)
            self.counters.dropped += 1
            log.warning("group %s: refusing a commit without a member sender", group)
            return
        from gateway.protocol.mls.proposals import Update

        committer = g.tree.leaf(LeafIndex(staged.committer.index))
        who = agent_of(committer.credential) if committer is not None else "?"
        # Anything but fresh keys for the committer's own leaf (Update) changes the group: admins only.
        changes = any(not isinstance(p, Update) for p in staged.proposals)
        if changes and who not in admins_of(g.context.extensions):
            self.counters.dropped += 1
            log.warning("group %s: refusing a commit from %s, who is not an admin", group, who)
            return
        g.merge_staged_commit(staged)
        self._spawn(self._notify_epoch(), "group-epoch")
        if not g.active:
            del self.members[(agent, group)]
            self.records.drop_member(agent, group)
            log.info("group %s: %s was removed by %s", group, agent, who)
            self._spawn(self._event(agent, group, {"op": "removed", "by": who}), "group-event")
            return
        self._save(agent, group)
        self._spawn(self._event(agent, group, {"op": "epoch", "epoch": g.epoch, "by": who,
                                               "members": self._member_names(g)}), "group-event")
        self._drain_buffer(agent, group)

    def _drain_buffer(self, agent: str, group: str) -> None:
        g = self.members.get((agent, group))
        buffered = self.records.buffer(agent, group)
        if g is None or not buffered:
            return
        from gateway.protocol.mls.framing import MLSMessage

        ready = [m for m in buffered if _epoch(MLSMessage.from_bytes(m)) <= g.epoch]
        self.records.put_buffer(agent, group, [m for m in buffered if m not in ready])
        for m in sorted(ready, key=lambda m: _epoch(MLSMessage.from_bytes(m))):
            self._process_for(agent, group, m)


def key_fingerprint(public_key: bytes) -> str:
    """How status and `agw group show` name a leaf's signature key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def due_for_update(last: dict[tuple[str, str], float], keys: list[tuple[str, str]], now: float, started: float,
                   interval: float) -> list[tuple[str, str]]:
    """Memberships whose own last commit (or, if none, the service start) is at least `interval` old."""
    return [k for k in keys if now - last.get(k, started) >= interval]


def _sdk_send_id(m: AgentMessage, agent: str, group: str) -> bytes | None:
    """The id an SDK group send is remembered by (its retransmissions carry the same `agw:sdk-id`), or None."""
    value = next((v for k, v in m.user_properties if k == topics.PROP_SDK_ID), None)
    if value is None:
        return None
    try:
        return derive_group_send_id(agent, group, parse_sdk_id(value))
    except ReceiptFormatError:
        return None  # (a malformed id: taken as a message without one, as for pairwise sends)


def _digest(m: AgentMessage) -> bytes:
    h = hashlib.sha256()
    for part in (m.topic.encode(), m.payload):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()[:16]


def _group_to_bytes(g: Group) -> bytes:
    from gateway.protocol.mls.group_persist import group_to_bytes

    return group_to_bytes(g)
