"""Workers and coordinators ride out a Redis blip instead of losing completions (a real redis-server restarted)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tasktree_dist.distributed.redis_retry import retrying
from tasktree_dist.testing.redis_server import RedisServer


async def test_retrying_waits_for_redis_to_come_back() -> None:
    server = RedisServer().start()
    restarted = RedisServer(port=server.port)
    client = redis.Redis.from_url(server.url)
    try:
        await client.set("k", "before")
        server.stop()
        attempts = 0

        async def publish() -> object:
            nonlocal attempts
            attempts += 1
            if attempts == 2:  # the first failure was seen: bring Redis back on the same port
                restarted.start()
            return await client.set("k", "after")

        assert await retrying(publish, "test publish", outage_s=20) is True
        assert attempts >= 2 and await client.get("k") == b"after"
    finally:
        await client.aclose()
        server.stop()
        restarted.stop()


async def test_retrying_gives_up_after_the_outage_limit() -> None:
    server = RedisServer().start()
    client = redis.Redis.from_url(server.url)
    server.stop()
    try:
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(retrying(lambda: client.ping(), "test ping", outage_s=0.5), 10)
    finally:
        await client.aclose()
