"""The SDK's handling of a refusal receipt, without I/O: a refused request fails at once with the refusal."""

from __future__ import annotations

import asyncio

import pytest

from gateway.client import Message, MessageRefused, _fail_with_refusal


async def test_a_refused_request_fails_its_reply_with_the_refusal() -> None:
    loop = asyncio.get_running_loop()
    receipt: asyncio.Future[None] = loop.create_future()
    reply: asyncio.Future[Message] = loop.create_future()
    receipt.add_done_callback(lambda r: _fail_with_refusal(r, reply))
    receipt.set_exception(MessageRefused("the gateway refused the message: too many user properties"))
    with pytest.raises(MessageRefused, match="too many user properties"):
        await asyncio.wait_for(reply, 1)


async def test_a_receipted_request_still_waits_for_its_reply() -> None:
    loop = asyncio.get_running_loop()
    receipt: asyncio.Future[None] = loop.create_future()
    reply: asyncio.Future[Message] = loop.create_future()
    receipt.add_done_callback(lambda r: _fail_with_refusal(r, reply))
    receipt.set_result(None)
    await asyncio.sleep(0)
    assert not reply.done()
