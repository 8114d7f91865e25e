"""The receiver's `_open`: each message of a verified v2 batch comes out with the very plaintext it was decoded from,
and the inbox stores those bytes. A message that fails to decrypt or to decode in the middle of a batch is dropped
alone; the others keep their own bytes (the pairing the inbox relies on since it stopped encoding messages again)."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from gateway.inbox import InboxEntry
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.message import InnerMessage, Kind, new_message_id
from gateway.protocol.pairwise import PairwiseBatch
from gateway.protocol.pairwise import batch as v2
from gateway.protocol.pairwise.testing import ToyAuthority, ToyDevice
from gateway.receiving import Receiving
from tests.protocol.test_pairwise_session import pair


def _message(payload: bytes, **kw: Any) -> InnerMessage:
    return InnerMessage(kind=Kind.DATA, message_id=new_message_id(), sender_agent="alice", recipient_agent="bob",
                        created_at_ms=1, expires_at_ms=10**13, payload=payload, **kw)


def _receiver(session: Any) -> Any:
    audit: list[dict[str, Any]] = []
    r = SimpleNamespace(
        book=SimpleNamespace(decrypt_batch=lambda peer, wire: session.decrypt_batch(PairwiseBatch.parse(wire),
                                                                                     sender_device_id=peer)),
        counters=SimpleNamespace(bad_input=0), store=SimpleNamespace(audit=SimpleNamespace(
            append=lambda event, t: audit.append(event))), audit=audit)
    r._rejected = lambda env, exc: Receiving._rejected(r, env, exc)  # type: ignore[arg-type]
    return r


def test_each_message_keeps_its_own_plaintext_around_bad_ones() -> None:
    authority = ToyAuthority()
    alice, bob = ToyDevice.make(authority, "dev-alice"), ToyDevice.make(authority, "dev-bob")
    a, b = pair(alice, bob, authority)
    messages = [_message(b"short"), _message(os.urandom(16384)),
                _message(b"with properties", user_properties=(("k", "v"),), response_topic="r",
                         correlation_data=b"c", content_type="text/plain", payload_utf8=True),
                _message(b"")]
    encoded = [m.encode() for m in messages]
    # Between them: bytes that decrypt but are no inner message, and one whose tag is broken (a peer with a valid
    # key, re-signing the batch).
    plaintexts = [encoded[0], b"\x00not an inner message", encoded[1], b"to be broken", encoded[2], encoded[3]]
    parsed = PairwiseBatch.parse(a.encrypt_batch(plaintexts))
    items = [v2.encode_item(i.header_bytes, i.ciphertext) for i in parsed.items]
    broken = bytearray(items[3])
    broken[-1] ^= 1
    items[3] = bytes(broken)
    body = v2.encode_head(a.session_id, len(items)) + b"".join(items)
    wire = body + alice.signer.sign(v2.signed_data("dev-alice", "dev-bob", body))
    env = Envelope(kind=EnvelopeKind.PAIRWISE_BATCH, envelope_id=bytes(16), sender="dev-alice",
                   recipient="dev-bob", ciphertext=wire)

    r = _receiver(b)
    out = Receiving._open(r, env)

    assert [inner for inner, _ in out] == messages
    assert [raw for _, raw in out] == encoded
    assert all(type(raw) is bytes for _, raw in out)  # not a view into a buffer that is reused
    assert r.counters.bad_input == 2
    assert [e["type"] for e in r.audit] == ["message.rejected", "message.rejected"]
    # The inbox stores those bytes as they are, and reads each message back from its own record.
    for seq, (inner, raw) in enumerate(out):
        entry = InboxEntry.new("dev-alice", seq, inner, raw)
        assert entry.record().endswith(raw)
        back = InboxEntry.from_record(entry.name, entry.record())
        assert back.message == inner and back.encoded == raw and back.seq == seq
