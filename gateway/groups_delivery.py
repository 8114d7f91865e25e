"""The delivery half of the group service: the outbox (group messages some member devices have not received yet,
resent with backoff until expiry), the inbox (decrypted messages handed to the broker, deleted after its
PUBACK) and keeping the relay stocked with each local agent's KeyPackages. `Groups` (gateway/groups.py) mixes
this in; the attributes below are set by its constructor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway import topics
from gateway.bridge import BrokerUnavailable, MqttBridge
from gateway.groups_identity import AgentSigner, capabilities
from gateway.groups_store import GroupRecords, OutEntry
from gateway.link import RelayLink
from gateway.protocol.link import GroupStatus
from gateway.protocol.mls.crypto import CipherSuite
from gateway.protocol.mls.key_package_bundle import KeyPackageBundle, create_key_package

log = logging.getLogger("agw.groups")

KEY_PACKAGES_LOW = 3  # publish more when the relay holds fewer one-time KeyPackages for an agent
KEY_PACKAGES_BATCH = 10
KEY_PACKAGES_MAX_HELD = 100
RETRY_MS = 2_000
RETRY_MAX_MS = 10_000
SEND_BATCH = 256
INBOX_BATCH = 512
ERROR_LOG_INTERVAL_S = 30.0
REPLENISH_S = 30.0


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
    extra: dict[str, int] = field(default_factory=dict)



class GroupDelivery:
    link: RelayLink
    bridge: MqttBridge
    records: GroupRecords
    outbox: dict[bytes, OutEntry]
    signers: dict[str, AgentSigner]
    counters: Counters
    cs: CipherSuite
    prefix: str
    now_ms: Callable[[], int]
    _wake: asyncio.Event
    _inbox_wake: asyncio.Event
    _publishing: set[bytes]

    if TYPE_CHECKING:  # provided by Groups
        def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
            raise NotImplementedError

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

    # -- delivery ------------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        next_replenish = 0.0
        last_error = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            try:
                if self.link.state.value == "ready":
                    await self._send_due()
                    loop_t = asyncio.get_running_loop().time()
                    if loop_t >= next_replenish:
                        next_replenish = loop_t + REPLENISH_S
                        self._spawn(self._replenish_all(), "group-key-packages")
            except Exception as exc:  # e.g. a full disk: retried every second, logged at most every 30 s
                last_error = _log_limited(last_error, "group outbox", exc)

    async def _inbox_loop(self) -> None:
        """Hand decrypted group messages to the broker, apart from the relay's read loop."""
        last_error = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._inbox_wake.wait(), 1.0)
            self._inbox_wake.clear()
            try:
                await self._flush_inbox()
            except Exception as exc:
                last_error = _log_limited(last_error, "group inbox", exc)

    async def _send_due(self) -> None:
        """Hand due outbox entries to the relay, in the order they were made, pipelined (one frame each)."""
        t = self.now_ms()
        due = sorted((e for e in self.outbox.values() if e.next_ms <= t), key=lambda e: e.seq)[:SEND_BATCH]
        expired = [e for e in due if e.expires_ms <= t]
        due = [e for e in due if e.expires_ms > t]
        results = await asyncio.gather(*(self.link.group_send(e.devices, e.entry_id, e.message, resend=e.resend)
                                         for e in due), return_exceptions=True)
        done = [e.entry_id for e in expired]
        with self.records.store.transaction(durable=False):
            self.records.deferred += 1
            try:
                for entry, res in zip(due, results, strict=True):
                    if isinstance(res, BaseException):
                        log.info("group send failed, will retry: %s: %s", type(res).__name__, res)
                    elif res.status is GroupStatus.ACCEPTED:
                        entry.devices = [d for d, _ in res.undelivered]
                    elif res.status is not GroupStatus.RATE_LIMITED:
                        log.warning("the relay refused a group message (%s); dropping it", res.status.name)
                        entry.devices = []
                    if not entry.devices:
                        done.append(entry.entry_id)
                        continue
                    entry.attempts += 1
                    entry.next_ms = t + min(RETRY_MAX_MS, RETRY_MS << min(entry.attempts, 3))
                    self.records.put_out(entry)
                for i in done:
                    self.outbox.pop(i, None)
                self.records.drop_out(done)
            finally:
                self.records.deferred -= 1
                if not self.records.deferred:
                    self.records.flush_index()
        if len(due) == SEND_BATCH:
            self._wake.set()

    async def _flush_inbox(self) -> None:
        """Publish inbox entries in arrival order, pipelined (up to INBOX_BATCH at once); drop the acknowledged."""
        while self.bridge.connected:
            pending = [e for e in self.records.inbox() if e.entry_id not in self._publishing][:INBOX_BATCH]
            if not pending:
                return
            self._publishing.update(e.entry_id for e in pending)
            try:
                results = await asyncio.gather(*(self.bridge.publish(
                    topics.group_inbox_topic(self.prefix, e.agent, e.group), e.payload,
                    user_properties=((topics.PROP_FROM, e.sender), ("agw:group", e.group), ("agw:epoch", str(e.epoch)),
                                     (topics.PROP_MESSAGE_ID, e.entry_id.hex()))) for e in pending),
                    return_exceptions=True)
            finally:
                self._publishing.difference_update(e.entry_id for e in pending)
            done = [e.entry_id for e, r in zip(pending, results, strict=True) if r is None]
            if done:
                with self.records.store.transaction(durable=False):
                    self.records.drop_in(done)
                self.counters.delivered += len(done)
            if len(done) < len(pending):
                failed = next(r for r in results if r is not None)
                if not isinstance(failed, BrokerUnavailable | TimeoutError):
                    raise failed
                return


def _log_limited(last: float, what: str, exc: BaseException) -> float:
    now = time.monotonic()
    if now - last < ERROR_LOG_INTERVAL_S:
        return last
    log.error("%s: %s: %s (retrying; logged at most every %.0f s)", what, type(exc).__name__, exc,
              ERROR_LOG_INTERVAL_S)
    return now
