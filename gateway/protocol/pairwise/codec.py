"""Fixed-width big-endian integers and length-prefixed fields for the pairwise formats.

`Reader` reads exact sizes from a bytes object and raises `PairwiseDecodeError` on any short, oversized or
trailing input, so a decoder built from it cannot fail any other way. Integers are big-endian and unsigned.
"""

from __future__ import annotations

from gateway.protocol.pairwise.errors import PairwiseDecodeError


def wire_bytes(data: object, max_size: int, what: str) -> bytes:
    """Bytes from outside, as an immutable copy, refused when not bytes-like or larger than `max_size`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PairwiseDecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise PairwiseDecodeError(f"{what}: {len(data)} bytes exceeds the limit of {max_size}")
    return bytes(data)


class Reader:
    """Consumes a bytes object front to back; every read checks bounds first."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise PairwiseDecodeError(f"{what}: expected bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0
        self._what = what

    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def fixed(self, n: int, field: str) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise PairwiseDecodeError(f"{self._what}: truncated in {field} (need {n} bytes, have {self.remaining})")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def u8(self, field: str) -> int:
        return self.fixed(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.fixed(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.fixed(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self.fixed(8, field), "big")

    def opaque8(self, field: str, *, min_len: int = 0) -> bytes:
        return self._bounded(self.u8(field), field, min_len, 0xFF)

    def opaque16(self, field: str, *, min_len: int = 0, max_len: int = 0xFFFF) -> bytes:
        return self._bounded(self.u16(field), field, min_len, max_len)

    def opaque32(self, field: str, *, min_len: int = 0, max_len: int) -> bytes:
        return self._bounded(self.u32(field), field, min_len, max_len)

    def text8(self, field: str) -> str:
        """A non-empty UTF-8 string of at most 255 bytes (device ids)."""
        raw = self.opaque8(field, min_len=1)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PairwiseDecodeError(f"{self._what}: {field} is not valid UTF-8") from None

    def flag(self, field: str) -> bool:
        v = self.u8(field)
        if v > 1:
            raise PairwiseDecodeError(f"{self._what}: {field} must be 0 or 1, got {v}")
        return v == 1

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def done(self) -> None:
        if self._pos != len(self._data):
            raise PairwiseDecodeError(f"{self._what}: {self.remaining} trailing bytes")

    def _bounded(self, n: int, field: str, min_len: int, max_len: int) -> bytes:
        if n < min_len or n > max_len:
            raise PairwiseDecodeError(f"{self._what}: {field} length {n} outside [{min_len}, {max_len}]")
        return self.fixed(n, field)


def u8(v: int) -> bytes:
    return v.to_bytes(1, "big")


def u16(v: int) -> bytes:
    return v.to_bytes(2, "big")


def u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def u64(v: int) -> bytes:
    return v.to_bytes(8, "big")


def opaque8(b: bytes) -> bytes:
    if len(b) > 0xFF:
        raise ValueError(f"field too long for a 1-byte length: {len(b)}")
    return u8(len(b)) + b


def opaque16(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise ValueError(f"field too long for a 2-byte length: {len(b)}")
    return u16(len(b)) + b


def opaque32(b: bytes) -> bytes:
    return u32(len(b)) + b


def text8(s: str) -> bytes:
    raw = s.encode("utf-8")
    if not 1 <= len(raw) <= 0xFF:
        raise ValueError(f"text must be 1..255 UTF-8 bytes, got {len(raw)}")
    return opaque8(raw)
