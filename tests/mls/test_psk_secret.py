"""psk_secret.json: combining external PSKs into psk_secret (RFC 9420 section 8.4), suites 1 and 3.

Format per entry: cipher_suite, psks[{psk_id, psk, psk_nonce}] (external PSKs, in order), psk_secret.
Check: psk_secret recomputed from the list, and that the order of the PSKs matters.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocol.mls import crypto, psk

from .conftest import unhex, vector_params


def _inputs(v: dict[str, Any]) -> list[psk.PskInput]:
    return [
        psk.PskInput(psk.encode_external_psk_id(unhex(p["psk_id"]), unhex(p["psk_nonce"])), unhex(p["psk"]))
        for p in v["psks"]
    ]


@pytest.mark.parametrize("v", vector_params("psk_secret.json"))
def test_psk_secret_vector(v: dict[str, Any]) -> None:
    cs = crypto.get_suite(v["cipher_suite"])
    inputs = _inputs(v)
    assert psk.psk_secret(cs, inputs) == unhex(v["psk_secret"])
    if len(inputs) >= 2:
        assert psk.psk_secret(cs, inputs[::-1]) != unhex(v["psk_secret"])


def test_psk_input_repr_hides_key() -> None:
    p = psk.PskInput(b"id", b"\x42" * 32)
    assert ("42" * 32) not in repr(p)
