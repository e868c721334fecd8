"""Shared fixtures: a private redis-server (or REDIS_URL when set) and the fake LLM server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from tasktree_dist.testing.redis_server import RedisServer

pytest_plugins = ["tasktree_dist.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis URL for the whole session: REDIS_URL when set, else a private server stopped at the end."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[object]:
    """A redis.asyncio client on a database flushed before each test."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()
