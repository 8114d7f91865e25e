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
