"""The key-value store protocol used by Cacher and Terminable, and an in-memory implementation.

`redis.asyncio.Redis` satisfies the protocol unchanged, so a cache written by one worker is a hit on another.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class CacheStore(Protocol):
    async def get(self, key: str) -> Any: ...

    async def set(self, key: str, value: Any, ex: int | None = None) -> Any: ...


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

    async def set(self, key: str, value: Any, ex: int | float | None = None) -> bool:
        self._data[key] = (value, None if ex is None else time.monotonic() + float(ex))
        return True

    async def delete(self, *keys: str) -> int:
        return sum(self._data.pop(key, None) is not None for key in keys)

    async def exists(self, *keys: str) -> int:
        return sum([await self.get(key) is not None for key in keys])
