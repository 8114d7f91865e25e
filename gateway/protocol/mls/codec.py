"""TLS presentation language as MLS uses it (RFC 9420 section 2.1.2): fixed-width integers and
variable-length vectors with a QUIC-style length prefix that must be minimally encoded.

`Reader` consumes bytes and raises `MlsDecodeError` on any short or malformed input; `Writer` builds bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from gateway.protocol.mls.errors import MlsDecodeError

T = TypeVar("T")

MAX_VARINT = (1 << 30) - 1


def encode_varint(n: int) -> bytes:
    if n < 0 or n > MAX_VARINT:
        raise ValueError(f"varint out of range: {n}")
    if n < 1 << 6:
        return bytes([n])
    if n < 1 << 14:
        return (n | 0x4000).to_bytes(2, "big")
    return (n | 0x80000000).to_bytes(4, "big")


class Writer:
    """Accumulates an encoding."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(1, "big"))
        return self

    def u16(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(2, "big"))
        return self

    def u32(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(4, "big"))
        return self

    def u64(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(8, "big"))
        return self

    def raw(self, b: bytes) -> Writer:
        self._parts.append(bytes(b))
        return self

    def opaque(self, b: bytes) -> Writer:
        """opaque data<V>: varint length, then the bytes."""
        self._parts.append(encode_varint(len(b)))
        self._parts.append(bytes(b))
        return self

    def vector(self, items: list[T] | tuple[T, ...], encode_item: Callable[[Writer, T], object]) -> Writer:
        """T items<V>: varint length in bytes of the encoded items, then the items."""
        inner = Writer()
        for item in items:
            encode_item(inner, item)
        return self.opaque(inner.bytes())

    def optional(self, item: T | None, encode_item: Callable[[Writer, T], object]) -> Writer:
        if item is None:
            return self.u8(0)
        self.u8(1)
        encode_item(self, item)
        return self

    def bytes(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Consumes an encoding; every read checks bounds."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self._data = bytes(data)
        self._pos = pos
        self._end = len(self._data) if end is None else end

    def _take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > self._end:
            raise MlsDecodeError(f"truncated: need {n} bytes at offset {self._pos}, have {self._end - self._pos}")
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self._take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self._take(8), "big")

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def varint(self) -> int:
        first = self._take(1)[0]
        prefix = first >> 6
        if prefix == 0:
            return first & 0x3F
        if prefix == 1:
            v = ((first & 0x3F) << 8) | self._take(1)[0]
            if v < 1 << 6:
                raise MlsDecodeError("varint not minimally encoded")
            return v
        if prefix == 2:
            v = ((first & 0x3F) << 24) | int.from_bytes(self._take(3), "big")
            if v < 1 << 14:
                raise MlsDecodeError("varint not minimally encoded")
            return v
        raise MlsDecodeError("invalid varint prefix 0b11")

    def opaque(self) -> bytes:
        # Fast path for the common, well-formed case (1- or 2-byte length that fits); anything else, including
        # every error, goes through varint() and _take() as before.
        data, pos = self._data, self._pos
        if pos < self._end:
            first = data[pos]
            if first < 0x40:
                start, n = pos + 1, first
            elif first < 0x80 and pos + 1 < self._end:
                start, n = pos + 2, ((first & 0x3F) << 8) | data[pos + 1]
                if n < 1 << 6:  # not minimally encoded
                    return self._take(self.varint())
            else:
                return self._take(self.varint())
            stop = start + n
            if stop <= self._end:
                self._pos = stop
                return data[start:stop]
        return self._take(self.varint())

    def vector(self, decode_item: Callable[[Reader], T]) -> list[T]:
        n = self.varint()
        if self._pos + n > self._end:
            raise MlsDecodeError(f"vector of {n} bytes overruns input at offset {self._pos}")
        sub = Reader(self._data, self._pos, self._pos + n)
        items: list[T] = []
        while not sub.done():
            items.append(decode_item(sub))
        self._pos += n
        return items

    def optional(self, decode_item: Callable[[Reader], T]) -> T | None:
        flag = self.u8()
        if flag == 0:
            return None
        if flag != 1:
            raise MlsDecodeError(f"optional presence byte must be 0 or 1, got {flag}")
        return decode_item(self)

    def done(self) -> bool:
        return self._pos >= self._end

    def expect_done(self) -> None:
        if not self.done():
            raise MlsDecodeError(f"{self._end - self._pos} trailing bytes after the structure")

    @property
    def pos(self) -> int:
        return self._pos


def decode_all(data: bytes, decode: Callable[[Reader], T]) -> T:
    """Decode exactly one structure from `data`, rejecting trailing bytes."""
    r = Reader(data)
    out = decode(r)
    r.expect_done()
    return out
