"""Batch mode's shared state: the fleet's pending batches per (provider, model), their submission to the provider's
Batch API (a JSONL file of requests keyed by custom_id, about half the price, results within 24 h), one poller
per batch, and each call's outcome by custom_id. Everything is in the fleet's Redis, with TTLs (the keys are
listed and built in llm.batch_keys).

Why a shared pending batch: a run's items are spread over the fleet's workers; one batch per (provider, model)
for the whole fleet reaches TASKTREE_LLM_BATCH_MAX_REQUESTS sooner than one per process. Adding a call and
sealing a full batch is one atomic script call (RPUSH, then RENAME when full): exactly one process submits each
batch. A batch that stays small is sealed after TASKTREE_LLM_BATCH_MAX_WAIT_S by whichever process supervises
batches first. API keys never go to Redis: a process submits and polls with its own (the key its own calls to
that provider used, else OPENAI_API_KEY).

Supervision (`supervise`): every process that adds calls, waits for them, or supervises runs looks after the
fleet's batches while there are any, through three indexes: pending batches past their wait are sealed and
submitted; a sealed batch whose submitter's lease lapsed (it died between seal and create, or between create and
recording it) is looked for at the provider by the seal token in its metadata and recorded, or submitted if it
never got there (never paid twice); open batches are polled, one poller per batch fleet-wide (a lease). When a
batch is done its output and error files become one outcome per custom id, and the runs waiting on those calls
are signalled (llm.batch_park.BatchListener): a parked run resumes.

Outcomes: an answered request is `ok` with its chat completion; an errored request, or one that a failed,
expired or cancelled batch never ran, or one a provider without a Batch API refused, is not ok, with the reason,
and goes live if the call's batch_fallback says so (the caller decides; nothing here sends live calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import orjson

from ..core.aio import reraise_if_cancelled
from ..core.log import logger
from ..core.loops import CloseWithTheLoop
from ..core.redis_client import connect
from . import batch_keys as K
from .batch_park import batch_listener

KEY = K.KEY
#: A batch's status when the provider is done with it.
TERMINAL = ("completed", "failed", "expired", "cancelled")
#: How long a provider that answered 404 on /v1/batches is sent live calls without asking again.
NO_BATCH_API_S = 86400
#: Redis connections of one process's queue.
REDIS_CONNECTIONS = 32
#: Batches of the provider's list looked through for a sealed batch's seal token (newest first).
RECOVER_LOOK_MAX = 1000
#: Runs signalled at once when a batch is read (each one Lua call).
SIGNAL_CHUNK = 200

# a sealed batch: RENAME the pending list to its sealed key, index it, and lease its submission to this process
_SEAL = """
local function seal(now)
  redis.call('RENAME', KEYS[1], KEYS[4])
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('ZADD', KEYS[6], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[6], ARGV[6])
  redis.call('SET', KEYS[5], ARGV[5], 'PX', ARGV[4])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: pending, since, pending index, sealed, submitting, sealed index, added.
#: ARGV: wait ms | max requests, scope, sealed member, lease ms, owner, ttl ms, line, run id.
_ADD = _SEAL + """
if redis.call('SET', KEYS[7], ARGV[8], 'NX', 'PX', ARGV[6]) == false then return {-1, 0} end
redis.call('RPUSH', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('SET', KEYS[2], now, 'NX', 'PX', ARGV[6])
redis.call('ZADD', KEYS[3], 'NX', now, ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
local n = redis.call('LLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then
  seal(now)
  return {n, 1}
end
return {n, 0}
"""

#: KEYS: as _ADD without `added`. ARGV: as _ADD up to ttl ms. Returns -1 (nothing pending), 0 (sealed) or the
#: milliseconds left before it is due.
_SEAL_IF_DUE = _SEAL + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[2])
  return -1
end
local since = tonumber(redis.call('GET', KEYS[2]) or '')
if since and now - since < tonumber(ARGV[1]) then return since + tonumber(ARGV[1]) - now end
seal(now)
return 0
"""


#: KEYS: submitting. ARGV: owner, lease ms. The sealed batch's submission is still ours (or free again: ours now):
#: renewed, 1; another process took it over (we stalled past the lease), 0: it submits, we must not.
_FENCE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
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


def _answered(outcome: bytes | None) -> bool:
    """Whether a stored outcome (`_outcome`'s JSON, or a line's) says the call was answered."""
    return b'"ok":true' in (outcome or b"")


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


#: API keys this process's calls used, per base URL (never written to Redis): what it submits and polls with.
_keys: dict[str, str] = {}
#: Calls of this process waiting in place for their batch (BatchQueue.wait): on a worker, each holds its unit (a
#: slot) while the batch is out; a worker's heartbeat reports it (parked calls hold nothing, so 0 there).
_waiting_in_place = 0


def calls_waiting_in_place() -> int:
    return _waiting_in_place


class BatchQueue:
    """This process's view of the fleet's batches (one per event loop and Redis URL): adds calls, submits the
    batches it seals, supervises the fleet's batches (see the module docstring), reads outcomes."""

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
        self._fence = self.redis.register_script(_FENCE)
        self.token = uuid.uuid4().hex
        self._waiting: dict[str, asyncio.Future[BatchOutcome]] = {}  # custom id -> its caller (waiting in place)
        self._resolver: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._polled: dict[str, float] = {}  # batch id -> when this process last polled it (monotonic)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats = {"added": 0, "batches": 0, "polls": 0, "outcomes": 0, "recovered": 0}

    @property
    def _ttl_ms(self) -> int:
        return int(self.settings.llm_batch_ttl_s * 1000)

    @property
    def _lease_ms(self) -> int:
        return int(self.settings.llm_batch_lease_s * 1000)

    @property
    def _tick(self) -> float:
        return min(self.settings.llm_batch_poll_s, 1.0)

    # -- adding ------------------------------------------------------------------------------------------------
    async def add(self, base_url: str, api_key: str | None, model: str, body: dict[str, Any],
                  custom_id: str | None = None, run_id: str = "") -> str:
        """Put one chat-completions request `body` in the fleet's pending batch of (base_url, model); returns its
        custom id. A `custom_id` already added (a re-dispatched unit's call) is not added again: the call waits for
        the outcome of the first. `run_id`: the run to signal when the call is answered (its wait is named
        `batch:<custom id>`). Raises BatchError when the provider has no Batch API."""
        base_url = base_url.rstrip("/")
        scope = f"{base_url}|{model}"
        if api_key:
            _keys[base_url] = api_key
        custom_id = custom_id or f"tt-{uuid.uuid4().hex}"
        if await self.redis.exists(K.nobatch(base_url)):
            raise BatchError(f"{base_url} has no Batch API (it answered 404 on /v1/batches): the call goes live")
        line = orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
        token = uuid.uuid4().hex
        count, full = await self._add(
            keys=[*self._seal_keys(scope, token), K.added(custom_id)],
            args=[self.settings.llm_batch_max_requests, *self._seal_args(scope, token), line, run_id])
        self.ensure_supervising()
        if count < 0:
            return custom_id  # added before: its batch (or its pending one) answers it once
        self.stats["added"] += 1
        if full:
            self._spawn(self._submit(scope, token))
        return custom_id

    def _seal_keys(self, scope: str, token: str) -> list[str]:
        return [K.pending(scope), K.pending_since(scope), K.PENDING_INDEX, K.sealed(token), K.submitting(token),
                K.SEALED_INDEX]

    def _seal_args(self, scope: str, token: str) -> list[Any]:
        # the sealing call's submission attempt is named by the seal token (a recoverer names its own)
        return [scope, f"{token}\n{scope}", self._lease_ms, token, self._ttl_ms]

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _seal_when_due(self, scope: str, wait_s: float) -> bool:
        """Seal and submit `scope`'s pending batch if it has waited `wait_s`; True when it did."""
        token = uuid.uuid4().hex
        left = await self._seal_if_due(keys=self._seal_keys(scope, token),
                                       args=[int(wait_s * 1000), *self._seal_args(scope, token)])
        if left == 0:
            await self._submit(scope, token)
        return left == 0

    async def flush(self) -> None:
        """Seal and submit the fleet's pending batches now, whatever their size (tests, shutdown)."""
        for scope in await self.redis.zrange(K.PENDING_INDEX, 0, -1):
            await self._seal_when_due(_text(scope), 0)

    # -- submitting --------------------------------------------------------------------------------------------
    def _client(self, base_url: str) -> Any:
        from .clients import get_llm_client

        return get_llm_client(base_url, _keys.get(base_url) or os.environ.get("OPENAI_API_KEY") or "sk-none")

    async def _submit(self, scope: str, token: str, attempt: str | None = None) -> None:
        """Upload the sealed batch as JSONL and create the provider's batch (its seal token in the metadata, so a
        batch whose creation was not recorded is found again); a refusal answers its calls."""
        import openai

        base_url = scope.rpartition("|")[0]
        lines = await self.redis.lrange(K.sealed(token), 0, -1)
        if not lines:  # expired, or recorded by another process meanwhile
            await self._forget_seal(token, scope)
            return
        ids = [orjson.loads(line)["custom_id"] for line in lines]
        client = self._client(base_url)
        try:
            uploaded = await client.files.create(file=("batch.jsonl", b"\n".join(lines) + b"\n"), purpose="batch")
            # just before creating it: still ours? (a process that stalled past its lease, e.g. importing openai
            # on its loop, finds it taken over and leaves it to the other: one batch, paid once)
            if not await self._fence(keys=[K.submitting(token)], args=[attempt or token, self._lease_ms]):
                logger.warning("sealed batch %s of %s was taken over while this process uploaded it", token, scope)
                return
            batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                completion_window="24h",
                                                metadata={"tasktree_scope": scope[:500], "tasktree_seal": token})
        except openai.NotFoundError:
            await self.redis.set(K.nobatch(base_url), 1, ex=NO_BATCH_API_S)
            await self._answer_all(ids, None, f"{base_url} has no Batch API (404 on /v1/batches)")
            await self._forget_seal(token, scope)
            return
        except (openai.OpenAIError, OSError) as exc:
            logger.warning("batch of %d calls to %s not submitted: %s", len(ids), scope, exc)
            await self._answer_all(ids, None, f"the batch could not be submitted to {base_url}: "
                                              f"{type(exc).__name__}: {exc}")
            await self._forget_seal(token, scope)
            return
        await self._record_submitted(batch.id, batch.status, scope, ids, token)
        self.stats["batches"] += 1
        logger.info("batch %s: %d calls to %s submitted", batch.id, len(ids), scope)

    async def _record_submitted(self, batch_id: str, status: str, scope: str, ids: list[str], token: str) -> None:
        base_url, _, model = scope.rpartition("|")
        ttl = self._ttl_ms
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(K.record(batch_id), mapping={"scope": scope, "base_url": base_url, "model": model,
                                                   "status": status, "count": len(ids)})
            pipe.pexpire(K.record(batch_id), ttl)
            pipe.delete(K.ids(batch_id))
            pipe.rpush(K.ids(batch_id), *ids)
            pipe.pexpire(K.ids(batch_id), ttl)
            for custom_id in ids:
                pipe.set(K.of(custom_id), batch_id, px=ttl)
            pipe.zadd(K.OPEN_INDEX, {batch_id: time.time()})
            pipe.pexpire(K.OPEN_INDEX, ttl)
            await pipe.execute()
        await self._forget_seal(token, scope)

    async def _forget_seal(self, token: str, scope: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(K.SEALED_INDEX, f"{token}\n{scope}")
            pipe.delete(K.sealed(token), K.submitting(token))
            await pipe.execute()

    async def _recover(self, token: str, scope: str, sealed_at: float) -> None:
        """A sealed batch whose submitter died: find it at the provider by its seal token (created, not recorded)
        and record it, or submit it now. Holds the batch's submission lease meanwhile (one recoverer)."""
        attempt = uuid.uuid4().hex
        if not await self.redis.set(K.submitting(token), attempt, nx=True, px=self._lease_ms):
            return
        base_url = scope.rpartition("|")[0]
        found = None
        looked = 0
        async for batch in self._client(base_url).batches.list(limit=100):
            if (batch.metadata or {}).get("tasktree_seal") == token:
                found = batch
                break
            looked += 1
            if looked >= RECOVER_LOOK_MAX or (batch.created_at and batch.created_at < sealed_at - 3600):
                break
        self.stats["recovered"] += 1
        if found is None:
            logger.warning("sealed batch %s of %s was never created (its submitter died): submitting it", token,
                           scope)
            await self._submit(scope, token, attempt)
            return
        lines = await self.redis.lrange(K.sealed(token), 0, -1)
        logger.warning("batch %s of %s was created but not recorded (its submitter died): recording it", found.id,
                       scope)
        await self._record_submitted(found.id, found.status, scope,
                                     [orjson.loads(line)["custom_id"] for line in lines], token)

    async def _answer_all(self, ids: list[str], batch_id: str | None, error: str) -> None:
        value = _outcome(False, batch_id, error=error)
        async with self.redis.pipeline(transaction=False) as pipe:
            for custom_id in ids:
                pipe.set(K.result(custom_id), value, px=self._ttl_ms)
            await pipe.execute()
        await self._announce(ids, {custom_id: False for custom_id in ids}, batch_id)

    async def _announce(self, ids: list[str], ok: dict[str, bool], batch_id: str | None) -> None:
        """Signal the runs waiting on these calls (their outcomes are recorded)."""
        listener = batch_listener()
        if listener is None or not ids:
            return
        runs = await self.redis.mget([K.added(custom_id) for custom_id in ids])
        answers = [(_text(run), custom_id, {"custom_id": custom_id, "batch": batch_id, "ok": ok.get(custom_id, False)})
                   for custom_id, run in zip(ids, runs, strict=True) if run]
        for start in range(0, len(answers), SIGNAL_CHUNK):
            await listener.calls_answered(self.redis, answers[start:start + SIGNAL_CHUNK])

    # -- supervising ---------------------------------------------------------------------------------------------
    def ensure_supervising(self) -> None:
        """Look after the fleet's batches from this process while there are any (see the module docstring)."""
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = self._spawn(self._supervise())

    async def _supervise(self) -> None:
        while True:
            try:
                if not await self.supervise_once():
                    return
            except Exception as exc:  # noqa: BLE001 - Redis or the provider away: try again next tick
                reraise_if_cancelled()
                logger.warning("supervising batches failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self._tick)  # a polling period, not synchronisation

    async def supervise_once(self) -> bool:
        """One look at the fleet's batches; False when there are none left to look after."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrange(K.PENDING_INDEX, 0, -1, withscores=True)
            pipe.zrange(K.SEALED_INDEX, 0, -1, withscores=True)
            pipe.zrange(K.OPEN_INDEX, 0, -1)
            pending, sealed, opened = await pipe.execute()
        if not (pending or sealed or opened):
            return False
        now_ms = time.time() * 1000
        wait_ms = self.settings.llm_batch_max_wait_s * 1000
        for scope, since in pending:
            if now_ms - since >= wait_ms:
                await self._seal_when_due(_text(scope), self.settings.llm_batch_max_wait_s)
        if sealed:
            submitters = await self.redis.mget([K.submitting(_text(m).partition("\n")[0]) for m, _ in sealed])
            for (member, since), submitter in zip(sealed, submitters, strict=True):
                token, _, scope = _text(member).partition("\n")
                if submitter is None:
                    await self._recover(token, scope, since / 1000)
        for raw in opened:
            await self._look_after(_text(raw))
        return True

    async def _look_after(self, batch_id: str) -> None:
        """Poll batch `batch_id` if this process holds its lease and its poll period passed. A process that never
        called its provider (no key of its own) leaves it to one that did, unless nobody polled it for two leases;
        a poll that fails gives the lease up (a process with a wrong key must not keep the batch from the others)."""
        if time.monotonic() - self._polled.get(batch_id, 0.0) < self.settings.llm_batch_poll_s:
            return
        base_url, polled_at = (_text(f) for f in await self.redis.hmget(K.record(batch_id), "base_url", "polled_at"))
        recently = polled_at and time.time() - float(polled_at) < 2 * self.settings.llm_batch_lease_s
        if base_url not in _keys and recently:
            return
        lease = K.lease(batch_id)
        holder = await self.redis.set(lease, self.token, nx=True, px=self._lease_ms)
        if not holder and await self.redis.get(lease) == self.token.encode():
            holder = bool(await self.redis.pexpire(lease, self._lease_ms))
        if not holder:
            return
        self._polled[batch_id] = time.monotonic()
        try:
            final = await self._poll(batch_id)
        except BaseException:
            if await self.redis.get(lease) == self.token.encode():
                await self.redis.delete(lease)
            raise
        if final is not None:
            self._polled.pop(batch_id, None)
            await self.redis.delete(lease)

    async def _poll(self, batch_id: str) -> str | None:
        """Look at the batch at the provider; when it is done, record every call's outcome and signal the runs.
        Returns its final status (None: still running)."""
        base_url, status, final = (_text(f) for f in await self.redis.hmget(K.record(batch_id), "base_url",
                                                                               "status", "final"))
        if not status:
            await self.redis.zrem(K.OPEN_INDEX, batch_id)  # expired
            return "unknown"
        if status == "done":  # read before, and the runs maybe not all signalled (its poller died): again
            ids = [_text(v) for v in await self.redis.lrange(K.ids(batch_id), 0, -1)]
            results = await self.redis.mget([K.result(custom_id) for custom_id in ids]) if ids else []
            await self._announce(ids, {c: _answered(r) for c, r in zip(ids, results, strict=True)}, batch_id)
            await self.redis.zrem(K.OPEN_INDEX, batch_id)
            return final or "done"
        client = self._client(base_url)
        self.stats["polls"] += 1
        batch = await client.batches.retrieve(batch_id)
        if batch.status not in TERMINAL:
            await self.redis.hset(K.record(batch_id), mapping={"status": batch.status, "polled_at": time.time()})
            return None
        await self._collect(client, batch)
        return str(batch.status)

    async def _collect(self, client: Any, batch: Any) -> None:
        """Read the output and error files into one outcome per custom id; ids in neither get the batch's end."""
        ids = [_text(value) for value in await self.redis.lrange(K.ids(batch.id), 0, -1)]
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
        ok = {custom_id: _answered(value) for custom_id, value in found.items()}
        async with self.redis.pipeline(transaction=False) as pipe:
            for custom_id in ids:
                pipe.set(K.result(custom_id), found.get(custom_id) or _outcome(False, batch.id, error=missing),
                         px=self._ttl_ms)
            pipe.hset(K.record(batch.id), mapping={"status": "done", "final": batch.status,
                                                   "answered": sum(ok.values())})
            await pipe.execute()
        self.stats["outcomes"] += len(ids)
        await self._announce(ids, ok, batch.id)
        await self.redis.zrem(K.OPEN_INDEX, batch.id)

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

    # -- waiting in place ----------------------------------------------------------------------------------------
    async def batch_of(self, custom_id: str) -> str | None:
        """The batch a call went in, once its batch is submitted."""
        value = await self.redis.get(K.of(custom_id))
        return value.decode() if value else None

    async def outcome(self, custom_id: str) -> BatchOutcome | None:
        """The call's outcome, once its batch is done (None before)."""
        raw = await self.redis.get(K.result(custom_id))
        return BatchOutcome.from_json(custom_id, raw) if raw else None

    async def wait(self, custom_id: str) -> BatchOutcome:
        """The call's outcome, waiting in place for it (a call that cannot park: outside a worker's unit). One
        MGET per tick looks for the outcomes of every call of this process waiting so; the caller bounds the wait
        (asyncio.timeout)."""
        global _waiting_in_place
        future: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
        self._waiting[custom_id] = future
        self.ensure_supervising()
        if self._resolver is None or self._resolver.done():
            self._resolver = self._spawn(self._resolve())
        _waiting_in_place += 1
        try:
            return await future
        finally:
            _waiting_in_place -= 1
            self._waiting.pop(custom_id, None)

    async def _resolve(self) -> None:
        while self._waiting:
            ids = list(self._waiting)
            for custom_id, raw in zip(ids, await self.redis.mget([K.result(c) for c in ids]), strict=True):
                future = self._waiting.get(custom_id)
                if raw is not None and future is not None and not future.done():
                    future.set_result(BatchOutcome.from_json(custom_id, raw))
            self.ensure_supervising()  # batches submitted meanwhile are looked after
            await asyncio.sleep(self._tick)  # a polling period, not synchronisation

    async def cancel(self, batch_id: str) -> None:
        """Ask the provider to cancel a batch (its calls then end not ok when it is next polled)."""
        base_url = _text(await self.redis.hget(K.record(batch_id), "base_url"))
        await self._client(base_url).batches.cancel(batch_id)

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
    """Close the running loop's batch queues (their supervisors stop; pending batches stay in Redis)."""
    for queue in _queues.pop(asyncio.get_running_loop(), {}).values():
        await queue.aclose()
    await _close_with_the_loop.forget()


_close_with_the_loop = CloseWithTheLoop(close_batch_queues)
