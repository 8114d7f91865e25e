"""The digest that tells a broker's redelivery of a stored PUBLISH from a new message (gateway/sending.py
`_digest`) is the one marks written by earlier versions hold: SHA-256 over topic, payload, correlation data and
response topic, each after its 4-byte big-endian length, first 16 bytes."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from gateway.bridge import AgentMessage
from gateway.sending import _digest


def reference(m: AgentMessage) -> bytes:
    h = hashlib.sha256()
    for part in (m.topic.encode(), m.payload, m.correlation_data or b"", (m.response_topic or "").encode()):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()[:16]


@given(st.text(min_size=1, max_size=60), st.binary(max_size=600), st.none() | st.binary(max_size=40),
       st.none() | st.text(max_size=40))
def test_digest_is_the_stored_format(topic: str, payload: bytes, cd: bytes | None, rt: str | None) -> None:
    m = AgentMessage(topic=topic, payload=payload, mid=1, qos=1, dup=True, response_topic=rt, correlation_data=cd,
                     content_type=None, payload_utf8=False, user_properties=())
    assert _digest(m) == reference(m)


def test_the_per_topic_state_is_copied_not_shared_and_its_cache_bounded() -> None:
    """`_digest` keeps the hash state after each topic: digests of the same topic with other contents, in any
    order and after the cache was emptied (more than 1,024 topics), are still the stored format's."""
    import gateway.sending as sending

    def msg(topic: str, payload: bytes, cd: bytes | None = None, rt: str | None = None) -> AgentMessage:
        return AgentMessage(topic, payload, 1, 1, False, rt, cd, None, False, ())

    msgs = [msg("agw/a/out/d/b", bytes([i]) * i, b"c" if i % 3 == 0 else None, "r" if i % 4 == 0 else None)
            for i in range(20)]
    for m in msgs + msgs[::-1]:
        assert _digest(m) == reference(m)
    for i in range(1100):
        m = msg(f"agw/a{i}/out/d/b", b"p")
        assert _digest(m) == reference(m)
        assert len(sending._DIGEST_HEADS) <= 1024
    assert all(_digest(m) == reference(m) for m in msgs)
    assert _digest(msg("t", b"", b"", "")) == _digest(msg("t", b"")) == reference(msg("t", b""))


def test_a_long_topic_is_digested_but_its_state_not_kept() -> None:
    """An agent's topic may be up to 64 KiB (a group topic is digested before its names are checked): such a topic's
    state is not held by the cache (1,024 of them would be ~64 MB)."""
    import gateway.sending as sending
    from gateway import topics

    sending._DIGEST_HEADS.clear()
    long_topic = "agw/a/group/" + "g" * 60_000 + "/out"
    m = AgentMessage(long_topic, b"p", 1, 1, True, None, None, None, False, ())
    assert _digest(m) == reference(m) and _digest(m) == reference(m)
    assert sending._DIGEST_HEADS == {}
    edge = AgentMessage("t" * topics.CACHED_TOPIC_MAX, b"p", 1, 1, True, None, None, None, False, ())
    assert _digest(edge) == reference(edge)
    assert list(sending._DIGEST_HEADS) == [edge.topic]
