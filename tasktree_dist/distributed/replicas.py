"""Writes that must survive a failover (run records, unit completions) are acknowledged by a replica.

Redis replicates asynchronously: a master that dies right after answering a write may take it along, and the replica
Sentinel promotes never saw it. `WAIT n timeout` after the write returns once n replicas have it (or the timeout
passed), so an answered run transition or unit completion is on a replica too. WAIT counts the writes of its own
connection, so it goes in the same pipeline as the script (one WAIT per batch of writes, not one per key).

The master's replicas are counted at most every REFRESH_S (INFO replication, cached per client): without replicas
nothing is sent; a WAIT that came back short, or a failed connection (a failover?), makes the next write count them
again. A replica that falls behind costs at most the timeout (TASKTREE_REDIS_WAIT_TIMEOUT_MS) per write, logged.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from redis.exceptions import NoScriptError

from ..core.log import logger
from .redis_retry import REDIS_ERRORS

#: Seconds a count of the master's replicas is trusted.
REFRESH_S = 5.0


class Replicas:
    """The replicas of one client's master, and the writes that wait for them."""

    def __init__(self, redis: Any, wanted: int, timeout_ms: int) -> None:
        self.redis = redis
        self.wanted = wanted
        self.timeout_ms = timeout_ms
        self._count = 0
        self._counted_at = -REFRESH_S
        self._cluster = type(redis).__name__ == "RedisCluster"  # WAIT would need the node of each key

    async def count(self) -> int:
        """Replicas to wait for: the setting, bounded by the master's online replicas (cached)."""
        if not self.wanted or self._cluster:
            return 0
        if time.monotonic() - self._counted_at > REFRESH_S:
            info = await self.redis.info("replication")
            online = sum(1 for name, value in info.items()
                         if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online")
            self._count = online if info.get("role") == "master" else 0
            self._counted_at = time.monotonic()
        return min(self.wanted, self._count)

    def recount(self) -> None:
        self._counted_at = -REFRESH_S

    async def run(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        """`script`'s reply, once its writes are on the wanted replicas (or the WAIT timed out, logged)."""
        try:
            wanted = await self.count()
            if not wanted:
                return await script(keys=keys, args=args)
            for attempt in (1, 2):
                pipe = self.redis.pipeline(transaction=False)
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", wanted, self.timeout_ms)
                try:
                    reply, acked = await pipe.execute()
                    break
                except NoScriptError:  # a restarted or newly promoted master has not seen the script yet
                    if attempt == 2:
                        raise
                    await self.redis.script_load(script.script)
        except REDIS_ERRORS:
            self.recount()  # failing over? the next master may have other replicas
            raise
        if int(acked) < wanted:
            self.recount()
            logger.warning("a write was acknowledged by %s of %d replica(s) within %d ms "
                           "(TASKTREE_REDIS_WAIT_TIMEOUT_MS): a failover now could lose it", acked, wanted,
                           self.timeout_ms)
        return reply


_replicas: weakref.WeakKeyDictionary[Any, Replicas] = weakref.WeakKeyDictionary()


def replicas_for(redis: Any, settings: Any = None) -> Replicas:
    """The Replicas of `redis` (a redis.asyncio client) with the settings' count and timeout, made on first use."""
    found = _replicas.get(redis)
    if found is None:
        if settings is None:
            from ..core.settings import get_settings

            settings = get_settings()
        found = _replicas[redis] = Replicas(redis, settings.redis_wait_replicas, settings.redis_wait_timeout_ms)
    return found
