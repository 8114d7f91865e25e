"""transcript-hashes.json: confirmed and interim transcript hashes and the confirmation tag, suites 1 and 3.

Format per entry: cipher_suite, confirmation_key, authenticated_content (an AuthenticatedContent holding a
commit), interim_transcript_hash_before, confirmed_transcript_hash_after, interim_transcript_hash_after.
Checks: the AuthenticatedContent decodes and re-encodes exactly; both hashes recomputed; the commit's
confirmation tag verifies with the key, and a wrong key or hash is refused.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocol.mls import crypto, transcript
from gateway.protocol.mls.errors import MlsVerificationError
from gateway.protocol.mls.framing import AuthenticatedContent

from .conftest import unhex, vector_params


@pytest.mark.parametrize("v", vector_params("transcript-hashes.json"))
def test_transcript_hashes_vector(v: dict[str, Any]) -> None:
    cs = crypto.get_suite(v["cipher_suite"])
    raw = unhex(v["authenticated_content"])
    ac = AuthenticatedContent.from_bytes(raw)
    assert ac.to_bytes() == raw
    assert ac.auth.confirmation_tag is not None

    confirmed = transcript.confirmed_transcript_hash(cs, unhex(v["interim_transcript_hash_before"]), ac)
    assert confirmed == unhex(v["confirmed_transcript_hash_after"])
    key = unhex(v["confirmation_key"])
    assert transcript.confirmation_tag(cs, key, confirmed) == ac.auth.confirmation_tag
    transcript.check_confirmation_tag(cs, key, confirmed, ac.auth.confirmation_tag)
    with pytest.raises(MlsVerificationError):
        transcript.check_confirmation_tag(cs, key[::-1], confirmed, ac.auth.confirmation_tag)
    with pytest.raises(MlsVerificationError):
        transcript.check_confirmation_tag(cs, key, confirmed[::-1], ac.auth.confirmation_tag)

    interim = transcript.interim_transcript_hash(cs, confirmed, ac.auth.confirmation_tag)
    assert interim == unhex(v["interim_transcript_hash_after"])
