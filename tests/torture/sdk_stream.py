"""SDK agents for the stream tests: an `AgentClient` in a thread of its own (its own event loop), sending a
numbered stream with a window of concurrent `send()` calls and recording, at the application level, every
message `messages()` hands over. With `group` set: `send_group()` and `group_messages()` instead.

A payload counts as sent once `send()` returned (the gateway's receipt came: the gateway has it durably). What
the application received is counted after the SDK's own duplicate filter: that is what the application sees.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.client import AgentClient
from tests.torture.stream import PASSWORD

T = TypeVar("T")


@dataclass
class SdkAgent:
    agent: str
    port: int
    peer: str  # <device>/<agent>
    window: int = 64  # send() calls in flight at once
    group: str | None = None  # a group stream: send_group() to it, group_messages() of it
    receipt_timeout: float = 2.0
    sent: list[bytes] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, timeout: float = 30.0) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True,
                                        name=f"sdk-{self.agent}")
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"SDK agent {self.agent} did not connect within {timeout} s")
        if self._error is not None:
            raise self._error

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with AgentClient(self.agent, port=self.port, password=PASSWORD,
                                   receipt_timeout=self.receipt_timeout) as client:
                self.client = client
                receiving = asyncio.create_task(self._receive(client))
                self._ready.set()
                await self._stop.wait()
                receiving.cancel()
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine (e.g. a group call of `self.client`) on this agent's loop, from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _receive(self, client: AgentClient) -> None:
        async for m in (client.group_messages(self.group) if self.group else client.messages()):
            with self.lock:
                self.received.append(m.payload)

    def run(self, prefix: bytes, n: int, on_progress: Callable[[int], None] = lambda _i: None,
            hold_at: int | None = None) -> None:
        """Send `n` numbered payloads (blocking the calling thread until every send() returned). With `hold_at`:
        payloads from number `hold_at` on wait until `allow()` lets them go."""
        self._allowed = n if hold_at is None else hold_at
        self._more = asyncio.Event()
        asyncio.run_coroutine_threadsafe(self._stream(prefix, n, on_progress), self._loop).result()

    def allow(self, up_to: int) -> None:
        """Let payloads numbered below `up_to` go (from any thread)."""
        self._loop.call_soon_threadsafe(self._raise_allowance, up_to)

    def _raise_allowance(self, up_to: int) -> None:
        if up_to > self._allowed:
            self._allowed = up_to
            self._more.set()
            self._more = asyncio.Event()

    async def _stream(self, prefix: bytes, n: int, on_progress: Callable[[int], None]) -> None:
        room = asyncio.Semaphore(self.window)
        done = 0

        async def one(i: int, payload: bytes) -> None:
            nonlocal done
            async with room:
                while i >= self._allowed:
                    await self._more.wait()
                if self.group:
                    await self.client.send_group(self.group, payload)
                else:
                    await self.client.send(self.peer, payload)
            with self.lock:
                self.sent.append(payload)
            done += 1
            on_progress(done)

        await asyncio.gather(*(one(i, prefix + str(i).encode()) for i in range(n)))

    def received_with(self, prefix: bytes) -> list[bytes]:
        with self.lock:
            return [p for p in self.received if p.startswith(prefix)]

    def stop(self) -> None:
        if getattr(self, "_loop", None) is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)


@dataclass(frozen=True)
class AppTally:
    """One direction of an SDK stream, as the applications saw it."""

    sent: int  # send() returned
    delivered: int  # distinct payloads handed to the receiving application
    duplicated: int  # payloads handed over more than once
    lost: int
    foreign: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def app_tally(sent: list[bytes], received: list[bytes]) -> AppTally:
    counts = Counter(received)
    sent_set = set(sent)
    return AppTally(sent=len(sent), delivered=len(counts.keys() & sent_set),
                    duplicated=sum(1 for c in counts.values() if c > 1), lost=len(sent_set - counts.keys()),
                    foreign=len(counts.keys() - sent_set))
