"""`IncomingQueue.get_many_nowait` (the sender's ingest takes its batch with it) returns what as many
`get_nowait` calls would, leaves the same byte count, and resumes a paused bridge as they would."""

from __future__ import annotations

import asyncio

import pytest

from gateway.bridge import MESSAGE_OVERHEAD, AgentMessage, IncomingQueue


def msg(i: int, size: int = 100) -> AgentMessage:
    return AgentMessage(topic=f"agw/a/out/dev-b/b{i}", payload=bytes(size), mid=i, qos=1, dup=False,
                        response_topic=None, correlation_data=b"c" * (i % 3) or None, content_type=None,
                        payload_utf8=False, user_properties=())


@pytest.mark.parametrize(("count", "limit"), [(1, 511), (5, 3), (600, 511), (7, 7)])
async def test_many_at_once_is_one_at_a_time(count: int, limit: int) -> None:
    one, many = IncomingQueue(), IncomingQueue()
    for i in range(count):
        one.put_nowait(msg(i))
        many.put_nowait(msg(i))
    singles = [one.get_nowait() for _ in range(min(count, limit))]
    assert many.get_many_nowait(limit) == singles
    assert many.held_bytes == one.held_bytes and many.qsize() == one.qsize()
    rest = many.get_many_nowait(10_000) if many.qsize() else []
    assert len(rest) == count - len(singles) and many.held_bytes == 0
    with pytest.raises(asyncio.QueueEmpty):
        many.get_many_nowait(1)


async def test_taking_below_the_bound_resumes_reading() -> None:
    q = IncomingQueue(max_bytes=10 * (100 + MESSAGE_OVERHEAD), pause_max=60.0)
    resumed: list[bool] = []
    q.on_resume = lambda: resumed.append(True)
    for i in range(12):
        q.put_nowait(msg(3 * i))
    assert not q.may_read() and q.paused
    q.get_many_nowait(1)
    assert q.paused and not resumed  # still at the bound
    q.get_many_nowait(2)
    assert not q.paused and resumed == [True]
