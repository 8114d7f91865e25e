"""The light half of the group service: what a gateway with agents does before any of them uses a group.

Every agent needs a group signer (its delegated key and certificate chain), KeyPackages stocked at the relay
(so that a peer can add it to a group), its signer following key renewals, and the fleet's CRL followed (the
trust is shared with the pairwise layer). `GroupKeys` does that and imports no more of MLS than KeyPackages.
The rest (gateway/groups.py: the MLS engine, group state, delivery, membership; ~1-2 MB of RSS once imported)
is loaded only when a group is used: a group record in the store at start-up, an agent's publish on a group
topic, a group envelope from the relay (a Welcome, say), or an operator's `agw group ...` request. The service
then becomes a `Groups` in place (`become_full`): same object, same signers, its loops carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.bridge import AgentMessage, MqttBridge
from gateway.config import GatewayConfig
from gateway.device_identity import DeviceIdentity
from gateway.groups_identity import SUITE, AgentSigner, capabilities
from gateway.groups_store import GroupRecords, pack, unpack
from gateway.link import RelayLink
from gateway.protocol.envelope import Envelope
from gateway.protocol.identity.delegation import DelegatedKey
from gateway.protocol.identity.errors import CertificateError
from gateway.protocol.identity.names import check_id
from gateway.protocol.mls.crypto import get_suite
from gateway.protocol.mls.key_package_bundle import KeyPackageBundle, create_key_package
from gateway.store import Store

if TYPE_CHECKING:
    from gateway.groups import Groups

log = logging.getLogger("agw.groups")

KEY_PACKAGES_LOW = 3  # publish more when the relay holds fewer one-time KeyPackages for an agent
KEY_PACKAGES_BATCH = 10
KEY_PACKAGES_MAX_HELD = 100
REPLENISH_S = 30.0
ERROR_LOG_INTERVAL_S = 30.0
ROTATION_POLL_S = 1.0  # how often the delegated key files are looked at (a stat; no hardware operation)
RENEWAL_CHECK_S = 3_600.0  # how often each agent's delegated key is checked for expiry (renewed before it)
REVOCATION_POLL_S = 1.0


class GroupError(ValueError):
    """A group operation cannot be done; the message says why (shown to the agent or the operator)."""


@dataclass
class Counters:
    sent: int = 0
    delivered: int = 0
    commits: int = 0
    commits_lost: int = 0
    joined: int = 0
    refused_joins: int = 0
    dropped: int = 0
    buffered: int = 0
    duplicates: int = 0  # group messages received again (acknowledged again, not delivered again)
    acks_sent: int = 0  # message ids acknowledged to sending devices
    acks_received: int = 0  # (message, device) pairs acknowledged to us
    acks_refused: int = 0  # group acks that did not verify (audited)
    resent: int = 0  # (message, device) pairs sent again for want of an acknowledgement
    held_republished: int = 0  # group messages held for an acknowledging agent, published to it again
    held_expired: int = 0  # ... deleted unacknowledged at their expiry
    held_not_kept_over_cap: int = 0  # ... not kept: a cap was reached (messages or bytes per agent, bytes in all)
    extra: dict[str, int] = field(default_factory=dict)


class GroupKeys:
    """The daemon's `GroupService` (gateway/group_hooks.py) until a group is used; then a `Groups`."""

    def __init__(self, store: Store, identity: DeviceIdentity, link: RelayLink, bridge: MqttBridge,
                 cfg: GatewayConfig, now_ms: Callable[[], int]) -> None:
        self.store, self.identity, self.link, self.bridge, self.cfg, self.now_ms = (
            store, identity, link, bridge, cfg, now_ms)
        self.device = identity.device.device_id
        self.prefix = cfg.mqtt.topic_prefix
        self.cs = get_suite(SUITE)
        self.records = GroupRecords(store)
        self.signers: dict[str, AgentSigner] = {}
        self.retired: dict[str, list[AgentSigner]] = {}
        """Older signers of each agent still held by a membership's leaf or a KeyPackage (until rotated away)."""
        self.members: dict[tuple[str, str], Any] = {}  # (agent, group) -> MLS Group; none in this half
        self.counters = Counters()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._key_loops = False  # `_rotations` and `_revocations` run (started by this half)
        # agent -> the groups whose messages it acknowledges (the daemon's, from its announcements: receipts.py)
        self.acking_groups: dict[str, frozenset[str]] = {}

    # -- start-up and the switch to the full service -------------------------------------------------------------
    async def start(self) -> None:
        for agent in self.cfg.agents:
            await self._load_signer(agent)
        index = self.records.index
        if index.members or index.out or index.inbox or index.invites:
            self.become_full()
            return
        for agent in self.signers:
            self._prune_retired(agent)
        self._key_loops = True
        self._spawn(self._rotations(), "group-rotations")
        self._spawn(self._revocations(), "group-revocations")
        self._spawn(self._key_package_loop(), "group-key-packages")
        log.info("groups: no membership; the group service loads when a group is used")

    def become_full(self) -> Groups:
        """Turn this object into the full service (importing it), keeping its signers and running loops."""
        from gateway.groups import Groups

        if not isinstance(self, Groups):
            log.info("groups: a group is used; loading the group service")
            light = type(self)
            self.__class__ = Groups
            try:
                self._init_service()
                self._start_service()
            except BaseException:
                # (e.g. a store error reading the boxes): stay the light service, so that the next use loads it
                # again and starts its loops, instead of a Groups whose delivery loops never started.
                with contextlib.suppress(ValueError, AttributeError):
                    self.bridge.on_session_lost.remove(self._broker_lost_session)
                self.__class__ = light
                raise
        return self

    # -- daemon hooks (until a group is used) --------------------------------------------------------------------
    async def on_agent_messages(self, messages: list[AgentMessage]) -> list[tuple[AgentMessage, str]]:
        return await self.become_full().on_agent_messages(messages)

    async def on_envelopes(self, envelopes: list[Envelope]) -> None:
        await self.become_full().on_envelopes(envelopes)

    async def on_link_event(self, event: object) -> None:
        return None

    async def on_link_ready(self) -> None:
        self._spawn(self._replenish_all(), "group-key-packages")

    def control(self, request: dict[str, Any]) -> Any:
        """The operator's read-only requests are answered here (no group exists yet: nothing to list or show), so
        that `agw group list` on a device whose agents use no group does not load the group service; the others
        load it. Same answers and errors as `Groups.control`."""
        cmd = str(request.get("cmd", ""))
        if cmd == "group.list":
            return []
        if cmd == "group.op":
            raise GroupError(f"unknown operation {request.get('op')!r}")
        if cmd == "group.show":
            agent, group = str(request.get("agent", "")), str(request.get("group", ""))
            if agent not in self.cfg.agents:
                raise GroupError(f"{agent!r} is not an agent of this gateway")
            check_id("group", group)
            raise GroupError(f"{agent} is not a member of group {group}")
        return self.become_full().control(request)

    def acked(self, agent: str, ids: list[bytes]) -> list[bytes]:
        return ids  # (no group inbox entry exists before the full service is loaded)

    def republish_held(self, agent: str | None = None, *, before_connect: int | None = None,
                       before: float | None = None) -> None:
        return None

    def expire_held(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"memberships": [], "outbox": 0, "held": 0,
                "counters": {k: v for k, v in vars(self.counters).items() if k != "extra"}}

    async def _key_package_loop(self) -> None:
        """Every REPLENISH_S while the link is up, until the full service (its own loop does it) takes over."""
        while True:
            await asyncio.sleep(REPLENISH_S)
            if type(self) is not GroupKeys:
                return
            if self.link.state.value == "ready":
                await self._replenish_all()

    # -- signers -------------------------------------------------------------------------------------------------
    async def _load_signer(self, agent: str) -> None:
        raw = self.records.signer(agent)
        retired = self.records.secrets.get(f"grp/signer-retired/{agent}")
        self.retired[agent] = [AgentSigner.from_bytes(r) for r in unpack(retired)] if retired else []
        if raw is not None:
            self.signers[agent] = AgentSigner.from_bytes(raw)
            try:
                await self._refresh_signer(agent)  # a key renewed while the daemon was down
            except Exception as exc:  # not fatal: checked again on the next file change and hourly
                log.warning("delegated key of %s not checked at start-up: %s", agent, exc)
            return
        key = await asyncio.to_thread(self.identity.delegated_key, agent=agent)
        signer = self._agent_signer(agent, key)
        self.records.put_signer(agent, signer.to_bytes())
        self.signers[agent] = signer

    def _agent_signer(self, agent: str, key: DelegatedKey) -> AgentSigner:
        chain = (key.certificate.public_bytes(Encoding.DER), self.identity.certificate.public_bytes(Encoding.DER))
        return AgentSigner(agent, key.raw_private_key(), chain)

    def _all_signers(self, agent: str) -> list[AgentSigner]:
        """The agent's current signer first, then the retired ones still in use."""
        return [self.signers[agent], *self.retired.get(agent, [])]

    def signer_for(self, agent: str, public_key: bytes) -> AgentSigner | None:
        """The agent's signer (current or retired) holding `public_key`."""
        return next((s for s in self._all_signers(agent) if s.public_key == public_key), None)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- KeyPackages ---------------------------------------------------------------------------------------------
    def _new_bundle(self, agent: str) -> KeyPackageBundle:
        s = self.signers[agent]
        return create_key_package(self.cs, s.signer, s.credential, capabilities=capabilities())

    async def _replenish_all(self) -> None:
        for agent in list(self.signers):
            await self._replenish(agent)

    async def _replenish(self, agent: str) -> None:
        """Keep the relay stocked with this agent's KeyPackages (and a last-resort one)."""
        try:
            last = self.records.last_resort(agent)
            if last is None:
                last = self._new_bundle(agent)
                self.records.put_last_resort(agent, last)
            remaining = await self.link.publish_key_packages(agent, last.key_package.to_bytes(), [])
            if remaining >= KEY_PACKAGES_LOW:
                return
            held = self.records.key_packages(agent)
            fresh = [self._new_bundle(agent) for _ in range(KEY_PACKAGES_BATCH)]
            self.records.put_key_packages(agent, [*held, *fresh][-KEY_PACKAGES_MAX_HELD:])
            await self.link.publish_key_packages(agent, b"", [b.key_package.to_bytes() for b in fresh])
        except Exception as exc:
            log.warning("publishing KeyPackages for %s failed: %s", agent, exc)

    # -- key renewal and revocation ------------------------------------------------------------------------------
    async def _rotations(self) -> None:
        """Follow each agent's delegated key: notice a renewal on disk (a stat per second, no hardware), renew
        keys near expiry (hourly check), and have every membership whose leaf holds an older key commit the
        new one (retried after ROTATION_RETRY_S, doubling, until it lands)."""
        stamps: dict[str, tuple[int, int] | None] = {}
        next_renewal = time.monotonic() + RENEWAL_CHECK_S  # start() checked expiry already
        last_error = 0.0
        while True:
            try:
                renew = time.monotonic() >= next_renewal
                if renew:
                    next_renewal = time.monotonic() + RENEWAL_CHECK_S
                for agent in list(self.signers):
                    stamp = self.identity.delegated_stamp(agent)
                    if renew or stamps.setdefault(agent, stamp) != stamp:
                        stamps[agent] = stamp
                        await self._refresh_signer(agent)
                    if renew:
                        self._prune_retired(agent)  # retired keys go once nothing needs them, not at restart
                if self.link.state.value == "ready":
                    self._start_rotations()
            except Exception as exc:  # e.g. the token is busy: tried again on the next change or hourly check
                last_error = _log_limited(last_error, "delegated key check", exc)
            await asyncio.sleep(ROTATION_POLL_S)

    async def _refresh_signer(self, agent: str) -> bool:
        """Adopt the agent's delegated key if the one on disk is newer than our signer's (renewed by the
        operator or the daemon), renewing it first (one hardware signature) if it is near expiry. Returns
        whether the signer changed; the memberships then rotate (`_rotations`)."""
        current = self.signers[agent]
        cert = await asyncio.to_thread(self.identity.delegated_certificate, agent)
        now = dt.datetime.now(dt.UTC)
        near_expiry = cert is None or cert.not_valid_after_utc - now < self.identity.renew_before
        if not near_expiry and (cert is None or not _newer(cert, current.certificate)):
            return False
        key = await asyncio.to_thread(self.identity.delegated_key, agent=agent)  # renews when near expiry
        if not _newer(key.certificate, current.certificate):
            return False
        self._install_signer(agent, self._agent_signer(agent, key))
        return True

    def _install_signer(self, agent: str, signer: AgentSigner) -> None:
        """The agent signs new leaves and KeyPackages with `signer`; the old signer is retired (kept while a leaf
        or KeyPackage holds its key). The old last-resort KeyPackage stays openable among the held ones."""
        old = self.signers[agent]
        with self.store.transaction():
            self.signers[agent] = signer
            self.retired[agent] = [old, *self.retired.get(agent, [])]
            self.records.put_signer(agent, signer.to_bytes())
            self._save_retired(agent)
            last = self.records.last_resort(agent)
            if last is not None:
                held = self.records.key_packages(agent)
                self.records.put_key_packages(agent, [*held, last][-KEY_PACKAGES_MAX_HELD:])
            self.records.put_last_resort(agent, self._new_bundle(agent))
        log.info("delegated key of %s renewed (certificate serial %#x, valid until %s): its leaves follow", agent,
                 signer.certificate.serial_number, signer.certificate.not_valid_after_utc.isoformat())
        self._spawn(self._replenish(agent), "group-key-packages")  # publishes the new last-resort KeyPackage

    def _save_retired(self, agent: str) -> None:
        self.records.secrets.put(f"grp/signer-retired/{agent}", pack([s.to_bytes() for s in self.retired[agent]]))

    def _prune_retired(self, agent: str) -> None:
        """Forget retired signers no membership leaf and no held KeyPackage (or invitation) still needs. Held
        KeyPackages whose certificate expired are dropped first: no adder accepts them any more."""
        if not self.retired.get(agent) or any(a == agent for a, _ in self.records.index.invites):
            return
        now = dt.datetime.now(dt.UTC)
        held = self.records.key_packages(agent)
        usable = [b for b in held if _certificate_of(b.key_package.leaf_node.credential.certificates[0])
                  .not_valid_after_utc > now]
        if len(usable) != len(held):
            self.records.put_key_packages(agent, usable)
        used = {g.signature_key for (a, _), g in self.members.items() if a == agent}
        used |= {b.key_package.leaf_node.signature_key for b in usable}
        keep = [s for s in self.retired[agent] if s.public_key in used]
        if len(keep) != len(self.retired[agent]):
            log.info("%d retired delegated key(s) of %s no longer used by any leaf or KeyPackage: forgotten",
                     len(self.retired[agent]) - len(keep), agent)
            self.retired[agent] = keep
            self._save_retired(agent)

    async def _revocations(self) -> None:
        """Watch the CRL in the state directory: when it changes, load it (the fleet trust is shared with the
        pairwise layer) and have every local admin remove the members whose certificates it revokes."""
        path = self.cfg.paths.state_dir / "crl.pem"
        stamp = None
        while True:
            await asyncio.sleep(REVOCATION_POLL_S)
            try:
                st = path.stat()
            except OSError:
                continue
            if (st.st_mtime_ns, st.st_size) == stamp:
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            try:
                self.identity.trust = self.identity.trust.with_crl(path.read_bytes())
            except CertificateError as exc:
                log.error("%s: CRL not loaded: %s", path, exc)
                continue
            for (agent, group), names in self.revoked_members().items():
                log.warning("group %s: removing revoked members %s", group, ", ".join(names))
                self._spawn(self._remove_revoked(agent, group, names), "group-revoke")

    def revoked_members(self) -> dict[tuple[str, str], list[str]]:
        """No memberships in this half (gateway/groups_membership.py names the revoked members of groups)."""
        return {}

    async def _remove_revoked(self, agent: str, group: str, names: list[str]) -> None:
        raise NotImplementedError  # (only called for a member of `revoked_members`)

    def _start_rotations(self) -> None:
        """Memberships whose leaf holds an older key commit the new one: none in this half."""
        return None


def _certificate_of(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def _newer(cert: x509.Certificate, than: x509.Certificate) -> bool:
    """A different key, certified no earlier than `than`: a renewal to adopt."""
    raw = cert.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    old = than.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return raw != old and cert.not_valid_before_utc >= than.not_valid_before_utc


def _log_limited(last: float, what: str, exc: BaseException) -> float:
    now = time.monotonic()
    if now - last < ERROR_LOG_INTERVAL_S:
        return last
    log.error("%s: %s: %s (retrying; logged at most every %.0f s)", what, type(exc).__name__, exc,
              ERROR_LOG_INTERVAL_S)
    return now
