"""The worker's Redis scripts: a message's units are admitted, and a burst of completions published, in one
atomic round trip each (a unit costs the worker two Redis commands shared with its batch).

Admission decides, per unit: drop it (its run is unknown or finished), answer it from its record (it already
ran: a re-sent unit never runs twice and its coordinator is never left waiting), leave it (another live process
owns it: a duplicate delivery), or take it (this process becomes its owner). Publishing records the completion
under its execution id *before* sending it to the coordinator that owns the run now (the run record's `reply`),
so a coordinator that takes a run over finds every finished unit, and adds a unit event to the run's stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.redis_client import is_cluster, same_slot
from . import keys
from .replicas import Replicas, replicas_for

#: KEYS: per unit (unit records of its run, owner, cancel marker, run record), then snapshot keys to fetch.
#: ARGV: me, owner TTL s, heartbeat key prefix ('' on a Cluster: the heartbeat is in another slot, see below),
#: processes known dead (comma separated), number of units, then per unit (execution id, fallback reply).
#: Returns {flag per unit, snapshot payloads (nil when missing), owner per unit, answers}. On a single Redis a
#: recorded unit is answered here; on a Cluster (no heartbeat prefix) `answers` holds (reply list, record) pairs
#: for the caller to push, and a unit owned by another process is left (flag 4) with its owner named, for the
#: caller to check that owner's heartbeat and admit it again with the owner among the dead.
ADMIT = """
local me, ttl, hb, dead, n = ARGV[1], ARGV[2], ARGV[3], ',' .. ARGV[4] .. ',', tonumber(ARGV[5])
local flags, owners, answers = {}, {}, {}
local function alive(owner)
  if hb ~= '' then return redis.call('EXISTS', hb .. owner) == 1 end
  return not string.find(dead, ',' .. owner .. ',', 1, true)
end
for i = 0, n - 1 do
  local k = i * 4
  local exec, fallback = ARGV[6 + i * 2], ARGV[7 + i * 2]
  local flag = 0
  owners[i + 1] = ''
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
      if hb == '' then
        if reply ~= '' then answers[#answers + 1] = reply; answers[#answers + 1] = record end
      elseif reply ~= '' and type(redis.pcall('RPUSH', reply, record)) == 'number' then
        redis.call('EXPIRE', reply, ttl)
      end
      flag = 2
    else
      local owner = redis.call('GET', KEYS[k + 2])
      if owner and owner ~= me and alive(owner) then
        flag = 4
        owners[i + 1] = owner
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
return {flags, snapshots, owners, answers}
"""

#: KEYS: per completion (unit records, failed units, run record, events, owner, slot gate: the run record again
#: when the unit has none).
#: ARGV: reply TTL s, retention s, events cap, push ('1': answer the reply lists here; '' on a Cluster, where
#: they lie in other slots: the (reply list, answer) pairs are returned for the caller to push after this
#: call), then per completion (execution id, status, payload, event JSON, fallback reply list, reply payload:
#: "" sends the recorded payload, gated: '1' when the unit has a slot gate, the execution id its slot is handed
#: on to or ''). The gate's slot is released (or handed on) with the record: a unit never holds one after it.
PUBLISH = """
local ttl, retention, cap, push = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1'
local answers = {}
local n = #KEYS / 6
local touched = {}
local function keep(key, seconds)
  if not touched[key] then
    touched[key] = true
    redis.call('EXPIRE', key, seconds)
  end
end
for i = 0, n - 1 do
  local k, a = i * 6, 5 + i * 8
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
  if reply ~= '' and not push then
    answers[#answers + 1] = reply
    answers[#answers + 1] = answer
  elseif reply ~= '' and type(redis.pcall('RPUSH', reply, answer)) == 'number' then
    keep(reply, ttl)
  end
  redis.call('XADD', KEYS[k + 4], 'MAXLEN', '~', cap, '*', 'type', 'unit', 'data', ARGV[a + 3])
  keep(KEYS[k + 4], retention)
  redis.call('DEL', KEYS[k + 5])
  if ARGV[a + 6] == '1' then
    redis.call('SREM', KEYS[k + 6], exec)
    if ARGV[a + 7] ~= '' then
      redis.call('SADD', KEYS[k + 6], ARGV[a + 7])
      redis.call('EXPIRE', KEYS[k + 6], ttl)
    end
  end
end
return answers
"""

#: KEYS: slot gates. ARGV: TTL s, then per gate (limit, n asking again, n asking first, then those execution ids,
#: oldest first). Returns 1 or 0 per execution id, in the order given: it holds a slot (taken now if one was free;
#: or held already: a unit sent again after its worker died keeps its slot, which only a first ask can find) or
#: it does not.
CLAIM = """
local ttl, a, out = ARGV[1], 2, {}
for _, key in ipairs(KEYS) do
  local limit, again, first = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local free = limit - redis.call('SCARD', key)
  local took = false
  for j = 1, again + first do
    local exec = ARGV[a + 2 + j]
    if j > again and redis.call('SISMEMBER', key, exec) == 1 then
      out[#out + 1] = 1
    elseif free > 0 then
      redis.call('SADD', key, exec)
      free = free - 1
      took = true
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  if took then redis.call('EXPIRE', key, ttl) end
  a = a + 3 + again + first
end
return out
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
    #: The unit's slot gate key ('' : none), released with the record or handed on to `hand_on` (an execution id).
    gate: str = ""
    hand_on: str = ""


class WorkerScripts:
    """The scripts registered on one redis.asyncio client (redis-py loads them again after a server restart).

    On a Redis Cluster a batch is split by run (each run's keys share a slot; the calls go concurrently), and
    what lies outside the run's slot (reply lists, heartbeats) is done by the caller after the script: the
    record of a completion is written before its answer is sent, as on a single Redis, so a coordinator that
    takes the run over finds it, and an answer lost between the two is sent again at admission (flag 2)."""

    def __init__(self, redis: Any, replicas: Replicas | None = None) -> None:
        self.redis = redis
        self.cluster = is_cluster(redis)
        #: Unit completions must survive a failover: acknowledged by a replica (see replicas.py).
        self._replicas = replicas or replicas_for(redis)
        self._admit = redis.register_script(ADMIT)
        self._publish = redis.register_script(PUBLISH)
        self._claim = redis.register_script(CLAIM)

    async def admit(
        self,
        units: Sequence[tuple[str, str, str]],
        snapshots: Sequence[str],
        me: str,
        owner_ttl: int,
    ) -> tuple[list[int], list[bytes | None]]:
        """Flags per (run id, execution id, reply list) unit, and the payloads of `snapshots`."""
        if not self.cluster:
            flags, payloads, _ = await self._admit_slot(list(units), list(snapshots), me, owner_ttl, "")
            return flags, payloads
        # (position, unit) and (-1, snapshot key) items, grouped by the slot of their run
        items: list[tuple[int, Any]] = [*enumerate(units), *((-1, name) for name in snapshots)]
        groups = same_slot(self.redis, items, lambda item: keys.run(item[1][0]) if item[0] >= 0 else item[1])
        answers = await asyncio.gather(*(self._admit_cluster(group, me, owner_ttl) for group in groups))
        flags: list[int] = [0] * len(units)
        by_snapshot: dict[str, bytes | None] = {}
        for group, (group_flags, payloads) in zip(groups, answers, strict=True):
            for i, flag in zip((i for i, _ in group if i >= 0), group_flags, strict=True):
                flags[i] = flag
            by_snapshot.update(zip((name for i, name in group if i < 0), payloads, strict=True))
        return flags, [by_snapshot[name] for name in snapshots]

    async def _admit_cluster(self, group: list[tuple[int, Any]], me: str,
                             owner_ttl: int) -> tuple[list[int], list[bytes | None]]:
        """One slot's admission; units held by a process whose heartbeat is gone are admitted again."""
        units = [unit for i, unit in group if i >= 0]
        flags, payloads, owners = await self._admit_slot(units, [name for i, name in group if i < 0], me,
                                                         owner_ttl, "")
        held = {owner for flag, owner in zip(flags, owners, strict=True) if flag & DUPLICATE}
        if held:
            pipe = self.redis.pipeline(transaction=False)
            for owner in sorted(held):
                pipe.exists(keys.heartbeat(owner))
            dead = {owner for owner, alive in zip(sorted(held), await pipe.execute(), strict=True) if not alive}
            again = [i for i, owner in enumerate(owners) if owner in dead]
            if again:
                retried, _, _ = await self._admit_slot([units[i] for i in again], [], me, owner_ttl, ",".join(dead))
                for i, flag in zip(again, retried, strict=True):
                    flags[i] = flag
        return flags, payloads

    async def _admit_slot(self, units: list[tuple[str, str, str]], snapshots: list[str], me: str, owner_ttl: int,
                          dead: str) -> tuple[list[int], list[bytes | None], list[str]]:
        names = [
            name
            for run_id, execution_id, _ in units
            for name in (keys.units(run_id), keys.owner(run_id, execution_id), keys.cancel(run_id, execution_id),
                         keys.run(run_id))
        ]
        args: list[Any] = [me, owner_ttl, "" if self.cluster else keys.heartbeat(""), dead, len(units)]
        for _, execution_id, reply_to in units:
            args += [execution_id, reply_to]
        flags, payloads, owners, answers = await self._admit(keys=[*names, *snapshots], args=args)
        if answers:
            await self._push(answers, owner_ttl)
        return [int(flag) for flag in flags], list(payloads), [owner.decode() if owner else "" for owner in owners]

    async def publish(self, outgoing: Sequence[Outgoing], reply_ttl: int, retention: int, events_max: int) -> None:
        groups = same_slot(self.redis, outgoing, lambda item: keys.run(item.run_id))
        answers = await asyncio.gather(*(self._publish_slot(group, reply_ttl, retention, events_max)
                                         for group in groups))
        if any(answers):  # a Cluster's: every slot's records written, the answers go out together
            await self._push([answer for group in answers for answer in group], reply_ttl)

    async def _publish_slot(self, outgoing: Sequence[Outgoing], reply_ttl: int, retention: int,
                            events_max: int) -> list[bytes]:
        """Record a slot's completions (one script call); returns the (reply list, answer) pairs left to push."""
        names: list[str] = []
        args: list[Any] = [reply_ttl, retention, events_max, "" if self.cluster else "1"]
        for item in outgoing:
            names += [keys.units(item.run_id), keys.failed_units(item.run_id), keys.run(item.run_id),
                      keys.events(item.run_id), keys.owner(item.run_id, item.execution_id),
                      item.gate or keys.run(item.run_id)]
            args += [item.execution_id, item.status, item.payload, item.event, item.reply_to, item.reply,
                     "1" if item.gate else "", item.hand_on]
        return list(await self._replicas.run(self._publish, keys=names, args=args) or [])

    async def claim(self, asks: Sequence[tuple[str, int, Sequence[str], int]], ttl: int) -> list[bool]:
        """For (gate key, limit, execution ids oldest first, how many of them asked before) asks: whether each
        execution id holds a slot now, in order (one call per slot on a Cluster: a gate lies in its run's slot)."""
        groups = same_slot(self.redis, list(enumerate(asks)), lambda item: item[1][0])

        async def one(group: list[tuple[int, tuple[str, int, Sequence[str], int]]]) -> list[int]:
            args: list[Any] = [ttl]
            for _, (_, limit, execution_ids, again) in group:
                args += [limit, again, len(execution_ids) - again, *execution_ids]
            return await self._claim(keys=[key for _, (key, *_) in group], args=args)

        answers = await asyncio.gather(*(one(group) for group in groups))
        held: dict[int, list[bool]] = {}
        for group, flags in zip(groups, answers, strict=True):
            at = 0
            for i, (_, _, execution_ids, _) in group:
                held[i] = [bool(flag) for flag in flags[at:at + len(execution_ids)]]
                at += len(execution_ids)
        return [flag for i in range(len(asks)) for flag in held[i]]

    async def release(self, gate: str, execution_id: str) -> None:
        """Give back a slot that no unit here will use (it was granted to a unit stopped while it asked)."""
        await self.redis.srem(gate, execution_id)

    async def _push(self, answers: list[bytes], ttl: int) -> None:
        """(reply list, answer) pairs into their lists (a Cluster's, after the records are written): one RPUSH and
        one EXPIRE per list, whatever the number of answers (a coordinator's list lies on one master, which every
        completion of its runs reaches)."""
        pipe = self.redis.pipeline(transaction=False)
        by_reply: dict[bytes, list[bytes]] = {}
        for reply, answer in zip(answers[::2], answers[1::2], strict=True):
            by_reply.setdefault(reply, []).append(answer)
        for reply, values in by_reply.items():
            pipe.rpush(reply, *values)
            pipe.expire(reply, ttl)
        # a reply list that is not a list (a bad reply_to) loses only its answer: the record stays
        await pipe.execute(raise_on_error=False)
