"""Plaintext encodings of stored values, before sealing.

Records are small tuples of bytes, str, int and None, packed with a type tag and a length so decoding is exact.
Audit entries use canonical JSON (sorted keys, no spaces, UTF-8) because the MAC chain is defined over it and
an auditor should be able to recompute it with any JSON library.
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
from collections.abc import Sequence
from typing import Any

from .errors import InvalidRecord, StoreCorrupt

Field = bytes | str | int | None

_NONE, _INT, _BYTES, _STR = 0, 1, 2, 3
_NONE_TAG, _INT_TAG, _BYTES_TAG, _STR_TAG = b"\x00", b"\x01", b"\x02", b"\x03"
_LEN = struct.Struct(">I")
_I64 = struct.Struct(">q")


def pack(fields: Sequence[Field]) -> bytes:
    """Encode a tuple of fields; bools are rejected (use ints) so decoding gives back exactly what went in.

    Built with one join (one allocation of the result, no growing buffer whose old copies would be freed
    unwiped), so `wipe_bytes` on the result removes the only copy this function made of a secret value."""
    out: list[bytes] = []
    for f in fields:
        if f is None:
            out.append(_NONE_TAG)
        elif isinstance(f, bool):
            raise InvalidRecord("booleans are not storable fields; use 0/1")
        elif isinstance(f, int):
            out += (_INT_TAG, _I64.pack(f))
        elif isinstance(f, bytes):
            out += (_BYTES_TAG + _LEN.pack(len(f)), f)
        elif isinstance(f, str):
            raw = f.encode()
            out += (_STR_TAG + _LEN.pack(len(raw)), raw)
        else:
            raise InvalidRecord(f"unsupported field type {type(f).__name__}")
    return b"".join(out) if len(out) != 1 else bytes(bytearray(out[0]))


def pack_name_value(name: str, value: bytes) -> bytes:
    """`pack((name, value))` for a str and a bytes (the caller checked the types), in one join: the same bytes."""
    raw = name.encode()
    return b"".join((_STR_TAG, _LEN.pack(len(raw)), raw, _BYTES_TAG, _LEN.pack(len(value)), value))


_BYTES_OFFSET = bytes.__basicsize__ - 1


def wipe_bytes(secret: bytes) -> None:
    """Best effort: overwrite a `bytes` object the caller made and is about to drop (CPython does not clear freed
    memory). Never on an object anyone else may hold; 0- and 1-byte objects are shared and left alone."""
    if sys.implementation.name == "cpython" and type(secret) is bytes and len(secret) > 1:
        ctypes.memset(id(secret) + _BYTES_OFFSET, 0, len(secret))


def unpack(data: bytes) -> tuple[Field, ...]:
    """Decode `pack` output. Input is authenticated before this runs, so a failure means a bug or a damaged file."""
    fields: list[Field] = []
    i = 0
    n = len(data)
    try:
        while i < n:
            tag = data[i]
            i += 1
            if tag == _NONE:
                fields.append(None)
            elif tag == _INT:
                fields.append(_I64.unpack_from(data, i)[0])
                i += 8
            elif tag in (_BYTES, _STR):
                (ln,) = _LEN.unpack_from(data, i)
                i += 4
                if i + ln > n:
                    raise ValueError("field runs past the end")
                raw = data[i : i + ln]
                i += ln
                fields.append(raw if tag == _BYTES else raw.decode())
            else:
                raise ValueError(f"unknown tag {tag}")
    except (ValueError, struct.error) as exc:
        raise StoreCorrupt(f"a decrypted record does not decode ({exc}): restore a backup") from None
    return tuple(fields)


def canonical_json(obj: Any) -> bytes:
    """The one byte string an audit entry's MAC is computed over."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidRecord(f"audit event is not plain JSON data ({exc}); use str/int/float/bool/list/dict") from None


def expect(fields: tuple[Field, ...], types: tuple[type | tuple[type, ...], ...]) -> tuple[Any, ...]:
    """Check a decoded tuple has exactly the expected field types (list `type(None)` where None is allowed)."""
    if len(fields) != len(types) or not all(isinstance(f, t) for f, t in zip(fields, types, strict=True)):
        raise StoreCorrupt("a decrypted record has an unexpected shape: restore a backup")
    return fields
