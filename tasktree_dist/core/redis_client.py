"""Every Redis client the library makes comes from here, so the state URL's topology (one server, or a Redis
Cluster named by its seed nodes; Sentinel URLs are parsed here too) is decided in one place and every process
(workers, coordinators, the board, the CLI) connects the same way.

A Cluster URL is `redis+cluster://[user:password@]host:7000,host:7001,.../` (`rediss+cluster://` for TLS, with
redis-py's ssl_* options as query arguments). Every key of a run carries the run's hash tag
(`distributed/keys.py`), so the scripts of a run touch one slot; `same_slot` groups a batch of keys by slot
where a batch may span runs.

redis-py is imported on first use: in-process runs never need it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from . import sentinel

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

T = TypeVar("T")


def connect(url: str, *, asynchronous: bool, max_connections: int | None = None,
            pool_timeout: float | None = 20.0, **options: Any) -> Any:
    """A client for `url` (the synchronous or the asyncio flavour).

    max_connections: a *blocking* pool of that size, so hundreds of concurrent commands of one process wait for
    a free connection instead of failing (redis-py's default pool raises once its connections are busy);
    pool_timeout bounds that wait (None: unbounded). options: redis-py keyword arguments (socket timeouts...).
    """
    if urlsplit(url).scheme in CLUSTER_SCHEMES:
        return _cluster(url, asynchronous, max_connections, options)
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


def is_cluster(client: Any) -> bool:
    """Whether `client` talks to a Redis Cluster (its multi-key calls must stay within one slot)."""
    return getattr(client, "_tasktree_cluster", False)


def same_slot(client: Any, items: Iterable[T], key: Callable[[T], str]) -> list[list[T]]:
    """`items` in groups whose `key` share a hash slot, in their order: one group on a single Redis (one round
    trip stays one), one per slot on a Cluster (a script or MGET spanning slots is refused there)."""
    items = list(items)
    if not is_cluster(client):
        return [items] if items else []
    from redis.crc import key_slot

    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(key_slot(key(item).encode()), []).append(item)
    return list(groups.values())


def mget(client: Any, names: list[str]) -> Any:
    """MGET of keys that may lie in several slots (redis-py splits it by slot on a Cluster and keeps the order)."""
    return client.mget_nonatomic(names) if is_cluster(client) else client.mget(names)


def _cluster(url: str, asynchronous: bool, max_connections: int | None, options: dict[str, Any]) -> Any:
    """A RedisCluster client on the URL's seed nodes (redis-py discovers the others and follows MOVED)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        raise ValueError(f"TASKTREE_REDIS_URL {url.split('@')[-1]!r} names no seed node (host:port,host:port,...)")
    if asynchronous:
        from redis.asyncio.cluster import ClusterNode, RedisCluster
    else:
        from redis.cluster import ClusterNode, RedisCluster  # type: ignore[assignment]
    nodes = []
    for seed in hosts.split(","):
        host, _, port = seed.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"TASKTREE_REDIS_URL: seed node {seed!r} is not host:port")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    kwargs: dict[str, Any] = dict(parse_qsl(parts.query))
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.password:
        kwargs["password"] = unquote(parts.password)
    if parts.scheme == "rediss+cluster":
        kwargs["ssl"] = True
    kwargs.update(options)
    if asynchronous:
        gate = max_connections or 0
        # redis-py's asyncio cluster raises once a node's connections are busy: a gate of max_connections
        # concurrent commands per client makes them wait instead, like the blocking pool of a single Redis
        client = _GatedCluster(startup_nodes=nodes, max_connections=max(4 * gate, 100), **kwargs)
        client._tasktree_gate = asyncio.Semaphore(gate) if gate else None
    else:
        client = RedisCluster(startup_nodes=nodes, **kwargs)
    client._tasktree_cluster = True
    return client


def _gated_class() -> type:
    from redis.asyncio.cluster import RedisCluster

    class GatedCluster(RedisCluster):  # type: ignore[misc]
        """An asyncio RedisCluster whose single commands wait for one of a bounded number of slots."""

        _tasktree_gate: asyncio.Semaphore | None = None

        async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            if self._tasktree_gate is None:
                return await super().execute_command(*args, **kwargs)
            async with self._tasktree_gate:
                return await super().execute_command(*args, **kwargs)

    return GatedCluster


def _GatedCluster(**kwargs: Any) -> Any:  # noqa: N802 - a class made on first use (redis-py imported late)
    global _GATED
    if _GATED is None:
        _GATED = _gated_class()
    return _GATED(**kwargs)


_GATED: type | None = None
