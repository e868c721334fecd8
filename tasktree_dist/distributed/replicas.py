"""Writes that must survive a failover (run records, unit completions, the snapshots units are sent with) are
acknowledged by a replica.

Redis replicates asynchronously: a master that dies right after answering a write may take it along, and the replica
Sentinel promotes never saw it. `WAIT n timeout` after the write returns once n replicas have it (or the timeout
passed), so an answered run transition or unit completion is on a replica too. WAIT counts the writes of its own
connection, so it goes in the same pipeline as the writes (one WAIT per batch of writes, not one per key).

The master's replicas are counted at most every REFRESH_S (INFO replication, cached per client): without replicas
nothing is sent. A WAIT that comes back short is what a failover looks like from the old master (its replica was
just promoted, the sentinels have not switched yet, and what it accepts now is dropped when it resyncs): the caller
waits while a probe (a write and its WAIT) learns what happened. A replica caught up: done. The sentinels named a new
master (another replication id): the writes are sent again there, where they never happened. GRACE_S passed: the
master is taken to have really lost its replicas, and writes go on without waiting (logged).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from ..core.log import logger
from .redis_retry import REDIS_ERRORS

#: Seconds a count of the master's replicas is trusted.
REFRESH_S = 5.0
#: A key written (with a TTL) to learn whether a replica has caught up with everything written before it.
PROBE = "tasktree:replica-probe"
#: Seconds writes wait for a replica that went away (a failover in progress?) before going on without one.
GRACE_S = 5.0


class Replicas:
    """The replicas of one client's master, and the writes that wait for them."""

    def __init__(self, redis: Any, wanted: int, timeout_ms: int) -> None:
        self.redis = redis
        self.wanted = wanted
        self.timeout_ms = timeout_ms
        self._count = 0
        self._counted_at = -REFRESH_S
        #: Replicas the master had when last seen with any, and since when it has fewer (None: it has them).
        self._had = 0
        self._short_since: float | None = None
        self._replid: str | None = None
        self._cluster = type(redis).__name__ == "RedisCluster"  # WAIT would need the node of each key

    async def count(self) -> int:
        """Replicas to wait for: the setting, bounded by the master's online replicas (cached); replicas that went
        away less than GRACE_S ago are still waited for."""
        if not self.wanted or self._cluster:
            return 0
        if time.monotonic() - self._counted_at > REFRESH_S:
            try:
                self._note(await self.redis.info("replication"))
            except REDIS_ERRORS:
                self._counted_at = -REFRESH_S
                raise
            except ResponseError as exc:  # an ACL user without INFO
                self._unable(exc)
                return 0
        wanted = min(self.wanted, self._count)
        if wanted < min(self.wanted, self._had) and self._short_since is not None:
            if time.monotonic() - self._short_since < GRACE_S:
                return min(self.wanted, self._had)
            logger.warning("the Redis master has %d replica(s) online, it had %d: writes no longer wait for them",
                           self._count, self._had)
            self._had, self._short_since = self._count, None
        return wanted

    def _unable(self, exc: Exception) -> None:
        """This client may not ask (INFO) or wait (WAIT): its writes stop waiting for replicas, said once."""
        self.wanted = 0
        logger.warning("writes cannot wait for Redis replicas (%s: %s): allow INFO and WAIT to this Redis user "
                       "(+info +wait, after -@dangerous) or set TASKTREE_REDIS_WAIT_REPLICAS=0",
                       type(exc).__name__, exc)

    def _note(self, info: dict[str, Any]) -> None:
        """Remember what INFO replication says of the master: online replicas, replication id."""
        online = sum(1 for name, value in info.items()
                     if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online")
        self._count = online if info.get("role") == "master" else 0
        self._counted_at = time.monotonic()
        if info.get("master_replid") != self._replid:  # another master (promoted, restarted): start afresh
            self._replid, self._had, self._short_since = info.get("master_replid"), self._count, None
        if self._count:
            self._had = self._count

    async def run(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        """`script`'s reply, once its writes are on the wanted replicas (see `pipelined`)."""
        if not await self.count():
            return await script(keys=keys, args=args)
        for attempt in (1, 2):
            try:
                return (await self.pipelined(lambda pipe: pipe.evalsha(script.sha, len(keys), *keys, *args)))[0]
            except NoScriptError:  # a restarted or newly promoted master has not seen the script yet
                if attempt == 2:
                    raise
                await self.redis.script_load(script.script)
        raise AssertionError("unreachable")

    async def pipelined(self, fill: Callable[[Any], Any]) -> list[Any]:
        """The replies of the commands `fill` queues on a pipeline, once the wanted replicas have their writes
        (see the module docstring for a WAIT that comes back short)."""
        wanted = await self.count()
        pipe = self.redis.pipeline(transaction=False)
        fill(pipe)
        if not wanted:
            return await pipe.execute()
        pipe.execute_command("WAIT", wanted, self.timeout_ms)
        pipe.info("replication")  # which master took the writes (its replication id), and its replicas
        *replies, acked, info = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, ResponseError) and str(reply).startswith("NOREPLICAS"):
                return await self._until_replicated(fill, wanted, None, self._replid)  # min-replicas-to-write
            if isinstance(reply, Exception):
                raise reply
        if isinstance(acked, Exception) or isinstance(info, Exception):
            self._unable(acked if isinstance(acked, Exception) else info)
            return replies
        if int(acked) >= wanted:
            self._short_since = None
            return replies
        replid, known = info.get("master_replid"), self._replid
        self._note(info)
        if replid != known and not self._count:  # the writes went to a newly promoted master, without replicas yet
            return replies
        return await self._until_replicated(fill, wanted, replies, replid)

    async def _until_replicated(self, fill: Callable[[Any], Any], wanted: int, replies: list[Any] | None,
                                replid: str | None) -> list[Any]:
        """After a short WAIT (or writes refused for want of replicas: `replies` None): probe until a replica has
        everything this master wrote (a probe write and its WAIT: replication is in order), or the sentinels name a
        new master (another replication id; the writes are sent again there, where they never happened), or
        GRACE_S passed (the replies as they are: the master lost its replicas)."""
        delay = 0.05
        if self._short_since is None:
            self._short_since = time.monotonic()
        logger.warning("writes not acknowledged by %d replica(s) within %d ms: probing until one has them, the "
                       "sentinels name another master, or %g s passed (a failover under way?)", wanted,
                       self.timeout_ms, GRACE_S)
        while True:
            await asyncio.sleep(delay)  # back-off, not synchronisation
            delay = min(delay * 2, 0.5)
            if time.monotonic() - self._short_since > GRACE_S:
                self._counted_at = -REFRESH_S  # count() now gives up on the lost replicas, logged
                await self.count()
                if replies is None:
                    return await self._send(fill)
                return replies
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(PROBE, 1, ex=60)
            pipe.execute_command("WAIT", wanted, self.timeout_ms)
            pipe.info("replication")
            try:
                _, acked, info = await pipe.execute()
            except (*REDIS_ERRORS, ResponseError):  # the old master turned replica (READONLY), NOREPLICAS...
                continue
            if info.get("master_replid") != replid:  # a new master: what the old one took is lost, write it here
                self._counted_at = -REFRESH_S
                return await self.pipelined(fill)
            if int(acked) >= wanted:
                self._short_since = None
                return replies if replies is not None else await self.pipelined(fill)

    async def _send(self, fill: Callable[[Any], Any]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        fill(pipe)
        return await pipe.execute()


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
