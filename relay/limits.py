"""Token buckets: per-device rate limits that survive reconnects."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second up to `burst`. The clock is passed in so tests need not sleep."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = burst
        self._last = clock()

    def take(self, amount: float = 1.0) -> bool:
        """Spend `amount` tokens if available; False (and nothing spent) otherwise."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    def refund(self, amount: float = 1.0) -> None:
        self._tokens = min(self.burst, self._tokens + amount)


class DeviceLimiter:
    """One set of buckets per device, kept across reconnects (so reconnecting does not refill them), with the
    least recently used devices forgotten beyond `max_devices` to bound memory."""

    def __init__(
        self,
        *,
        rate_envelopes: float,
        burst_envelopes: float,
        rate_bytes: float,
        burst_bytes: float,
        rate_requests: float,
        burst_requests: float,
        clock: Callable[[], float],
        max_devices: int = 100_000,
    ) -> None:
        self._params = (rate_envelopes, burst_envelopes, rate_bytes, burst_bytes, rate_requests, burst_requests)
        self._clock = clock
        self._max = max_devices
        self._buckets: OrderedDict[str, tuple[TokenBucket, TokenBucket, TokenBucket]] = OrderedDict()

    def _get(self, device: str) -> tuple[TokenBucket, TokenBucket, TokenBucket]:
        b = self._buckets.get(device)
        if b is None:
            re, be, rb, bb, rr, br = self._params
            b = (TokenBucket(re, be, self._clock), TokenBucket(rb, bb, self._clock), TokenBucket(rr, br, self._clock))
            self._buckets[device] = b
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(device)
        return b

    def allow_envelope(self, device: str, size: int) -> bool:
        count, volume, _ = self._get(device)
        if not count.take(1):
            return False
        if not volume.take(size):
            count.refund()  # give the count token back: nothing was sent
            return False
        return True

    def allow_request(self, device: str) -> bool:
        return self._get(device)[2].take(1)
