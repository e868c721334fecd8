"""The worker side: one long-lived event loop per process runs every unit this process receives.

Celery's threads pool hands each message to a thread, which submits the message's units to the loop and waits.
So a process runs many units concurrently (I/O-bound LLM calls need no process each), async clients
(redis.asyncio, AsyncOpenAI) are created once per loop and reused, and a finished unit's completion is
published to Redis for the coordinator whatever happened: an error is a FAIL completion, never a lost unit.

Redis round trips are what a unit costs besides its own work, so they are shared (scripts.py): one script call
per message checks every unit's done and cancel markers, takes their leases and fetches missing snapshots;
completions finishing together go out in one script call. While units run, the waiting Celery thread renews
their leases (independently of the loop, so a busy loop is not mistaken for a dead worker); the coordinator
sends a unit again when its lease expires without a completion.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.context import Context
from ..core.errors import TasktreeError
from ..core.log import logger
from ..core.registry import get_tree
from ..core.result import Status
from ..core.serde import decode_value, encode_value
from ..tracing.trace import TraceNode
from . import changes, keys
from .protocol import Completion, Unit
from .scripts import ALREADY_DONE, CANCELLED, WorkerScripts

T = TypeVar("T")

#: Redis connections of one worker process's loop, shared by all the units it runs.
REDIS_MAX_CONNECTIONS = 64
#: How long Redis may be unreachable before a worker gives up publishing a completion (the lease then expires
#: and the coordinator sends the unit again).
REDIS_OUTAGE_S = 60.0
#: Snapshots kept in memory per process (Gather children often share one).
SNAPSHOT_CACHE = 256


class UnitError(TasktreeError):
    """A unit that cannot run here (unknown tree, other version, unknown address, expired snapshot)."""


async def retrying(attempt: Callable[[], Awaitable[T]], what: str, outage_s: float = REDIS_OUTAGE_S) -> T:
    """Run `attempt` until Redis answers, backing off, for at most `outage_s`: a blip must not lose a unit."""
    delay, give_up = 0.05, time.monotonic() + outage_s
    while True:
        try:
            return await attempt()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if time.monotonic() + delay > give_up:
                raise
            logger.warning("%s: Redis unavailable (%s: %s); retrying in %.2f s", what, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)  # back-off, not synchronisation
            delay = min(delay * 2, 2.0)


class WorkerRuntime:
    def __init__(
        self, redis_url: str, reply_ttl: int = 3600, lease_ttl: float = 30.0, snapshot_cache: int = SNAPSHOT_CACHE
    ) -> None:
        self.redis_url = redis_url
        self.snapshot_cache = snapshot_cache
        self.reply_ttl = reply_ttl
        self.lease_ttl = lease_ttl
        self.pid = os.getpid()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis: Any = None
        self._scripts: WorkerScripts
        self._sync_redis: Any = None
        self._snapshots: OrderedDict[str, bytes] = OrderedDict()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._leased: set[str] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._outbox: list[tuple[str, str, bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._serve, name="tasktree-loop", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _serve(self) -> None:
        import redis.asyncio as redis

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        # redis-py's default pool raises MaxConnectionsError as soon as its 100 connections are busy, which
        # hundreds of units on this loop reach; a blocking pool makes a command wait for a free connection.
        # (max_connections in the URL's query string overrides the size.)
        pool = redis.BlockingConnectionPool.from_url(self.redis_url, max_connections=REDIS_MAX_CONNECTIONS)
        self._redis = redis.Redis(connection_pool=pool)
        self._scripts = WorkerScripts(self._redis)
        self._ready.set()
        self._loop.run_forever()

    def close(self, timeout: float = 5.0) -> None:
        """Close Redis and stop the loop (tests; a worker process just exits)."""
        assert self._loop is not None

        async def shutdown() -> None:
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await self._redis.aclose()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout)
        if self._sync_redis is not None:
            self._sync_redis.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    # -- called from Celery's pool threads ------------------------------------------------------------------
    def run_batch(self, units: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        """Run a message's units on the loop; meanwhile renew their leases from this thread."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._run_batch(units, meta), self._loop)
        ids = [str(raw.get("execution_id", "")) for raw in units if isinstance(raw, dict)]
        while True:
            try:
                return future.result(timeout=self.lease_ttl / 3)
            except concurrent.futures.TimeoutError:
                self._renew_leases(ids)

    def _renew_leases(self, ids: list[str]) -> None:
        live = [execution_id for execution_id in ids if execution_id in self._leased]
        if not live:
            return
        if self._sync_redis is None:
            import redis

            self._sync_redis = redis.Redis.from_url(self.redis_url)
        try:
            pipe = self._sync_redis.pipeline(transaction=False)
            for execution_id in live:
                pipe.pexpire(keys.lease(execution_id), int(self.lease_ttl * 1000))
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the next renewal tries again; the lease has slack
            logger.warning("renewing %d unit leases failed: %s: %s", len(live), type(exc).__name__, exc)

    # -- on the loop ------------------------------------------------------------------------------------------
    async def _run_batch(self, raws: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        started = time.time()
        units = []
        for raw in raws:
            try:
                units.append(Unit.model_validate(raw))
            except ValueError as exc:
                await self._reject(raw, exc, meta)
        if not units:
            return
        worker = meta.get("hostname", "") or str(self.pid)
        # the batch holds its own snapshots: other batches may evict them from the cache before these units run
        payloads = {unit.snapshot: self._snapshots.get(unit.snapshot) for unit in units}
        missing = sorted(key for key, payload in payloads.items() if payload is None)
        flags, fetched = await retrying(
            lambda: self._scripts.admit(
                [unit.execution_id for unit in units], missing, f"{worker} (pid {self.pid})",
                int(self.lease_ttl * 1000), self.reply_ttl,
            ),
            f"admitting {len(units)} units",
        )
        for key, payload in zip(missing, fetched, strict=True):
            payloads[key] = payload
            if payload is not None:
                self._remember_snapshot(key, payload)
        runs = []
        for unit, flag in zip(units, flags, strict=True):
            if flag & ALREADY_DONE:
                continue  # a duplicate delivery of a finished unit: never run twice
            self._leased.add(unit.execution_id)
            snapshot = payloads[unit.snapshot]
            runs.append(self._run_unit(unit, snapshot, meta, cancelled=bool(flag & CANCELLED), started=started))
        await asyncio.gather(*runs)

    async def _reject(self, raw: Any, exc: Exception, meta: dict[str, Any]) -> None:
        """A unit this worker cannot read (another tasktree_dist version?): FAIL it if it says where to answer."""
        execution_id = raw.get("execution_id") if isinstance(raw, dict) else None
        reply_to = raw.get("reply_to") if isinstance(raw, dict) else None
        error = (f"unreadable unit (coordinator and worker {meta.get('hostname') or self.pid} run different "
                 f"tasktree_dist versions?): {exc}")
        if not (isinstance(execution_id, str) and isinstance(reply_to, str)):
            logger.error("dropping a unit that names no reply list: %s; %.300r", error, raw)
            return
        completion = Completion(execution_id=execution_id, status="FAIL", error=error,
                                worker=meta.get("hostname", ""), pid=self.pid)
        await self._publish(execution_id, reply_to, completion)

    def _remember_snapshot(self, key: str, payload: bytes) -> None:
        self._snapshots[key] = payload
        if len(self._snapshots) > self.snapshot_cache:
            self._snapshots.popitem(last=False)

    async def _run_unit(
        self, unit: Unit, snapshot: bytes | None, meta: dict[str, Any], cancelled: bool, started: float
    ) -> None:
        completion = Completion(
            execution_id=unit.execution_id, status="FAIL", worker=meta.get("hostname", ""), pid=self.pid,
            celery_task_id=meta.get("task_id", ""), queue=unit.queue,
            queued_ms=round(max(0.0, started - unit.sent_at) * 1000, 3),
        )
        try:
            if cancelled:
                completion.error = "cancelled before it started"
            else:
                await self._cancellable(unit, snapshot, completion)
        except asyncio.CancelledError:
            completion.status, completion.error = "FAIL", "cancelled by the coordinator while running"
        except Exception as exc:  # noqa: BLE001 - whatever happens, the coordinator hears about it
            completion.status, completion.error = "FAIL", f"{type(exc).__name__}: {exc}"
        completion.run_ms = round((time.time() - started) * 1000, 3)
        if completion.error:
            completion.error = f"{completion.error} [unit {unit.where} on worker {completion.worker or self.pid}]"
        try:
            await self._publish(unit.execution_id, unit.reply_to, completion)
        finally:
            self._leased.discard(unit.execution_id)

    async def _cancellable(self, unit: Unit, snapshot: bytes | None, completion: Completion) -> None:
        """Run the unit as a task the cancel watcher can stop when the coordinator gives up on it."""
        task = asyncio.get_running_loop().create_task(self._execute(unit, snapshot, completion))
        self._running[unit.execution_id] = task
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_cancellations())
        try:
            await task
        finally:
            self._running.pop(unit.execution_id, None)

    async def _watch_cancellations(self, interval: float = 0.25) -> None:
        """One poll for all running units of this process: a cancelled run stops here within a second."""
        while self._running:
            await asyncio.sleep(interval)  # a polling period, not synchronisation
            ids = list(self._running)
            try:
                flags = await self._redis.mget([keys.cancel(execution_id) for execution_id in ids])
            except Exception as exc:  # noqa: BLE001 - Redis blip: poll again next period
                logger.warning("polling cancellations failed: %s: %s", type(exc).__name__, exc)
                continue
            for execution_id, cancelled in zip(ids, flags, strict=True):
                task = self._running.get(execution_id)
                if cancelled is not None and task is not None:
                    task.cancel()

    async def _execute(self, unit: Unit, snapshot: bytes | None, completion: Completion) -> None:
        tree = get_tree(unit.tree)
        if tree.fingerprint != unit.fingerprint:
            raise UnitError(
                f"tree {unit.tree!r} here has fingerprint {tree.fingerprint}, the coordinator sent "
                f"{unit.fingerprint}: workers and coordinator run different versions of the tree; redeploy"
            )
        target = tree.node(unit.address) if unit.address else tree
        if snapshot is None:
            raise UnitError(f"blackboard snapshot {unit.snapshot} has expired or was never stored")
        before = orjson.loads(snapshot)
        blackboard = decode_value(before)
        context = Context(run_id=unit.run_id, last_result=decode_value(unit.last_result))
        context._blackboards.append(blackboard)
        holder = TraceNode("unit")
        context._tracer = holder
        if unit.address:
            result = await target(context)
        else:
            result = await target(context, index=unit.index)
        fragment = holder._children[0] if holder._children else None
        completion.trace = fragment.to_fragment() if fragment is not None else None
        completion.status = "OK" if result.status is Status.OK else "FAIL"
        completion.data = encode_value(result.data, "result.data")
        completion.changes = changes.diff(before, encode_value(blackboard, "blackboard"))

    async def _publish(self, execution_id: str, reply_to: str, completion: Completion) -> None:
        """Queue the completion; completions finishing in the same loop iteration share one transaction."""
        loop = asyncio.get_running_loop()
        sent: asyncio.Future[None] = loop.create_future()
        self._outbox.append((execution_id, reply_to, completion.model_dump_json().encode(), sent))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        await sent

    async def _flush(self) -> None:
        while self._outbox:
            await asyncio.sleep(0)  # one loop iteration: let units finishing together join this batch
            batch, self._outbox = self._outbox, []
            completions = [(execution_id, reply_to, payload) for execution_id, reply_to, payload, _ in batch]
            try:
                await retrying(
                    partial(self._scripts.publish, completions, self.reply_ttl), f"publishing {len(batch)} completions"
                )
            except Exception as exc:  # noqa: BLE001 - Redis gone for a minute: the leases will expire
                logger.error("lost %d completions (Redis unreachable): %s", len(batch), exc)
                for *_, sent in batch:
                    if not sent.done():
                        sent.set_exception(exc)
            else:
                for *_, sent in batch:
                    if not sent.done():
                        sent.set_result(None)


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def get_runtime(redis_url: str, reply_ttl: int = 3600, lease_ttl: float = 30.0) -> WorkerRuntime:
    """This process's runtime, started on first use (so after any fork)."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = WorkerRuntime(redis_url, reply_ttl, lease_ttl)
        return _runtime

