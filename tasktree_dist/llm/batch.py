"""Batch mode's shared state: the fleet's pending batches per (provider, model), their submission to the provider's
Batch API (a JSONL file of requests keyed by custom_id, about half the price, results within 24 h), one poller
per batch, and each call's outcome by custom_id. Everything is in the fleet's Redis, with TTLs:

  tasktree:batch:pending:<base url>|<model>   LIST  request lines waiting for their batch (+ ":since", ms)
  tasktree:batch:sealed:<token>               LIST  a pending batch taken by the process that submits it
  tasktree:batch:b:<batch id>                 HASH  scope, base_url, model, status, count
  tasktree:batch:ids:<batch id>               LIST  its custom ids
  tasktree:batch:added:<custom id>            STR   the call is in a batch (a re-dispatched unit adds it once)
  tasktree:batch:of:<custom id>               STR   the call's batch id, once submitted
  tasktree:batch:result:<custom id>           STR   JSON {"ok", "body" (the chat completion) | "error", "live"}
  tasktree:batch:lease:<batch id>             STR   the one process polling the batch (renewed each poll)
  tasktree:batch:nobatch:<base url>           STR   the provider answered 404: its calls go live (a day)

Why a shared pending batch: a run's items are spread over the fleet's workers; one batch per (provider, model)
for the whole fleet reaches TASKTREE_LLM_BATCH_MAX_REQUESTS sooner than one per process. Adding a call and
sealing a full batch is one atomic script call (RPUSH, then RENAME when full): exactly one process submits each
batch. A batch that stays small goes after TASKTREE_LLM_BATCH_MAX_WAIT_S (each process that added to it keeps a
timer; sealing is atomic too). API keys never go to Redis: a process submits and polls with its own.

Outcomes: an answered request is `ok` with its chat completion; an errored request, or one that a failed,
expired or cancelled batch never ran, or one a provider without a Batch API refused, is not ok, with the reason,
and goes live if the call's batch_fallback says so (the caller decides; nothing here sends live calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import orjson

from ..core.log import logger
from ..core.loops import CloseWithTheLoop
from ..core.redis_client import connect

KEY = "tasktree:batch:"
#: A batch's status when the provider is done with it.
TERMINAL = ("completed", "failed", "expired", "cancelled")
#: How long a provider that answered 404 on /v1/batches is sent live calls without asking again.
NO_BATCH_API_S = 86400
#: Redis connections of one process's queue.
REDIS_CONNECTIONS = 32

_ADD = """
if redis.call('SET', KEYS[3], 1, 'NX', 'PX', ARGV[3]) == false then return {-1, 0} end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local t = redis.call('TIME')
redis.call('SET', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), 'NX', 'PX', ARGV[3])
local n = redis.call('LLEN', KEYS[1])
if n >= tonumber(ARGV[2]) then
  redis.call('RENAME', KEYS[1], ARGV[4])
  redis.call('DEL', KEYS[2])
  return {n, 1}
end
return {n, 0}
"""

_SEAL_IF_DUE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since = tonumber(redis.call('GET', KEYS[2]) or '')
if since and now - since < tonumber(ARGV[1]) then return since + tonumber(ARGV[1]) - now end
redis.call('RENAME', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 0
"""


class BatchError(Exception):
    """The Batch API could not take a call (e.g. a provider without one): send it live or fail it."""


@dataclass(frozen=True)
class BatchOutcome:
    """One call's end in its batch: `ok` with the chat completion (`body`), or not, with the reason."""

    custom_id: str
    ok: bool
    body: dict[str, Any] | None = None
    error: str | None = None
    batch_id: str | None = None

    @classmethod
    def from_json(cls, custom_id: str, raw: bytes) -> BatchOutcome:
        data = orjson.loads(raw)
        return cls(custom_id, bool(data.get("ok")), data.get("body"), data.get("error"), data.get("batch"))


def _outcome(ok: bool, batch_id: str | None, body: Any = None, error: str | None = None) -> bytes:
    return orjson.dumps({"ok": ok, "body": body, "error": error, "batch": batch_id})


class BatchQueue:
    """This process's view of the fleet's batches (one per event loop and Redis URL): adds calls, submits the
    batches it seals, polls the batches its calls wait for (one poller per batch fleet-wide), reads outcomes."""

    def __init__(self, redis_url: str, settings: Any = None) -> None:
        if settings is None:
            from ..core.settings import get_settings

            settings = get_settings()
        self.settings = settings
        # a blocking pool: thousands of calls of one process adding at once wait for a connection (redis-py's
        # default pool raises past 100)
        self.redis = connect(redis_url, asynchronous=True, max_connections=REDIS_CONNECTIONS, pool_timeout=None)
        self._add = self.redis.register_script(_ADD)
        self._seal_if_due = self.redis.register_script(_SEAL_IF_DUE)
        self.token = uuid.uuid4().hex
        self._clients: dict[str, tuple[str, str | None, str]] = {}  # scope -> (base_url, api key, model)
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._watchers: dict[str, asyncio.Task[str]] = {}
        self._waiting: dict[str, asyncio.Future[BatchOutcome]] = {}  # custom id -> its caller
        self._batch_of: dict[str, str] = {}  # custom id -> batch id, once found
        self._resolver: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats = {"added": 0, "batches": 0, "polls": 0, "outcomes": 0}

    @property
    def _ttl_ms(self) -> int:
        return int(self.settings.llm_batch_ttl_s * 1000)

    # -- adding ------------------------------------------------------------------------------------------------
    async def add(self, base_url: str, api_key: str | None, model: str, body: dict[str, Any],
                  custom_id: str | None = None) -> str:
        """Put one chat-completions request `body` in the fleet's pending batch of (base_url, model); returns its
        custom id. A `custom_id` already added (a re-dispatched unit's call) is not added again: the call waits for
        the outcome of the first. Raises BatchError when the provider has no Batch API."""
        base_url = base_url.rstrip("/")
        scope = f"{base_url}|{model}"
        self._clients[scope] = (base_url, api_key, model)
        custom_id = custom_id or f"tt-{uuid.uuid4().hex}"
        if await self.redis.exists(f"{KEY}nobatch:{base_url}"):
            raise BatchError(f"{base_url} has no Batch API (it answered 404 on /v1/batches): the call goes live")
        line = orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
        sealed = f"{KEY}sealed:{uuid.uuid4().hex}"
        count, full = await self._add(
            keys=[f"{KEY}pending:{scope}", f"{KEY}pending:{scope}:since", f"{KEY}added:{custom_id}"],
            args=[line, self.settings.llm_batch_max_requests, self._ttl_ms, sealed])
        if count < 0:
            return custom_id  # added before: its batch (or its pending one) answers it once
        self.stats["added"] += 1
        if full:
            self._spawn(self._submit(scope, sealed))
        elif scope not in self._timers or self._timers[scope].done():
            self._timers[scope] = self._spawn(self._flush_when_due(scope))
        return custom_id

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush_when_due(self, scope: str) -> None:
        """Seal and submit `scope`'s pending batch once it has waited TASKTREE_LLM_BATCH_MAX_WAIT_S."""
        wait_ms = self.settings.llm_batch_max_wait_s * 1000
        while True:
            sealed = f"{KEY}sealed:{uuid.uuid4().hex}"
            left = await self._seal_if_due(keys=[f"{KEY}pending:{scope}", f"{KEY}pending:{scope}:since"],
                                           args=[int(wait_ms), sealed])
            if left < 0:
                return  # nothing pending (another process sealed it)
            if left == 0:
                await self._submit(scope, sealed)
                return
            await asyncio.sleep(left / 1000)

    async def flush(self) -> None:
        """Seal and submit this process's pending batches now, whatever their size (tests, shutdown)."""
        for scope in list(self._clients):
            sealed = f"{KEY}sealed:{uuid.uuid4().hex}"
            if await self._seal_if_due(keys=[f"{KEY}pending:{scope}", f"{KEY}pending:{scope}:since"],
                                       args=[0, sealed]) == 0:
                await self._submit(scope, sealed)

    # -- submitting --------------------------------------------------------------------------------------------
    def _client(self, base_url: str, api_key: str | None) -> Any:
        from .clients import get_llm_client

        return get_llm_client(base_url, api_key or "sk-none")

    async def _submit(self, scope: str, sealed: str) -> None:
        """Upload the sealed batch as JSONL and create the provider's batch; a refusal answers its calls."""
        import openai

        base_url, api_key, model = self._clients[scope]
        lines = await self.redis.lrange(sealed, 0, -1)
        ids = [orjson.loads(line)["custom_id"] for line in lines]
        client = self._client(base_url, api_key)
        try:
            uploaded = await client.files.create(file=("batch.jsonl", b"\n".join(lines) + b"\n"), purpose="batch")
            batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                completion_window="24h", metadata={"tasktree_scope": scope[:500]})
        except openai.NotFoundError:
            await self.redis.set(f"{KEY}nobatch:{base_url}", 1, ex=NO_BATCH_API_S)
            await self._answer_all(ids, None, f"{base_url} has no Batch API (404 on /v1/batches)")
            await self.redis.delete(sealed)
            return
        except (openai.OpenAIError, OSError) as exc:
            logger.warning("batch of %d calls to %s not submitted: %s", len(ids), scope, exc)
            await self._answer_all(ids, None, f"the batch could not be submitted to {base_url}: "
                                              f"{type(exc).__name__}: {exc}")
            await self.redis.delete(sealed)
            return
        ttl = self._ttl_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(f"{KEY}b:{batch.id}", mapping={"scope": scope, "base_url": base_url, "model": model,
                                                     "status": batch.status, "count": len(ids)})
            pipe.pexpire(f"{KEY}b:{batch.id}", ttl)
            pipe.rpush(f"{KEY}ids:{batch.id}", *ids)
            pipe.pexpire(f"{KEY}ids:{batch.id}", ttl)
            for custom_id in ids:
                pipe.set(f"{KEY}of:{custom_id}", batch.id, px=ttl)
            pipe.delete(sealed)
            await pipe.execute()
        self.stats["batches"] += 1
        logger.info("batch %s: %d calls to %s submitted", batch.id, len(ids), scope)

    async def _answer_all(self, ids: list[str], batch_id: str | None, error: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for custom_id in ids:
                pipe.set(f"{KEY}result:{custom_id}", _outcome(False, batch_id, error=error), px=self._ttl_ms)
            await pipe.execute()

    # -- waiting and polling -----------------------------------------------------------------------------------
    async def batch_of(self, custom_id: str) -> str | None:
        """The batch a call went in, once its batch is submitted."""
        value = await self.redis.get(f"{KEY}of:{custom_id}")
        return value.decode() if value else None

    async def outcome(self, custom_id: str) -> BatchOutcome | None:
        """The call's outcome, once its batch is done (None before)."""
        raw = await self.redis.get(f"{KEY}result:{custom_id}")
        return BatchOutcome.from_json(custom_id, raw) if raw else None

    async def wait(self, custom_id: str) -> BatchOutcome:
        """The call's outcome, once its batch is done. The process's calls are looked after together: one MGET per
        poll period finds the batches of those submitted, one watcher per batch polls it (when this process holds
        its lease) and hands out its outcomes. The caller bounds the wait (asyncio.timeout); a run that parks
        instead needs durable waits."""
        future: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
        self._waiting[custom_id] = future
        if self._resolver is None or self._resolver.done():
            self._resolver = self._spawn(self._resolve())
        try:
            return await future
        finally:
            self._waiting.pop(custom_id, None)
            self._batch_of.pop(custom_id, None)

    async def _resolve(self) -> None:
        """While calls of this process wait: find their batches, start a watcher per batch, answer early ends."""
        while self._waiting:
            unplaced = [cid for cid in self._waiting if cid not in self._batch_of]
            if unplaced:
                batches = await self.redis.mget([f"{KEY}of:{cid}" for cid in unplaced])
                results = await self.redis.mget([f"{KEY}result:{cid}" for cid in unplaced])
                for cid, batch_id, raw in zip(unplaced, batches, results, strict=True):
                    if raw is not None:  # answered without a batch (a refused submission)
                        self._settle(cid, BatchOutcome.from_json(cid, raw))
                    elif batch_id is not None:
                        self._batch_of[cid] = batch_id.decode()
                        self._ensure_watcher(batch_id.decode())
            await asyncio.sleep(min(self.settings.llm_batch_poll_s, 1.0))

    def _ensure_watcher(self, batch_id: str) -> None:
        watcher = self._watchers.get(batch_id)
        if watcher is None or watcher.done():
            watcher = self._watchers[batch_id] = self._spawn(self.watch(batch_id))
            watcher.add_done_callback(lambda _, b=batch_id: self._spawn(self._hand_out(b)))

    async def _hand_out(self, batch_id: str) -> None:
        """Batch `batch_id` is done: give each of this process's calls in it its outcome."""
        self._watchers.pop(batch_id, None)
        cids = [cid for cid, placed in self._batch_of.items() if placed == batch_id and cid in self._waiting]
        if not cids:
            return
        results = await self.redis.mget([f"{KEY}result:{cid}" for cid in cids])
        for cid, raw in zip(cids, results, strict=True):
            self._settle(cid, BatchOutcome.from_json(cid, raw) if raw is not None else BatchOutcome(
                cid, False, error=f"batch {batch_id} ended with no outcome for this call", batch_id=batch_id))

    def _settle(self, custom_id: str, outcome: BatchOutcome) -> None:
        future = self._waiting.get(custom_id)
        if future is not None and not future.done():
            future.set_result(outcome)

    async def watch(self, batch_id: str) -> str:
        """Until batch `batch_id` is done: poll it while this process holds its lease, else look at its record
        (another process polls). Returns its final status."""
        record = f"{KEY}b:{batch_id}"
        lease = f"{KEY}lease:{batch_id}"
        lease_ms = int(self.settings.llm_batch_lease_s * 1000)
        while True:
            status = await self.redis.hget(record, "status")
            if status is None:
                return "unknown"
            if status.decode() == "done":
                return (await self.redis.hget(record, "final") or b"done").decode()
            holder = await self.redis.set(lease, self.token, nx=True, px=lease_ms)
            if not holder and await self.redis.get(lease) == self.token.encode():
                holder = bool(await self.redis.pexpire(lease, lease_ms))
            if holder:
                final = await self._poll(batch_id)
                if final is not None:
                    await self.redis.delete(lease)
                    return final
            await asyncio.sleep(self.settings.llm_batch_poll_s)

    async def _poll(self, batch_id: str) -> str | None:
        """Look at the batch at the provider; when it is done, record every call's outcome. None: still running."""
        fields = await self.redis.hmget(f"{KEY}b:{batch_id}", "base_url", "scope")
        base_url, scope = (field.decode() if field else "" for field in fields)
        known = self._clients.get(scope)
        client = self._client(base_url, known[1] if known else None)
        self.stats["polls"] += 1
        batch = await client.batches.retrieve(batch_id)
        if batch.status not in TERMINAL:
            await self.redis.hset(f"{KEY}b:{batch_id}", "status", batch.status)
            return None
        await self._collect(client, batch)
        return str(batch.status)

    async def _collect(self, client: Any, batch: Any) -> None:
        """Read the output and error files into one outcome per custom id; ids in neither get the batch's end."""
        ids = [value.decode() for value in await self.redis.lrange(f"{KEY}ids:{batch.id}", 0, -1)]
        expected = set(ids)
        found: dict[str, bytes] = {}
        unreadable = 0
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = (await client.files.content(file_id)).content
            for raw in content.splitlines():
                if not raw.strip():
                    continue
                try:
                    line = orjson.loads(raw)
                    custom_id = line["custom_id"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    unreadable += 1
                    continue
                if custom_id in expected:
                    found[custom_id] = self._line_outcome(batch.id, line)
        if unreadable:
            logger.warning("batch %s: %d lines of its files are not JSON with a custom_id", batch.id, unreadable)
        missing = (f"batch {batch.id} ended {batch.status} without this request's result"
                   + (f" ({unreadable} unreadable lines in its files)" if unreadable else ""))
        async with self.redis.pipeline(transaction=False) as pipe:
            for custom_id in ids:
                value = found.get(custom_id) or _outcome(False, batch.id, error=missing)
                pipe.set(f"{KEY}result:{custom_id}", value, px=self._ttl_ms)
            pipe.hset(f"{KEY}b:{batch.id}", mapping={"status": "done", "final": batch.status,
                                                     "answered": sum(1 for v in found.values() if b'"ok":true' in v)})
            await pipe.execute()
        self.stats["outcomes"] += len(ids)

    @staticmethod
    def _line_outcome(batch_id: str, line: dict[str, Any]) -> bytes:
        response = line.get("response") or {}
        body = response.get("body") if isinstance(response, dict) else None
        if isinstance(response, dict) and response.get("status_code") == 200 and isinstance(body, dict):
            return _outcome(True, batch_id, body=body)
        error = line.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
        status = response.get("status_code") if isinstance(response, dict) else None
        message = error.get("message") if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        return _outcome(False, batch_id, error=f"batch {batch_id}: request errored"
                        + (f" (HTTP {status})" if status else "") + (f" [{code}]" if code else "")
                        + f": {message or 'no message'}")

    async def cancel(self, batch_id: str) -> None:
        """Ask the provider to cancel a batch (its calls then end not ok when it is next polled)."""
        fields = await self.redis.hmget(f"{KEY}b:{batch_id}", "base_url", "scope")
        base_url, scope = (field.decode() if field else "" for field in fields)
        known = self._clients.get(scope)
        await self._client(base_url, known[1] if known else None).batches.cancel(batch_id)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.redis.aclose()


_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, BatchQueue]] = weakref.WeakKeyDictionary()


def get_batch_queue(redis_url: str) -> BatchQueue:
    """The running loop's queue on `redis_url` (its Redis client is bound to the loop), closed with the loop."""
    loop = asyncio.get_running_loop()
    by_url = _queues.get(loop)
    if by_url is None:
        by_url = _queues[loop] = {}
        _close_with_the_loop.register(loop)
    queue = by_url.get(redis_url)
    if queue is None:
        queue = by_url[redis_url] = BatchQueue(redis_url)
    return queue


async def close_batch_queues() -> None:
    """Close the running loop's batch queues (their timers and watchers stop; pending batches stay in Redis)."""
    for queue in _queues.pop(asyncio.get_running_loop(), {}).values():
        await queue.aclose()
    await _close_with_the_loop.forget()


_close_with_the_loop = CloseWithTheLoop(close_batch_queues)
