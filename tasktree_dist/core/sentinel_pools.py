"""Connection pools that follow a Sentinel failover promptly (used by core/sentinel.py).

redis-py's Sentinel pool asks the sentinels for the master only when it opens a connection, and keeps using open
connections until one fails. When a master is failed over while it still runs (`SENTINEL FAILOVER`, a network
split), it stays a writable master until the sentinels turn it into a replica (seconds later): writes sent there in
between are lost when it resyncs. These pools ask the sentinels at most every RECHECK_S while in use, drop idle
connections to a former master at once (redis-py's own rediscovery) and in-use ones when they come back.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

#: Seconds between two questions to the sentinels of one pool in use.
RECHECK_S = 0.5


def _stale(pool: Any, connection: Any) -> bool:
    return bool(pool.is_master and pool.master_address and (connection.host, connection.port) != pool.master_address)


@cache
def pool_class(asynchronous: bool, blocking: bool) -> type:
    """A Sentinel pool class that follows failovers (see the module docstring); `blocking`: a bounded pool whose
    callers wait for a free connection, as the plain URL's pool."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    if asynchronous:
        from redis.asyncio import BlockingConnectionPool
        from redis.asyncio.sentinel import SentinelConnectionPool

        class Following(SentinelConnectionPool):
            _checked = 0.0

            async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
                if self.is_master and time.monotonic() - self._checked > RECHECK_S:
                    self._checked = time.monotonic()
                    try:
                        await self.get_master_address()  # a new master: idle connections are dropped
                    except RedisConnectionError:
                        pass  # no sentinel answers: keep the master we know
                return await super().get_connection(*args, **kwargs)

            async def release(self, connection: Any) -> None:
                if _stale(self, connection):
                    await connection.disconnect()
                await super().release(connection)
    else:
        from redis import BlockingConnectionPool  # type: ignore[assignment]
        from redis.sentinel import SentinelConnectionPool  # type: ignore[assignment]

        class Following(SentinelConnectionPool):  # type: ignore[no-redef]
            _checked = 0.0

            def get_connection(self, *args: Any, **kwargs: Any) -> Any:
                if self.is_master and time.monotonic() - self._checked > RECHECK_S:
                    self._checked = time.monotonic()
                    try:
                        self.get_master_address()
                    except RedisConnectionError:
                        pass
                return super().get_connection(*args, **kwargs)

            def release(self, connection: Any) -> None:
                if _stale(self, connection):
                    connection.disconnect()
                super().release(connection)

    if not blocking:
        return Following
    return type("BlockingFollowing", (Following, BlockingConnectionPool), {})
