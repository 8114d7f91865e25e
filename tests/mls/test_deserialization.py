"""deserialization.json: variable-length integer headers (RFC 9420 section 2.1.2).

Format: {vlbytes_header: hex, length: int}. The header decodes to `length` with nothing left over, and encoding
`length` yields exactly the header (minimal encoding).
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocol.mls.codec import Reader, encode_varint
from gateway.protocol.mls.errors import MlsDecodeError

from .conftest import unhex, vector_params


@pytest.mark.parametrize("v", vector_params("deserialization.json", per_suite=False))
def test_varint_header_vector(v: dict[str, Any]) -> None:
    header = unhex(v["vlbytes_header"])
    r = Reader(header)
    assert r.varint() == v["length"]
    assert r.done()
    assert encode_varint(v["length"]) == header


@pytest.mark.parametrize("bad", ["4000", "80003fff", "c0000000", "40"])
def test_non_minimal_or_invalid_headers_rejected(bad: str) -> None:
    with pytest.raises(MlsDecodeError):
        Reader(unhex(bad)).varint()
