"""Broker-redelivery marks: which PUBLISH (MQTT packet id, content digest) was stored last under each packet id.

A broker resends (with DUP set) a QoS 1 PUBLISH whose PUBACK it did not get, e.g. when we stored the message and
crashed before acknowledging it. The mark of the last message stored under that packet id tells the copy apart
from a new message that reuses the id: same id and same digest, it is the copy (acknowledge, do not store).

Layout: the 65,536 packet ids fall into buckets of 64; a bucket is one sealed record in the `secrets` table
named `<prefix>b<bucket>`, holding 64 slots of 16-byte digests (all zero: no mark). One ingest batch writes the
buckets its ids fall into (a broker numbers packets in sequence, so 512 messages touch about nine), in the ingest
transaction, instead of one sealed record per message. The buckets used last are kept in memory (`CACHED_BUCKETS`,
64 KiB; all 1,024 would be 1 MiB, which a gateway reached after 65,536 messages and kept); a bucket not held is
read from the store (once per 64 messages in sequence). Stores written before this format hold one record per
id, `<prefix><packet id>`: they are still read for an id whose slot is empty, so a restart across the upgrade
keeps recognising redeliveries.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import InvalidRecord
from .records import KeyedBlobs

PER_BUCKET = 64
DIGEST_BYTES = 16
_EMPTY = bytes(DIGEST_BYTES)
_BUCKET_BYTES = PER_BUCKET * DIGEST_BYTES
CACHED_BUCKETS = 64  # buckets kept in memory, least recently used dropped first


class RedeliveryMarks:
    """Marks under one name prefix (e.g. `mqtt-in/`) in a `KeyedBlobs` table.

    Call `put` inside the transaction that stores the messages; if that transaction fails, call `forget` (the
    buckets in memory then come again from the store, as it was rolled back).
    """

    def __init__(self, blobs: KeyedBlobs, prefix: str, cache: int = CACHED_BUCKETS) -> None:
        self._blobs = blobs
        self._prefix = prefix
        self._cache = max(1, cache)
        self._buckets: dict[int, bytearray] = {}  # in order of use, the least recent first

    def _bucket(self, n: int) -> bytearray:
        got = self._buckets.pop(n, None)
        if got is None:
            # (Read on the store's one connection: it sees what this transaction wrote, e.g. a bucket dropped
            # from memory after an earlier `put` in it.)
            raw = self._blobs.get(f"{self._prefix}b{n}")
            got = bytearray(raw) if raw is not None and len(raw) == _BUCKET_BYTES else bytearray(_BUCKET_BYTES)
            if len(self._buckets) >= self._cache:
                del self._buckets[next(iter(self._buckets))]  # the least recently used
        self._buckets[n] = got
        return got

    @staticmethod
    def _check(packet_id: int, digest: bytes) -> None:
        if not 0 <= packet_id <= 0xFFFF:
            raise InvalidRecord(f"MQTT packet ids are 0..65535, not {packet_id}")
        if len(digest) != DIGEST_BYTES or digest == _EMPTY:
            raise InvalidRecord(f"redelivery digests are {DIGEST_BYTES} bytes, not all zero")

    def is_copy(self, packet_id: int, digest: bytes) -> bool:
        """Whether the last message stored under `packet_id` had this digest (a DUP PUBLISH is then a copy)."""
        self._check(packet_id, digest)
        i = (packet_id % PER_BUCKET) * DIGEST_BYTES
        slot = bytes(self._bucket(packet_id // PER_BUCKET)[i:i + DIGEST_BYTES])
        if slot != _EMPTY:
            return slot == digest
        return self._blobs.get(f"{self._prefix}{packet_id}") == digest  # a mark in the format before buckets

    def put(self, marks: Iterable[tuple[int, bytes]]) -> None:
        """Record (packet id, digest) for messages being stored: one sealed record per bucket touched."""
        touched: dict[int, bytearray] = {}
        for packet_id, digest in marks:
            if not (type(packet_id) is int and 0 <= packet_id <= 0xFFFF and type(digest) is bytes
                    and len(digest) == DIGEST_BYTES and digest != _EMPTY):
                self._check(packet_id, digest)  # (raises, unless an int or bytes subclass within the rules)
            n = packet_id // PER_BUCKET
            bucket = touched.get(n)
            if bucket is None:
                bucket = touched[n] = self._bucket(n)
            i = (packet_id % PER_BUCKET) * DIGEST_BYTES
            bucket[i:i + DIGEST_BYTES] = digest
        self._blobs.put_many([(f"{self._prefix}b{n}", bytes(touched[n])) for n in sorted(touched)])

    def forget(self) -> None:
        """Drop the buckets held in memory (after a failed transaction): they are read again when needed."""
        self._buckets.clear()
