"""The worker side: one long-lived event loop per process runs every unit this process receives.

Celery's threads pool hands each message to a thread, which submits the message's units to the loop and waits.
So a process runs many units concurrently (I/O-bound LLM calls need no process each), async clients
(redis.asyncio, AsyncOpenAI) are created once per loop and reused, and a finished unit's completion is
published to Redis for the coordinator whatever happened: an error is a FAIL completion, never a lost unit.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import orjson

from ..context import Context
from ..errors import TasktreeError
from ..registry import get_tree
from ..result import Result, Status
from ..serde import decode_value, encode_value
from ..trace import TraceNode
from . import changes, keys
from .protocol import Completion, Unit

#: Redis connections of one worker process's loop, shared by all the units it runs.
REDIS_MAX_CONNECTIONS = 64


class UnitError(TasktreeError):
    """A unit that cannot run here (unknown tree, other version, unknown address, expired snapshot)."""


class WorkerRuntime:
    def __init__(self, redis_url: str, reply_ttl: int = 3600) -> None:
        self.redis_url = redis_url
        self.reply_ttl = reply_ttl
        self.pid = os.getpid()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis: Any = None
        self._snapshots: OrderedDict[str, bytes] = OrderedDict()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._watcher: asyncio.Task[None] | None = None
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
        self._ready.set()
        self._loop.run_forever()

    # -- called from Celery's pool threads ------------------------------------------------------------------
    def run_batch(self, units: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._run_batch(units, meta), self._loop)
        future.result()

    # -- on the loop ------------------------------------------------------------------------------------------
    async def _run_batch(self, units: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        await asyncio.gather(*(self._run_unit(raw, meta) for raw in units))

    async def _run_unit(self, raw: dict[str, Any], meta: dict[str, Any]) -> None:
        started = time.time()
        unit = Unit.model_validate(raw)
        completion = Completion(
            execution_id=unit.execution_id, status="FAIL", worker=meta.get("hostname", ""), pid=self.pid,
            celery_task_id=meta.get("task_id", ""), queue=unit.queue,
            queued_ms=round(max(0.0, started - unit.sent_at) * 1000, 3),
        )
        try:
            if await self._redis.exists(keys.done(unit.execution_id)):
                return  # a duplicate delivery of a unit that already completed: never apply twice
            if await self._redis.exists(keys.cancel(unit.execution_id)):
                completion.error = "cancelled before it started"
            else:
                await self._cancellable(unit, completion)
        except asyncio.CancelledError:
            completion.status, completion.error = "FAIL", "cancelled by the coordinator while running"
        except Exception as exc:  # noqa: BLE001 - whatever happens, the coordinator hears about it
            completion.status, completion.error = "FAIL", f"{type(exc).__name__}: {exc}"
        completion.run_ms = round((time.time() - started) * 1000, 3)
        if completion.error:
            completion.error = f"{completion.error} [unit {unit.where} on worker {completion.worker or self.pid}]"
        await self._publish(unit, completion)

    async def _cancellable(self, unit: Unit, completion: Completion) -> None:
        """Run the unit as a task the cancel watcher can stop when the coordinator gives up on it."""
        task = asyncio.get_running_loop().create_task(self._execute(unit, completion))
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
            await asyncio.sleep(interval)
            ids = list(self._running)
            pipe = self._redis.pipeline(transaction=False)
            for execution_id in ids:
                pipe.exists(keys.cancel(execution_id))
            for execution_id, cancelled in zip(ids, await pipe.execute(), strict=True):
                task = self._running.get(execution_id)
                if cancelled and task is not None:
                    task.cancel()

    async def _execute(self, unit: Unit, completion: Completion) -> None:
        tree = get_tree(unit.tree)
        if tree.fingerprint != unit.fingerprint:
            raise UnitError(
                f"tree {unit.tree!r} here has fingerprint {tree.fingerprint}, the coordinator sent "
                f"{unit.fingerprint}: workers and coordinator run different versions of the tree; redeploy"
            )
        target = tree.node(unit.address) if unit.address else tree
        before = orjson.loads(await self._snapshot(unit.snapshot))
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
        completion.data = encode_value(result, "result").get("data")
        completion.changes = changes.diff(before, encode_value(blackboard, "blackboard"))

    async def _snapshot(self, key: str) -> bytes:
        payload = self._snapshots.get(key)
        if payload is None:
            payload = await self._redis.get(key)
            if payload is None:
                raise UnitError(f"blackboard snapshot {key} has expired or was never stored")
            self._snapshots[key] = payload
            if len(self._snapshots) > 256:
                self._snapshots.popitem(last=False)
        return payload

    async def _publish(self, unit: Unit, completion: Completion) -> None:
        if not await self._redis.set(keys.done(unit.execution_id), 1, nx=True, ex=self.reply_ttl):
            return  # completed elsewhere meanwhile
        pipe = self._redis.pipeline(transaction=False)
        pipe.rpush(unit.reply_to, completion.model_dump_json())
        pipe.expire(unit.reply_to, self.reply_ttl)
        await pipe.execute()


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def get_runtime(redis_url: str, reply_ttl: int = 3600) -> WorkerRuntime:
    """This process's runtime, started on first use (so after any fork)."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = WorkerRuntime(redis_url, reply_ttl)
        return _runtime


def result_of(completion: Completion) -> Result:
    return Result(Status.OK if completion.status == "OK" else Status.FAIL, decode_value(completion.data))
