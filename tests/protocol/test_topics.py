"""Agents' outbound topics (gateway/topics.py): parsing, and the memo that must not hold what an agent chooses."""

from __future__ import annotations

import pytest

from gateway import topics


def test_an_out_topic_parses_into_its_parts_with_a_reply_path() -> None:
    got = topics.parse_out_topic("agw", "agw/alice/out/dev-b/bob/r/x/y")
    assert (got.agent, got.peer_device, got.peer_agent, got.deliver_to) == ("alice", "dev-b", "bob", "x/y")
    assert topics.parse_out_topic("agw", "agw/alice/out/dev-b/bob").deliver_to is None


@pytest.mark.parametrize("bad", ["agw/alice/in/dev-b/bob", "other/alice/out/dev-b/bob", "agw/alice/out/dev-b",
                                 "agw/al ice/out/dev-b/bob"])
def test_a_bad_out_topic_is_a_topic_error(bad: str) -> None:
    with pytest.raises(topics.TopicError):
        topics.parse_out_topic("agw", bad)


def test_long_topics_are_parsed_but_never_memoised() -> None:
    """An agent chooses its reply paths: 1,024 long ones must not stay in memory for the daemon's life."""
    topics._parse_out_topic_cached.cache_clear()
    long = "agw/alice/out/dev-b/bob/r/" + "x" * topics.CACHED_TOPIC_MAX
    assert topics.parse_out_topic("agw", long).deliver_to == "x" * topics.CACHED_TOPIC_MAX
    assert topics._parse_out_topic_cached.cache_info().currsize == 0
    topics.parse_out_topic("agw", "agw/alice/out/dev-b/bob")
    topics.parse_out_topic("agw", "agw/alice/out/dev-b/bob")
    info = topics._parse_out_topic_cached.cache_info()
    assert (info.currsize, info.hits) == (1, 1)


@pytest.mark.parametrize("topic", [
    "agw/alice/ack", "agw/alice/ack/x", "agw/ack", "x/alice/ack", "agw/Alice!/ack", "agw/alice/out/dev/ack",
    "agw/alice/group/g1/out", "agw/alice/group/g1/ctl", "agw/alice/group/g1/in", "agw/alice/group/out",
    "agw/alice/out/dev/bob", "agw//group//out", "agw/alice/group/g1/out/x", "x/alice/group/g1/out", "",
])
def test_topic_tests_with_early_outs_agree_with_the_split(topic: str) -> None:
    """`ack_agent` and `is_group_topic` reject most topics before splitting them: same answers as the split."""
    parts = topic.split("/")
    is_group = len(parts) == 5 and parts[0] == "agw" and parts[2] == "group" and parts[4] in ("out", "ctl")
    assert topics.is_group_topic("agw", topic) is is_group
    want = parts[1] if len(parts) == 3 and parts[0] == "agw" and parts[2] == "ack" and parts[1] == "alice" else None
    assert topics.ack_agent("agw", topic) == want
