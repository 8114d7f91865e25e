"""The membership half of the group service: joining from a Welcome (with the operator's consent, and the
messages that arrived before it), and removing members whose device the fleet CA revoked. `Groups`
(gateway/groups.py) mixes this in; the attributes below are set by its constructor.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from cryptography import x509

from gateway.config import GatewayConfig
from gateway.device_identity import DeviceIdentity
from gateway.groups_identity import AgentSigner, admins_of, agent_of
from gateway.groups_keys import Counters
from gateway.groups_store import GroupRecords, bundle_from_bytes, bundle_to_bytes, pack, unpack
from gateway.protocol.identity.errors import BadName, CertificateError, CertificateRevoked
from gateway.protocol.identity.names import check_id
from gateway.protocol.message import InnerMessage, Kind, new_message_id
from gateway.protocol.mls.crypto import CipherSuite, Ed25519Signer
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.key_package_bundle import KeyPackageBundle
from gateway.protocol.mls.tree_math import LeafIndex
from gateway.store import ConsentState, Store

if TYPE_CHECKING:  # the MLS engine is imported where first used (see gateway/groups.py)
    from gateway.protocol.mls.framing import MLSMessage
    from gateway.protocol.mls.group import Group, GroupConfig
    from gateway.protocol.mls.welcome_structs import Welcome

log = logging.getLogger("agw.groups")

ORPHANS = "_"  # buffer owner for messages of groups no local agent is in (yet); not a valid agent name
ORPHANS_MAX = 200
INVITATION_POLL_S = 1.0
RECENT_MAX = 256  # per group, in memory: replayed to a local agent whose Welcome came after them


class GroupMembership:
    store: Store
    identity: DeviceIdentity
    cfg: GatewayConfig
    records: GroupRecords
    signers: dict[str, AgentSigner]
    members: dict[tuple[str, str], Group]
    counters: Counters
    cs: CipherSuite
    mls_config: GroupConfig
    _recent: dict[str, collections.deque[bytes]]
    now_ms: Callable[[], int]

    if TYPE_CHECKING:  # provided by Groups and GroupDelivery
        def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
            raise NotImplementedError

        def _process_for(self, agent: str, group: str, data: bytes) -> None:
            raise NotImplementedError

        async def _event(self, agent: str, group: str, body: dict[str, Any]) -> None:
            raise NotImplementedError

        async def _replenish(self, agent: str) -> None:
            raise NotImplementedError

        def _member_names(self, g: Group) -> list[str]:
            raise NotImplementedError

        def _me(self, agent: str) -> str:
            raise NotImplementedError

        def signer_for(self, agent: str, public_key: bytes) -> AgentSigner | None:
            raise NotImplementedError

        def _batch(self) -> contextlib.AbstractContextManager[None]:
            raise NotImplementedError

        async def change(self, agent: str, group: str, *, add: list[str] | None = None,
                         remove: list[str] | None = None, update: bool = False) -> dict[str, Any]:
            raise NotImplementedError

    def _on_welcome(self, welcome: Welcome) -> None:
        """A Welcome may name several local agents (one KeyPackage each): each joins on its own, then processes
        what arrived for the group before the Welcome."""
        from gateway.protocol.mls.welcome import open_welcome

        joined: dict[str, list[str]] = {}
        for agent in self.signers:
            held = self.records.key_packages(agent)
            last = self.records.last_resort(agent)
            for bundle in [*held, *([last] if last else [])]:
                try:
                    opened = open_welcome(self.cs, welcome, bundle.key_package, bundle.init_priv)
                except MlsError:
                    continue
                group = self._join(agent, welcome, bundle, opened.group_info.signer, held)
                if group is not None:
                    joined.setdefault(group, []).append(agent)
                break
        if not joined:
            log.debug("a Welcome that no local agent joined (%d secrets)", len(welcome.secrets))
        for group, agents in joined.items():
            self._replay_backlog(group, agents)

    def _replay_backlog(self, group: str, agents: list[str]) -> None:
        """What arrived before the Welcome: for no local member (orphans), or already taken by a local member
        that joined earlier (recent). Epoch order; what is too old fails harmlessly."""
        orphans = self.records.buffer(ORPHANS, group)
        self.records.put_buffer(ORPHANS, group, [])
        backlog = list(dict.fromkeys([*self._recent.get(group, ()), *orphans]))
        from gateway.protocol.mls.framing import MLSMessage

        with self._batch():
            for m in sorted(backlog, key=lambda m: _epoch(MLSMessage.from_bytes(m))):
                for agent in agents:
                    self._process_for(agent, group, m)

    def _join(self, agent: str, welcome: Welcome, bundle: KeyPackageBundle, adder_leaf: int,
              held: list[KeyPackageBundle]) -> str | None:
        """Join if the operator allows the adder; returns the group joined, or None. The KeyPackage may carry a
        delegated key renewed since (a retired signer): the leaf then moves to the current key by a commit."""
        from gateway.protocol.mls.group import Group

        try:
            g = Group.join(welcome, bundle, self._bundle_signer(agent, bundle), config=self.mls_config)
        except MlsError as exc:
            log.warning("a Welcome for %s failed: %s", agent, exc)
            return None
        group = g.group_id.decode(errors="replace")
        adder_node = g.tree.leaf(LeafIndex(adder_leaf))
        adder = agent_of(adder_node.credential) if adder_node is not None else "?"
        with self.store.transaction():
            if bundle in held:
                self.records.put_key_packages(agent, [b for b in held if b != bundle])
            try:
                check_id("group", group)
            except BadName:
                self.counters.refused_joins += 1
                return None
            if not self._consents(agent, adder):
                self.counters.refused_joins += 1
                self.store.audit.append({"type": "group.join_refused", "agent": agent, "group": group,
                                         "by": adder}, self.now_ms())
                log.info("group %s: %s was added by %s without consent; held until the operator decides (agw "
                         "consent allow|deny --agent %s --peer %s)", group, agent, adder, agent, adder)
                if self.store.consent.state(agent, adder) is not ConsentState.DENIED:
                    self._hold_invitation(agent, group, adder, welcome, bundle)
                return None
            if (agent, group) in self.members:
                return None
            self._admit(agent, group, g, adder)
        return group

    def _admit(self, agent: str, group: str, g: Group, adder: str) -> None:
        from gateway.protocol.mls.group_persist import group_to_bytes

        self.members[(agent, group)] = g
        self.records.put_member(agent, group, group_to_bytes(g))
        self.store.audit.append({"type": "group.joined", "agent": agent, "group": group, "by": adder},
                                self.now_ms())
        self.counters.joined += 1
        self._spawn(self._event(agent, group, {"op": "joined", "by": adder, "epoch": g.epoch,
                                               "members": self._member_names(g)}), "group-event")
        self._spawn(self._replenish(agent), "group-key-packages")

    def _hold_invitation(self, agent: str, group: str, adder: str, welcome: Welcome, bundle: KeyPackageBundle
                         ) -> None:
        """Keep the Welcome (and the KeyPackage it opens) until the operator decides; the request shows in
        `agw consent list`, and on `allow` the agent also gets a note in its inbox (the held first message)."""
        self.records.put_invitation(agent, group, pack([welcome.to_bytes(), bundle_to_bytes(bundle),
                                                        adder.encode()]))
        adder_agent = adder.partition("/")[2]
        t = self.now_ms()
        note = InnerMessage(kind=Kind.DATA, message_id=new_message_id(), sender_agent=adder_agent,
                            recipient_agent=agent, created_at_ms=t, expires_at_ms=t + 7 * 86_400_000,
                            payload=json.dumps({"op": "group-invitation", "group": group, "by": adder}).encode(),
                            content_type="application/json", payload_utf8=True)
        self.store.consent.request(agent, adder, note.encode(), t)

    async def _invitations(self) -> None:
        """Join held invitations once the operator allowed the adder; forget them once denied."""
        while True:
            await asyncio.sleep(INVITATION_POLL_S)
            for agent, group in sorted(self.records.index.invites):
                try:
                    self._decide_invitation(agent, group)
                except Exception as exc:
                    log.warning("group %s: held invitation for %s failed: %s", group, agent, exc)
                    self.records.drop_invitation(agent, group)

    def _decide_invitation(self, agent: str, group: str) -> None:
        raw = self.records.invitation(agent, group)
        if raw is None or agent not in self.signers or (agent, group) in self.members:
            self.records.drop_invitation(agent, group)
            return
        welcome_raw, bundle_raw, adder_raw = unpack(raw)
        adder = adder_raw.decode()
        if self.store.consent.state(agent, adder) is ConsentState.DENIED:
            self.records.drop_invitation(agent, group)
            return
        if not self._consents(agent, adder):
            return
        from gateway.protocol.mls.group import Group
        from gateway.protocol.mls.welcome_structs import Welcome

        welcome = Welcome.from_bytes(welcome_raw)
        bundle = bundle_from_bytes(bundle_raw)
        g = Group.join(welcome, bundle, self._bundle_signer(agent, bundle), config=self.mls_config)
        with self.store.transaction():
            self._admit(agent, group, g, adder)
            self.records.drop_invitation(agent, group)
        log.info("group %s: %s joined after the operator allowed %s", group, agent, adder)
        self._replay_backlog(group, [agent])

    def _bundle_signer(self, agent: str, bundle: KeyPackageBundle) -> Ed25519Signer:
        signer = self.signer_for(agent, bundle.key_package.leaf_node.signature_key)
        if signer is None:
            raise MlsError(f"the KeyPackage used for {agent} holds a delegated key this gateway no longer has")
        return signer.signer

    def revoked_members(self) -> dict[tuple[str, str], list[str]]:
        """Members whose certificate chain the current CRL revokes, per group a local agent administers."""
        trust, now = self.identity.trust, dt.datetime.now(dt.UTC)
        out: dict[tuple[str, str], list[str]] = {}
        for (agent, group), g in self.members.items():
            if self._me(agent) not in admins_of(g.context.extensions):
                continue
            for _, leaf in g.members():
                try:
                    trust.verify_chain([x509.load_der_x509_certificate(c) for c in leaf.credential.certificates],
                                       now=now)
                except CertificateRevoked:
                    out.setdefault((agent, group), []).append(agent_of(leaf.credential))
                except (CertificateError, ValueError):
                    continue  # expiry and the like: the member's own gateway renews; not a removal
        return out

    async def _remove_revoked(self, agent: str, group: str, names: list[str]) -> None:
        try:
            await self.change(agent, group, remove=names)
        except Exception as exc:
            log.error("group %s: removing revoked members failed: %s", group, exc)

    def _consents(self, agent: str, adder: str) -> bool:
        """An agent joins only groups its operator allowed the adder to put it in: the allow list (auto-accept)
        or an `agw consent allow` decision. Adding itself (a local create) is always fine."""
        if adder == self._me(agent):
            return True
        state = self.store.consent.state(agent, adder)
        if state is ConsentState.DENIED:
            return False
        allow = self.cfg.agents[agent].allow if agent in self.cfg.agents else []
        return state is ConsentState.ALLOWED or adder in allow or f"{adder.split('/')[0]}/*" in allow


def _group_id(msg: MLSMessage) -> bytes | None:
    from gateway.protocol.mls.framing import PrivateMessage, PublicMessage

    body = msg.body
    if isinstance(body, PublicMessage):
        return body.content.group_id
    if isinstance(body, PrivateMessage):
        return body.group_id
    return None


def _epoch(msg: MLSMessage) -> int:
    from gateway.protocol.mls.framing import PrivateMessage, PublicMessage

    body = msg.body
    if isinstance(body, PublicMessage):
        return body.content.epoch
    if isinstance(body, PrivateMessage):
        return body.epoch
    return 0
