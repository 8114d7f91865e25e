"""A malicious relay: a WebSocket proxy with the relay's own TLS key, between the gateways and the real relay.

It passes authentication through untouched (so gateways connect as usual), then tampers with what the relay
delivers: it duplicates, replays later, reorders, drops, truncates and modifies envelopes, swaps the recipient
(hands a copy to another device) and swaps the sender (claims another device wrote it). It keeps the genuine
envelopes it saw so a test can replay them much later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import threading
from collections import Counter
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from gateway.protocol.envelope import Envelope
from gateway.protocol.link import AuthOk, Deliver, LinkLimits, decode_frame, encode_frame

LIMITS = LinkLimits()
ACTIONS = ["duplicate", "replay_later", "reorder", "drop", "truncate", "modify", "swap_recipient", "swap_sender"]


async def _send(ws: ServerConnection, data: bytes) -> None:
    """Send to another gateway's connection, which may have gone away meanwhile."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(data)


class EvilRelay:
    def __init__(self, listen_port: int, relay_port: int, cert: Path, key: Path, ca: Path) -> None:
        self.listen_port, self.relay_port = listen_port, relay_port
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(str(cert), str(key))
        self.client_ctx = ssl.create_default_context(cafile=str(ca))
        self.tamper = False
        self.actions: Counter[str] = Counter()
        self.captured: list[Envelope] = []  # genuine envelopes seen on the way to gateways
        self.gateways: dict[str, ServerConnection] = {}
        self._n = 0
        self._held: list[tuple[ServerConnection, bytes]] = []
        self._later: list[tuple[ServerConnection, bytes]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the evil relay did not start")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self._handle, "127.0.0.1", self.listen_port, ssl=self.server_ctx, compression=None,
                         max_size=None):
            self._ready.set()
            await self._stop.wait()

    def replay(self, device: str, envelopes: list[Envelope]) -> bool:
        """Deliver `envelopes` to `device` again, from the proxy's loop; False if its link is down right now."""
        async def send() -> bool:
            ws = self.gateways.get(device)
            if ws is None:
                return False
            try:
                await ws.send(encode_frame(Deliver(tuple(envelopes))))
            except ConnectionClosed:
                return False
            return True
        return asyncio.run_coroutine_threadsafe(send(), self._loop).result(30)

    async def _handle(self, down: ServerConnection) -> None:
        try:
            async with connect(f"wss://127.0.0.1:{self.relay_port}/", ssl=self.client_ctx, compression=None,
                               max_size=None) as up:
                device: list[str] = []

                async def upward() -> None:
                    try:
                        async for msg in down:
                            await up.send(msg)
                    except ConnectionClosed:
                        pass

                async def downward() -> None:
                    try:
                        async for msg in up:
                            data = bytes(msg)  # type: ignore[arg-type]
                            try:
                                frame = decode_frame(data, LIMITS)
                            except Exception:  # pass through what we do not understand
                                await down.send(data)
                                continue
                            if isinstance(frame, AuthOk):
                                device.append(frame.device_id)
                                self.gateways[frame.device_id] = down
                            if isinstance(frame, Deliver) and device:
                                self.captured += frame.envelopes
                                await self._deliver(down, device[0], frame)
                            else:
                                await down.send(data)
                    except ConnectionClosed:
                        pass

                tasks = [asyncio.create_task(upward()), asyncio.create_task(downward())]
                _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in pending:
                    t.cancel()
        except (ConnectionClosed, OSError):
            pass

    async def _deliver(self, down: ServerConnection, device: str, frame: Deliver) -> None:
        data = encode_frame(frame)
        for ws, held in self._held:  # "reorder": a held frame goes out after the next one
            await _send(ws, held)
        self._held.clear()
        if not self.tamper:
            await down.send(data)
            return
        action = ACTIONS[self._n % len(ACTIONS)]
        self._n += 1
        self.actions[action] += 1
        if self._n % 7 == 0:
            for ws, later in self._later:  # "replay_later": old frames come back a while afterwards
                await _send(ws, later)
            self._later.clear()
        envs = list(frame.envelopes)
        if action == "duplicate":
            await down.send(data)
            await down.send(data)
        elif action == "replay_later":
            await down.send(data)
            self._later.append((down, data))
        elif action == "reorder":
            self._held.append((down, data))
        elif action == "drop":
            pass
        elif action in ("truncate", "modify"):
            e = envs[0]
            ct = e.ciphertext[: len(e.ciphertext) // 2] if action == "truncate" else \
                e.ciphertext[:-40] + bytes([e.ciphertext[-40] ^ 1]) + e.ciphertext[-39:]
            envs[0] = dataclasses.replace(e, ciphertext=ct)
            await down.send(encode_frame(Deliver(tuple(envs))))
        elif action == "swap_recipient":
            await down.send(data)
            others = [d for d in self.gateways if d not in (device, envs[0].sender)]
            if others:
                stolen = [dataclasses.replace(e, recipient=others[0]) for e in envs]
                await _send(self.gateways[others[0]], encode_frame(Deliver(tuple(stolen))))
        elif action == "swap_sender":
            others = [d for d in self.gateways if d not in (device, envs[0].sender)]
            if others:
                envs = [dataclasses.replace(e, sender=others[0]) for e in envs]
            await down.send(encode_frame(Deliver(tuple(envs))))
        else:
            await down.send(data)
