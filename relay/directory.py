"""The in-memory directory of public key material: pairwise prekey bundles and MLS KeyPackages (per agent).

Each (kind, device) holds one bundle (replaced on publish) and a queue of one-time entries. A fetch returns the
bundle and pops at most one one-time entry, so each is handed out exactly once (asyncio runs one fetch at a
time, so no lock is needed). Nothing is written to disk: after a relay restart gateways publish again on
connect. Memory is bounded by `max_devices` (least recently published forgotten) and `max_one_time`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from gateway.protocol.link import DirectoryKind


@dataclass(slots=True)
class _Entry:
    bundle: bytes
    one_time: deque[bytes] = field(default_factory=deque)


class Directory:
    def __init__(self, *, max_devices: int = 100_000, max_one_time: int = 200) -> None:
        self._entries: OrderedDict[tuple[DirectoryKind, str], _Entry] = OrderedDict()
        self.max_devices = max_devices
        self.max_one_time = max_one_time

    def publish(self, kind: DirectoryKind, device_id: str, bundle: bytes, one_time: tuple[bytes, ...]) -> int:
        """Replace the bundle and add one-time entries (oldest dropped beyond the cap); returns how many remain."""
        key = (kind, device_id)
        entry = self._entries.pop(key, None)
        if entry is None:
            entry = _Entry(bundle, deque(maxlen=self.max_one_time))
        entry.bundle = bundle
        entry.one_time.extend(one_time)
        self._entries[key] = entry
        while len(self._entries) > self.max_devices:
            self._entries.popitem(last=False)
        return len(entry.one_time)

    def fetch(self, kind: DirectoryKind, device_id: str) -> tuple[bytes | None, bytes | None]:
        """The bundle and one one-time entry, removed from the directory; (None, None) if nothing is published."""
        entry = self._entries.get((kind, device_id))
        if entry is None:
            return None, None
        return entry.bundle, entry.one_time.popleft() if entry.one_time else None

    def publish_key_packages(self, device_id: str, agent: str, last_resort: bytes,
                             key_packages: tuple[bytes, ...]) -> int:
        """An agent's MLS KeyPackages: one-time ones queued, the last-resort one kept (replaced when non-empty)."""
        key = f"{device_id}/{agent}"
        current = self._entries.get((DirectoryKind.KEY_PACKAGES, key))
        keep = last_resort or (current.bundle if current is not None else b"")
        return self.publish(DirectoryKind.KEY_PACKAGES, key, keep, key_packages)

    def fetch_key_package(self, device_id: str, agent: str) -> tuple[bytes | None, bytes | None]:
        """(last-resort KeyPackage or None, one one-time KeyPackage removed from the directory or None)."""
        bundle, one_time = self.fetch(DirectoryKind.KEY_PACKAGES, f"{device_id}/{agent}")
        return bundle or None, one_time

    def remaining(self, kind: DirectoryKind, device_id: str) -> int:
        entry = self._entries.get((kind, device_id))
        return len(entry.one_time) if entry else 0
