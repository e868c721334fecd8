"""Waits of runs in the fleet: pending waits, signals, parking and waking, each one atomic Lua script.

Per run, one hash `tasktree:waits:<run>` (TTL = run retention) holds
  w:<execution id>   a pending wait: {name, node, prompt, schema, since, deadline} (JSON)
  q:<name>           execution ids of the pending waits of that name, oldest first ("\\n"-separated)
  n:<name> c:<name>  signals of that name received / consumed; s:<name>:<i> the i-th one (JSON) until consumed
  id:<signal id>     a signal id already recorded (the same id twice records once)
A wait's answer (its signal, or its timeout) is recorded as the unit record of its execution id, like any unit's
completion: a coordinator replaying the run finds it there, so a wait that was answered never waits again.

A signal answers the oldest pending wait of its name (and, when the run is parked, re-queues it), or is kept until a
wait of that name is reached. A run parks only when every wait its coordinator holds is still pending: a signal
that slipped in first makes the park fail and the run goes on. Deadlines of parked runs are in one sorted set
(`tasktree:waits:due`) that the runs supervisors poll.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ..core.instruments import hooks as metrics
from ..core.log import logger
from ..core.redis_client import is_cluster
from ..core.signals import PayloadSchema, Signal, WaitRequest, check_against_json_schema
from ..distributed import keys
from ..nodes.wait import WaitFor, wait_catalogue
from .scripts import _HEAD, head_args


class WaitingRun(Protocol):
    """What a wait needs of the run coordinating it (runs.scope.RunScope): its waits held here, an activity
    counter, and the parker to wake."""

    run_id: str
    waits: dict[str, WaitRequest]
    activity: int

    def wake_parker(self) -> None: ...

_WAIT_HEAD = _HEAD + """
local function completion(eid, status, data)
  return '{"execution_id":' .. cjson.encode(eid) .. ',"status":"' .. status .. '","data":' .. data .. '}'
end
local function since_of(w)
  if not w then return now end
  local ok, data = pcall(cjson.decode, w)
  if ok and data.since then return string.format('%.6f', data.since) end
  return now
end
local function dequeue(waits, name, eid)
  local q = redis.call('HGET', waits, 'q:' .. name) or ''
  local out = {}
  for item in string.gmatch(q, '[^\\n]+') do if item ~= eid then out[#out + 1] = item end end
  if #out == 0 then redis.call('HDEL', waits, 'q:' .. name) else redis.call('HSET', waits, 'q:' .. name,
    table.concat(out, '\\n')) end
end
"""

#: KEYS: waits, units, events. ARGV: head, execution id, name, wait JSON without its closing brace, timeout ('' none).
#: Returns {'done', unit record} | {'signal', unit record} (an early signal, consumed now) | {'pending', wait JSON}
#: (reached before: its since and deadline stand) | {'reached', wait JSON}.
REGISTER = _WAIT_HEAD + """
local eid, name = ARGV[5], ARGV[6]
local rec = redis.call('HGET', KEYS[2], eid)
if rec then return {'done', rec} end
local n = tonumber(redis.call('HGET', KEYS[1], 'n:' .. name) or '0')
local c = tonumber(redis.call('HGET', KEYS[1], 'c:' .. name) or '0')
if c < n then
  local sig = redis.call('HGET', KEYS[1], 's:' .. name .. ':' .. c)
  redis.call('HDEL', KEYS[1], 's:' .. name .. ':' .. c)
  redis.call('HINCRBY', KEYS[1], 'c:' .. name, 1)
  local w = redis.call('HGET', KEYS[1], 'w:' .. eid)
  local done = completion(eid, 'OK', '{"signal":' .. sig .. ',"since":' .. since_of(w) .. '}')
  redis.call('HSET', KEYS[2], eid, done)
  redis.call('EXPIRE', KEYS[2], retention)
  if w then redis.call('HDEL', KEYS[1], 'w:' .. eid); dequeue(KEYS[1], name, eid) end
  event(KEYS[3], 'wait', cjson.encode({state = 'signalled', name = name, execution = eid, early = true}))
  return {'signal', done}
end
local w = redis.call('HGET', KEYS[1], 'w:' .. eid)
if w then return {'pending', w} end
local deadline = 'null'
if ARGV[8] ~= '' then deadline = string.format('%.6f', tonumber(now) + tonumber(ARGV[8])) end
w = ARGV[7] .. ',"since":' .. now .. ',"deadline":' .. deadline .. '}'
redis.call('HSET', KEYS[1], 'w:' .. eid, w)
local q = redis.call('HGET', KEYS[1], 'q:' .. name)
if q then q = q .. '\\n' .. eid else q = eid end
redis.call('HSET', KEYS[1], 'q:' .. name, q)
redis.call('EXPIRE', KEYS[1], retention)
event(KEYS[3], 'wait', cjson.encode({state = 'reached', name = name, execution = eid}))
return {'reached', w}
"""

#: KEYS: waits, units, run, events[, active set: a single Redis's, runs.scripts]. ARGV: head, name, signal id
#: ('' none), signal JSON, reply TTL.
#: Returns {'missing'|'state'|'duplicate', detail} (nothing recorded), {'answered', execution id} (a pending wait
#: took it; a running coordinator hears of it on its reply list), {'woke', execution id} (the run was parked: it
#: is queued again; its created_at third) or {'kept', ''} (early: the next wait of that name takes it). On a Cluster
#: (no active set) 'answered' carries the running coordinator's reply list and the record, for the caller to push.
SIGNAL = _WAIT_HEAD + """
local name, sid, sig = ARGV[5], ARGV[6], ARGV[7]
local rec = redis.call('HMGET', KEYS[3], 'state', 'reply', 'created_at')
local state = rec[1]
if not state then return {'missing', ''} end
if terminal(state) then return {'state', state} end
if sid ~= '' then
  if redis.call('HEXISTS', KEYS[1], 'id:' .. sid) == 1 then return {'duplicate', sid} end
  redis.call('HSET', KEYS[1], 'id:' .. sid, 1)
end
redis.call('EXPIRE', KEYS[1], retention)
local q = redis.call('HGET', KEYS[1], 'q:' .. name)
local eid = q and string.match(q, '[^\\n]+')
if not eid then
  local n = redis.call('HINCRBY', KEYS[1], 'n:' .. name, 1)
  redis.call('HSET', KEYS[1], 's:' .. name .. ':' .. (n - 1), sig)
  event(KEYS[4], 'wait', cjson.encode({state = 'signal kept', name = name, signal_id = sid}))
  return {'kept', ''}
end
dequeue(KEYS[1], name, eid)
local since = since_of(redis.call('HGET', KEYS[1], 'w:' .. eid))
redis.call('HDEL', KEYS[1], 'w:' .. eid)
local done = completion(eid, 'OK', '{"signal":' .. sig .. ',"since":' .. since .. '}')
redis.call('HSET', KEYS[2], eid, done)
redis.call('EXPIRE', KEYS[2], retention)
event(KEYS[4], 'wait', cjson.encode({state = 'signalled', name = name, execution = eid, signal_id = sid}))
if state == 'waiting' then
  redis.call('HSET', KEYS[3], 'state', 'queued', 'owner', '', 'updated_at', now)
  if KEYS[5] then redis.call('ZADD', KEYS[5], rec[3] or now, run_id) end
  event(KEYS[4], 'state', cjson.encode({state = 'queued', woken_by = name}))
  return {'woke', eid, rec[3] or now}
end
if state == 'running' and rec[2] and rec[2] ~= '' then
  if not KEYS[5] then return {'answered', eid, rec[2], done} end
  redis.call('RPUSH', rec[2], done)
  redis.call('EXPIRE', rec[2], ARGV[8])
end
return {'answered', eid}
"""

#: KEYS: waits, units, events, failed units. ARGV: head, execution id, name, deadline, failed ('1': no default).
#: The deadline passed: records the timeout unless a signal was recorded first. Returns {'done'|'timeout', record}.
TIMEOUT = _WAIT_HEAD + """
local eid, name = ARGV[5], ARGV[6]
local rec = redis.call('HGET', KEYS[2], eid)
if rec then return {'done', rec} end
local since = since_of(redis.call('HGET', KEYS[1], 'w:' .. eid))
redis.call('HDEL', KEYS[1], 'w:' .. eid)
dequeue(KEYS[1], name, eid)
local done = completion(eid, 'OK', '{"timeout":' .. ARGV[7] .. ',"since":' .. since .. '}')
redis.call('HSET', KEYS[2], eid, done)
redis.call('EXPIRE', KEYS[2], retention)
if ARGV[8] == '1' then
  redis.call('SADD', KEYS[4], eid)
  redis.call('EXPIRE', KEYS[4], retention)
end
event(KEYS[3], 'wait', cjson.encode({state = 'timed out', name = name, execution = eid}))
return {'timeout', done}
"""

#: KEYS: run, events, waits[, active set, due: a single Redis's]. ARGV: head, owner, epoch, earliest deadline
#: ('' none), execution ids of the waits held. Parks the run if it is still ours and every one of them is still
#: pending.
#: Returns {'ok', ''} | {'state'|'owner', detail} | {'answered', execution id}.
PARK = _HEAD + """
local rec = redis.call('HMGET', KEYS[1], 'state', 'owner', 'epoch')
if rec[1] ~= 'running' then return {'state', rec[1] or 'missing'} end
if rec[2] ~= ARGV[5] or rec[3] ~= ARGV[6] then return {'owner', rec[2] or ''} end
for i = 8, #ARGV do
  if redis.call('HEXISTS', KEYS[3], 'w:' .. ARGV[i]) == 0 then return {'answered', ARGV[i]} end
end
redis.call('HSET', KEYS[1], 'state', 'waiting', 'owner', '', 'updated_at', now)
if KEYS[4] then
  redis.call('ZREM', KEYS[4], run_id)
  if ARGV[7] ~= '' then
    redis.call('ZADD', KEYS[5], ARGV[7], run_id)
    redis.call('EXPIRE', KEYS[5], retention)
  else
    redis.call('ZREM', KEYS[5], run_id)
  end
end
event(KEYS[2], 'state', cjson.encode({state = 'waiting', waits = #ARGV - 7}))
return {'ok', ''}
"""

#: KEYS: run, events[, active set, due: a single Redis's]. ARGV: head. A parked run whose deadline passed is
#: queued again. Returns its created_at ('' when it was not parked).
WAKE = _HEAD + """
if KEYS[4] then redis.call('ZREM', KEYS[4], run_id) end
local rec = redis.call('HMGET', KEYS[1], 'state', 'created_at')
if rec[1] ~= 'waiting' then return '' end
redis.call('HSET', KEYS[1], 'state', 'queued', 'owner', '', 'updated_at', now)
if KEYS[3] then redis.call('ZADD', KEYS[3], rec[2] or now, run_id) end
event(KEYS[2], 'state', cjson.encode({state = 'queued', woken_by = 'deadline'}))
return rec[2] or now
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


@dataclass(frozen=True)
class PendingWait:
    """A wait of a run that has not been answered: what `Run.waits()` lists and the runs board shows."""

    name: str
    #: The WaitFor's address (tree name + path).
    node: str
    prompt: Any
    #: The payload's JSON Schema (None: any JSON).
    schema: dict[str, Any] | None
    since: _dt.datetime
    deadline: _dt.datetime | None
    execution_id: str

    @classmethod
    def from_json(cls, execution_id: str, data: dict[str, Any]) -> PendingWait:
        deadline = data.get("deadline")
        return cls(name=data.get("name", ""), node=data.get("node", ""), prompt=data.get("prompt"),
                   schema=data.get("schema"), since=_dt.datetime.fromtimestamp(float(data["since"]), _dt.UTC),
                   deadline=_dt.datetime.fromtimestamp(float(deadline), _dt.UTC) if deadline else None,
                   execution_id=execution_id)

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "node": self.node, "prompt": self.prompt, "schema": self.schema,
                "since": self.since.timestamp(), "deadline": self.deadline.timestamp() if self.deadline else None,
                "execution_id": self.execution_id}


class WaitBook:
    """A run's waits and signals in Redis (one redis.asyncio client with bytes replies)."""

    def __init__(self, redis: Any, retention: int, events_max: int, reply_ttl: int = 3600) -> None:
        self.redis = redis
        self.retention = retention
        self.events_max = events_max
        self.reply_ttl = reply_ttl
        #: On a Redis Cluster the indexes (active set, due set) and reply lists are written beside the scripts.
        self.cluster = is_cluster(redis)
        self._register = redis.register_script(REGISTER)
        self._signal = redis.register_script(SIGNAL)
        self._timeout = redis.register_script(TIMEOUT)
        self._park = redis.register_script(PARK)
        self._wake = redis.register_script(WAKE)

    def _head(self, run_id: str) -> list[Any]:
        return head_args(run_id, self.retention, self.events_max)

    def _fleet(self, *names: str) -> tuple[str, ...]:
        """Fleet-wide KEYS of a script: given on a single Redis, left out on a Cluster (another slot)."""
        return () if self.cluster else names

    async def _index(self, add: Callable[[Any], Any]) -> None:
        """One pipeline of index (or reply list) commands; the fleet-wide sets keep the run retention TTL."""
        pipe = self.redis.pipeline(transaction=False)
        add(pipe)
        for name in (keys.ACTIVE_RUNS, keys.WAITS_DUE):
            pipe.expire(name, self.retention)
        await pipe.execute(raise_on_error=False)

    async def register(self, run_id: str, execution_id: str, request: WaitRequest) -> tuple[str, str]:
        try:
            prompt = orjson.dumps(request.prompt)
        except TypeError:
            prompt = orjson.dumps(str(request.prompt))
        head = (b'{"name":' + orjson.dumps(request.name) + b',"node":' + orjson.dumps(request.address)
                + b',"prompt":' + prompt + b',"schema":' + orjson.dumps(request.schema.json_schema))
        kind, value = await self._register(
            keys=[keys.waits(run_id), keys.units(run_id), keys.events(run_id)],
            args=[*self._head(run_id), execution_id, request.name, head,
                  "" if request.timeout_s is None else repr(request.timeout_s)],
        )
        return _text(kind), _text(value)

    async def signal(self, run_id: str, signal: Signal, provided_id: bool) -> tuple[str, str]:
        kind, detail, *rest = await self._signal(
            keys=[keys.waits(run_id), keys.units(run_id), keys.run(run_id), keys.events(run_id),
                  *self._fleet(keys.ACTIVE_RUNS)],
            args=[*self._head(run_id), signal.name, signal.signal_id if provided_id else "",
                  orjson.dumps(signal.json()), self.reply_ttl],
        )
        if self.cluster and _text(kind) == "woke":  # after the record, as every Cluster index update
            await self._index(lambda pipe: pipe.zadd(keys.ACTIVE_RUNS, {run_id: float(_text(rest[0]))}))
        if self.cluster and _text(kind) == "answered" and rest:  # the running coordinator's reply list
            await self._index(lambda pipe: (pipe.rpush(_text(rest[0]), rest[1]),
                                            pipe.expire(_text(rest[0]), self.reply_ttl)))
        if _text(kind) == "woke":
            metrics.run_state("queued")  # waiting -> queued: the signal re-queued the parked run
        return _text(kind), _text(detail)

    async def time_out(self, run_id: str, execution_id: str, name: str, deadline: float, failed: bool
                       ) -> tuple[str, str]:
        kind, record = await self._timeout(
            keys=[keys.waits(run_id), keys.units(run_id), keys.events(run_id), keys.failed_units(run_id)],
            args=[*self._head(run_id), execution_id, name, repr(deadline), "1" if failed else "0"],
        )
        return _text(kind), _text(record)

    async def park(self, run_id: str, owner: str, epoch: int, deadline: float | None, execution_ids: list[str]
                   ) -> tuple[str, str]:
        if self.cluster and deadline is not None:
            # the deadline first: a process dying after parking must not leave a parked run nobody wakes (a due
            # entry for a run that did not park is dropped by wake_due)
            await self._index(lambda pipe: pipe.zadd(keys.WAITS_DUE, {run_id: deadline}))
        kind, detail = await self._park(
            keys=[keys.run(run_id), keys.events(run_id), keys.waits(run_id),
                  *self._fleet(keys.ACTIVE_RUNS, keys.WAITS_DUE)],
            args=[*self._head(run_id), owner, str(epoch), "" if deadline is None else repr(deadline), *execution_ids],
        )
        if self.cluster and _text(kind) == "ok":
            await self._index(lambda pipe: (pipe.zrem(keys.ACTIVE_RUNS, run_id),
                                            deadline is None and pipe.zrem(keys.WAITS_DUE, run_id)))
        if _text(kind) == "ok":
            metrics.run_state("waiting")
        return _text(kind), _text(detail)

    async def wake_due(self, limit: int = 100) -> list[str]:
        """Queue again the parked runs whose earliest deadline passed; returns their ids."""
        due = [_text(m) for m in await self.redis.zrangebyscore(keys.WAITS_DUE, "-inf", time.time(), 0, limit)]
        woken = []
        for run_id in due:
            created = _text(await self._wake(keys=[keys.run(run_id), keys.events(run_id),
                                                   *self._fleet(keys.ACTIVE_RUNS, keys.WAITS_DUE)],
                                             args=self._head(run_id)))
            if self.cluster:  # queued first, then out of the due set: a crash between leaves it due, woken again
                await self._index(lambda pipe, c=created, r=run_id: (
                    c and pipe.zadd(keys.ACTIVE_RUNS, {r: float(c)}), pipe.zrem(keys.WAITS_DUE, r)))
            if created:
                metrics.run_state("queued")  # waiting -> queued: a deadline passed
                woken.append(run_id)
        return woken

    async def pending(self, run_id: str) -> list[PendingWait]:
        raw = await self.redis.hgetall(keys.waits(run_id))
        out = []
        for field, value in raw.items():
            name = _text(field)
            if name.startswith("w:"):
                try:
                    out.append(PendingWait.from_json(name[2:], orjson.loads(value)))
                except (ValueError, KeyError) as exc:
                    logger.warning("run %s: unreadable pending wait %s: %s", run_id, name, exc)
        return sorted(out, key=lambda w: (w.since, w.execution_id))


@dataclass(frozen=True)
class WaitDef:
    """A WaitFor a run can reach, as a signal is checked against it: its fixed name (None: made per blackboard),
    address and payload check (the node's own when this process built the tree, else its recorded JSON Schema)."""

    name: str | None
    node: str
    check: Callable[[Any, str], Any]


def catalogue_field(tree: Any) -> str:
    """The record's `waitdefs` field: the waits a run of `tree` can reach, so a process without the tree (the
    runs board, the CLI) can refuse a name the run never waits for and check an early signal's payload."""
    waits, open_ = wait_catalogue(tree.root)
    return orjson.dumps({"open": open_, "waits": [{"name": w.static_name, "node": w.address,
                                                   "schema": w.schema.json_schema} for w in waits]}).decode()


def catalogue(tree: Any, record: dict[str, str]) -> tuple[list[WaitDef], bool] | None:
    """The run's waits, from the tree when this process built the same version, else from its record (None when
    neither knows: a signal is then checked when its wait is reached)."""
    if tree is not None and tree.fingerprint == record.get("fingerprint") and tree.root is not None:
        waits, open_ = wait_catalogue(tree.root)
        return [WaitDef(w.static_name, w.address, _node_check(w)) for w in waits], open_
    raw = record.get("waitdefs")
    if not raw:
        return None
    data = orjson.loads(raw)
    return [WaitDef(w.get("name"), w.get("node", ""), schema_check(w.get("schema")))
            for w in data.get("waits") or ()], bool(data.get("open"))


def _node_check(node: WaitFor) -> Callable[[Any, str], Any]:
    return lambda payload, what: node.schema.to_json(node.schema.check(payload, what))


def schema_check(schema: dict[str, Any] | None) -> Callable[[Any, str], Any]:
    def check(payload: Any, what: str) -> Any:
        check_against_json_schema(schema, payload, what)
        return PayloadSchema().check(payload, what)

    return check


def answer_of(record: str | bytes, request: WaitRequest | None = None) -> Signal | float:
    """A wait's unit record: its Signal, or the deadline (epoch seconds) it timed out at (and, into `request`,
    when the wait was first reached)."""
    data = orjson.loads(record).get("data") or {}
    if request is not None and data.get("since"):
        request.since = float(data["since"])
    if "signal" in data:
        return Signal.from_json(data["signal"])
    return float(data.get("timeout") or 0.0)


async def wait_in_run(scope: WaitingRun, book: WaitBook, dispatcher: Any, execution_id: str, request: WaitRequest
                      ) -> Signal | None:
    """A WaitFor reached in a run this process coordinates: its recorded answer, an early signal, or a pending
    wait answered by a signal (through the coordinator's reply list) or its deadline. While it is pending the
    run may park (see RunScope.maybe_park): then this task is cancelled and the run resumes by replay."""
    future: asyncio.Future[Any] = dispatcher.expect(execution_id)
    scope.waits[execution_id] = request
    scope.activity += 1
    try:
        kind, value = await book.register(scope.run_id, execution_id, request)
        if kind in ("done", "signal"):
            return _signal_or_none(answer_of(value, request), request)
        wait = orjson.loads(value)
        request.since = float(wait["since"])
        request.deadline = float(wait["deadline"]) if wait.get("deadline") is not None else None
        scope.wake_parker()
        left = None if request.deadline is None else request.deadline - time.time()
        try:
            if left is None:
                completion = await future
            else:
                completion = await asyncio.wait_for(asyncio.shield(future), max(0.0, left))
            return _signal_or_none(answer_of(completion.model_dump_json(), request), request)
        except TimeoutError:
            deadline = request.deadline or time.time()
            kind, record = await book.time_out(scope.run_id, execution_id, request.name, deadline,
                                               failed=not request.has_default)
            return _signal_or_none(answer_of(record, request), request)
    finally:
        scope.waits.pop(execution_id, None)
        scope.activity += 1
        dispatcher.forget(execution_id)


def _signal_or_none(answer: Signal | float, request: WaitRequest) -> Signal | None:
    if isinstance(answer, Signal):
        return answer
    request.deadline = answer or request.deadline
    return None
