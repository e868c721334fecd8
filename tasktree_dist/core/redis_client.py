"""Every Redis client the library makes comes from here, so the state URL's topology (one server today; Sentinel
and Cluster URLs are parsed here too) is decided in one place and every process (workers, coordinators, the
board, the CLI) connects the same way.

redis-py is imported on first use: in-process runs never need it.
"""

from __future__ import annotations

from typing import Any

from . import sentinel


def connect(url: str, *, asynchronous: bool, max_connections: int | None = None,
            pool_timeout: float | None = 20.0, **options: Any) -> Any:
    """A client for `url` (the synchronous or the asyncio flavour).

    max_connections: a *blocking* pool of that size, so hundreds of concurrent commands of one process wait for
    a free connection instead of failing (redis-py's default pool raises once its connections are busy);
    pool_timeout bounds that wait (None: unbounded). options: redis-py keyword arguments (socket timeouts...).
    """
    if sentinel.is_sentinel(url):
        return sentinel.client(url, asynchronous=asynchronous, max_connections=max_connections,
                               pool_timeout=pool_timeout, options=options)
    if asynchronous:
        import redis.asyncio as redis
    else:
        import redis  # type: ignore[no-redef]
    if max_connections is None:
        return redis.Redis.from_url(url, **options)
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_timeout,
                                                 **options)
    return redis.Redis(connection_pool=pool)
