"""The worker's Redis scripts: a message's units are admitted, and a burst of completions published, in one
atomic round trip each (a unit costs the worker two Redis commands shared with its batch).

Admission decides, per unit: drop it (its run is unknown or finished), answer it from its record (it already
ran: a re-sent unit never runs twice and its coordinator is never left waiting), leave it (another live process
owns it: a duplicate delivery), or take it (this process becomes its owner). Publishing records the completion
under its execution id *before* sending it to the coordinator that owns the run now (the run record's `reply`),
so a coordinator that takes a run over finds every finished unit, and adds a unit event to the run's stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import keys
from .replicas import Replicas, replicas_for

#: KEYS: per unit (unit records of its run, owner, cancel marker, run record), then snapshot keys to fetch.
#: ARGV: me, owner TTL s, heartbeat key prefix, number of units, then per unit (execution id, fallback reply).
#: Returns {flag per unit, snapshot payloads (nil when missing)}.
ADMIT = """
local me, ttl, hb, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local flags = {}
for i = 0, n - 1 do
  local k = i * 4
  local exec, fallback = ARGV[5 + i * 2], ARGV[6 + i * 2]
  local flag = 0
  local run = redis.call('HMGET', KEYS[k + 4], 'state', 'reply')
  local state = run[1]
  if not state or state == 'succeeded' or state == 'failed' or state == 'cancelled' then
    flag = 8
    -- dropped here: the receipt mark must not make a retry wait for it
    if redis.call('GET', KEYS[k + 2]) == me then redis.call('DEL', KEYS[k + 2]) end
  else
    local record = redis.call('HGET', KEYS[k + 1], exec)
    if record then
      local reply = run[2] or fallback
      if reply ~= '' and type(redis.pcall('RPUSH', reply, record)) == 'number' then
        redis.call('EXPIRE', reply, ttl)
      end
      flag = 2
    else
      local owner = redis.call('GET', KEYS[k + 2])
      if owner and owner ~= me and redis.call('EXISTS', hb .. owner) == 1 then
        flag = 4
      else
        redis.call('SET', KEYS[k + 2], me, 'EX', ttl)
        if redis.call('EXISTS', KEYS[k + 3]) == 1 then flag = 1 end
      end
    end
  end
  flags[i + 1] = flag
end
local snapshots = {}
if #KEYS > n * 4 then
  snapshots = redis.call('MGET', unpack(KEYS, n * 4 + 1))
end
return {flags, snapshots}
"""

#: KEYS: per completion (unit records, failed units, run record, events, owner).
#: ARGV: reply TTL s, retention s, events cap, then per completion (execution id, status, payload, event JSON,
#: fallback reply list, reply payload: "" sends the recorded payload).
PUBLISH = """
local ttl, retention, cap = ARGV[1], ARGV[2], ARGV[3]
local n = #KEYS / 5
local touched = {}
local function keep(key, seconds)
  if not touched[key] then
    touched[key] = true
    redis.call('EXPIRE', key, seconds)
  end
end
for i = 0, n - 1 do
  local k, a = i * 5, 4 + i * 6
  local exec, status, payload = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local answer = ARGV[a + 5]
  if answer == '' then answer = payload end
  redis.call('HSET', KEYS[k + 1], exec, payload)
  keep(KEYS[k + 1], retention)
  if status ~= 'OK' then
    redis.call('SADD', KEYS[k + 2], exec)
    keep(KEYS[k + 2], retention)
  end
  local reply = redis.call('HGET', KEYS[k + 3], 'reply') or ARGV[a + 4]
  -- a reply list that is not a list (a bad reply_to) loses only this answer: the record above stays
  if reply ~= '' and type(redis.pcall('RPUSH', reply, answer)) == 'number' then keep(reply, ttl) end
  redis.call('XADD', KEYS[k + 4], 'MAXLEN', '~', cap, '*', 'type', 'unit', 'data', ARGV[a + 3])
  keep(KEYS[k + 4], retention)
  redis.call('DEL', KEYS[k + 5])
end
return n
"""

#: KEYS: keys to set. ARGV: TTL s, "NX" (only keys not set yet) or "", then one value for all keys or one per key.
#: Sets many keys in one round trip with one reply (a pipeline's reply per key cost more than the SETs).
SET_EACH = """
local ttl, nx, shared = ARGV[1], ARGV[2], #ARGV == 3
for i, key in ipairs(KEYS) do
  local value = shared and ARGV[3] or ARGV[i + 2]
  if nx == 'NX' then redis.call('SET', key, value, 'NX', 'EX', ttl) else redis.call('SET', key, value, 'EX', ttl) end
end
return #KEYS
"""

#: KEYS: owner marker. ARGV: the dead owner. Deletes the marker only if the dead process still holds it.
RELEASE_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

CANCELLED, ALREADY_DONE, DUPLICATE, ORPHAN = 1, 2, 4, 8


@dataclass(frozen=True)
class Outgoing:
    """A finished unit on its way out: where it belongs and what to record."""

    run_id: str
    execution_id: str
    status: str
    payload: bytes
    event: bytes
    reply_to: str
    #: What the coordinator gets, when not the payload itself (a reply without the trace fragment).
    reply: bytes = b""


class WorkerScripts:
    """The scripts registered on one redis.asyncio client (redis-py loads them again after a server restart)."""

    def __init__(self, redis: Any, replicas: Replicas | None = None) -> None:
        #: Unit completions must survive a failover: acknowledged by a replica (see replicas.py).
        self._replicas = replicas or replicas_for(redis)
        self._admit = redis.register_script(ADMIT)
        self._publish = redis.register_script(PUBLISH)

    async def admit(
        self,
        units: Sequence[tuple[str, str, str]],
        snapshots: Sequence[str],
        me: str,
        owner_ttl: int,
    ) -> tuple[list[int], list[bytes | None]]:
        """Flags per (run id, execution id, reply list) unit, and the payloads of `snapshots`."""
        names = [
            name
            for run_id, execution_id, _ in units
            for name in (keys.units(run_id), keys.owner(execution_id), keys.cancel(execution_id), keys.run(run_id))
        ]
        args: list[Any] = [me, owner_ttl, keys.heartbeat(""), len(units)]
        for _, execution_id, reply_to in units:
            args += [execution_id, reply_to]
        flags, payloads = await self._admit(keys=[*names, *snapshots], args=args)
        return [int(flag) for flag in flags], list(payloads)

    async def publish(self, outgoing: Sequence[Outgoing], reply_ttl: int, retention: int, events_max: int) -> None:
        names: list[str] = []
        args: list[Any] = [reply_ttl, retention, events_max]
        for item in outgoing:
            names += [keys.units(item.run_id), keys.failed_units(item.run_id), keys.run(item.run_id),
                      keys.events(item.run_id), keys.owner(item.execution_id)]
            args += [item.execution_id, item.status, item.payload, item.event, item.reply_to, item.reply]
        await self._replicas.run(self._publish, keys=names, args=args)
