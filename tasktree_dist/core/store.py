"""The key-value store protocol used by Cacher and Terminable, an in-memory store and a Redis store.

`redis.asyncio.Redis` satisfies the protocol unchanged, so a cache written by one worker is a hit on another.
Expiries are seconds (`ex`: an int, a float or a timedelta, as tinytasktree's protocol says) or milliseconds
(`px`, Redis's way of saying less than a second); both stores here honour a fraction of a second.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import time
import weakref
from typing import Any, Protocol, runtime_checkable

from .redis_client import connect

Expiry = int | float | _dt.timedelta


@runtime_checkable
class CacheStore(Protocol):
    """What Cacher and Terminable need of a store: async get/set/delete/exists (redis.asyncio.Redis fits as is;
    RedisStore and InMemoryCacheStore are ready-made)."""

    async def get(self, key: str) -> Any: ...

    async def set(self, key: str, value: Any, ex: Expiry | None = None) -> Any: ...


def seconds_of(value: Expiry) -> float:
    return value.total_seconds() if isinstance(value, _dt.timedelta) else float(value)


def redis_expiry(ex: Expiry | None, px: int | _dt.timedelta | None) -> dict[str, Any]:
    """Redis SET's expiry keywords: whole seconds as `ex`, a fraction of a second as `px` milliseconds (redis-py
    rejects a float `ex` and truncates a timedelta's to whole seconds, 0.5 s becoming an invalid 0)."""
    if ex is None:
        return {} if px is None else {"px": px}
    seconds = seconds_of(ex)
    return {"ex": int(seconds)} if seconds.is_integer() else {"px": max(1, round(seconds * 1000))}


class InMemoryCacheStore:
    """A process-local store with expiry, for single-process runs and tests."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[Any, float | None]] = {}

    async def get(self, key: str) -> Any:
        item = self._data.get(key)
        if item is None:
            return None
        value, deadline = item
        if deadline is not None and time.monotonic() >= deadline:
            del self._data[key]
            return None
        return value

    async def set(self, key: str, value: Any, ex: Expiry | None = None, px: int | _dt.timedelta | None = None) -> bool:
        if ex is not None:
            ttl: float | None = seconds_of(ex)
        elif px is not None:
            ttl = px.total_seconds() if isinstance(px, _dt.timedelta) else px / 1000
        else:
            ttl = None
        self._data[key] = (value, None if ttl is None else time.monotonic() + ttl)
        return True

    async def delete(self, *keys: str) -> int:
        return sum(self._data.pop(key, None) is not None for key in keys)

    async def exists(self, *keys: str) -> int:
        return sum([await self.get(key) is not None for key in keys])


class RedisStore:
    """A CacheStore over Redis that works from any event loop (one redis.asyncio client per loop).

    A plain `redis.asyncio.Redis` is bound to the loop that first used it; trees defined at import time and run
    by several loops (tests, a coordinator, a worker's own loop) use this instead. Values written by one process
    are read by every other, so a Cacher hit on one worker is a hit on all.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self.options = options
        self._clients: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def client(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = connect(self.url, asynchronous=True, **self.options)
        return client

    async def get(self, key: str) -> Any:
        return await self.client().get(key)

    async def set(self, key: str, value: Any, ex: Expiry | None = None, px: int | _dt.timedelta | None = None) -> Any:
        return await self.client().set(key, value, **redis_expiry(ex, px))

    async def delete(self, *keys: str) -> Any:
        return await self.client().delete(*keys)

    async def exists(self, *keys: str) -> Any:
        return await self.client().exists(*keys)

    async def aclose(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"
