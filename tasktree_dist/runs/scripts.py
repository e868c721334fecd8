"""Lua scripts for run records: every state change is one atomic script, so a run is never both cancelled and
succeeded, a claim never hands a run to two coordinators, and each change lands in the run's event stream in
the same step.

Common ARGV head: run id, now (epoch seconds), retention (s), events cap. Terminal states leave the active set.

The fleet-wide indexes (runs index, active set) come last in KEYS and only on a single Redis, where a state
change and its index update stay one atomic step. On a Redis Cluster they lie in another slot than the run:
the scripts get the run's keys only and the caller updates the indexes in a second call (runs.store says in
which order and why it is safe), and a heartbeat, also in another slot, is checked by the caller (`dead`).
"""

from __future__ import annotations

import time
from typing import Any


def head_args(run_id: str, retention: int, events_max: int) -> list[Any]:
    """The first ARGV of every run script, in the order _HEAD reads them: run id, now, retention, events cap."""
    return [run_id, f"{time.time():.6f}", retention, events_max]


_HEAD = """
local run_id, now, retention, events_max = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local function event(stream, kind, data)
  redis.call('XADD', stream, 'MAXLEN', '~', events_max, '*', 'type', kind, 'data', data)
  redis.call('EXPIRE', stream, retention)
end
local function terminal(state)
  return state == 'succeeded' or state == 'failed' or state == 'cancelled'
end
-- a process is alive while its heartbeat exists (hb: the heartbeat key prefix); on a Cluster (hb '') the caller
-- checked it and names the processes it found dead
local function alive(hb, dead, process)
  if hb ~= '' then return redis.call('EXISTS', hb .. process) == 1 end
  return not string.find(',' .. dead .. ',', ',' .. process .. ',', 1, true)
end
"""

#: KEYS: run, events[, runs index, active set]. ARGV: head, state, owner ('' none), then field/value pairs.
#: Returns 1 when created, 0 when a run with this id exists (submit is idempotent).
CREATE = _HEAD + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local state, owner = ARGV[5], ARGV[6]
redis.call('HSET', KEYS[1], 'id', run_id, 'state', state, 'created_at', now, 'updated_at', now, 'epoch', 0,
  'attempt', 0, 'owner', owner)
if #ARGV > 6 then redis.call('HSET', KEYS[1], unpack(ARGV, 7, #ARGV)) end
if state == 'running' then redis.call('HSET', KEYS[1], 'started_at', now, 'epoch', 1) end
redis.call('EXPIRE', KEYS[1], retention)
if KEYS[3] then
  redis.call('ZADD', KEYS[3], now, run_id)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - retention)
  redis.call('EXPIRE', KEYS[3], retention)
  redis.call('ZADD', KEYS[4], now, run_id)
  redis.call('EXPIRE', KEYS[4], retention)
end
event(KEYS[2], 'state', cjson.encode({state = state}))
return 1
"""

#: KEYS: run, events[, active set]. ARGV: head, allowed from-states (comma separated), new state, required owner
#: ('' any), event data (JSON), then field/value pairs to set.
#: Returns {'ok', previous} or {'missing'|'state'|'owner', current}.
TRANSITION = _HEAD + """
local rec = redis.call('HMGET', KEYS[1], 'state', 'owner', 'created_at')
local state, owner = rec[1], rec[2] or ''
if not state then return {'missing', ''} end
if not string.find(',' .. ARGV[5] .. ',', ',' .. state .. ',', 1, true) then return {'state', state} end
if ARGV[7] ~= '' and owner ~= ARGV[7] then return {'owner', owner} end
local to = ARGV[6]
if #ARGV > 8 then redis.call('HSET', KEYS[1], unpack(ARGV, 9, #ARGV)) end
redis.call('HSET', KEYS[1], 'state', to, 'updated_at', now)
if terminal(to) then
  -- stopped from outside while a coordinator runs it: readers wait for that coordinator's final write
  local closing = ''
  if ARGV[7] == '' and owner ~= '' then closing = owner end
  redis.call('HSET', KEYS[1], 'finished_at', now, 'owner', '', 'closing', closing)
  if KEYS[3] then redis.call('ZREM', KEYS[3], run_id) end
end
if to ~= state then event(KEYS[2], 'state', ARGV[8]) end
return {'ok', state}
"""

#: KEYS: run, events. ARGV: head, me, my reply list, heartbeat key prefix, processes known dead (see _HEAD).
#: A queued run, or a running one whose coordinator's heartbeat is gone, becomes ours (epoch + 1); completions
#: of its units are sent to our reply list from now on. Returns {'ok', epoch, previous owner} or
#: {'missing'|'state'|'owned'|'inline', detail}.
CLAIM = _HEAD + """
local rec = redis.call('HMGET', KEYS[1], 'state', 'owner', 'epoch', 'mode', 'started_at')
local state, owner, epoch, mode = rec[1], rec[2] or '', tonumber(rec[3] or '0'), rec[4] or ''
local me, reply, hb, dead = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if not state then return {'missing', ''} end
if state ~= 'queued' and state ~= 'running' then return {'state', state} end
if owner ~= '' and owner ~= me and alive(hb, dead, owner) then return {'owned', owner} end
if mode == 'inline' and owner ~= me then return {'inline', owner} end
epoch = epoch + 1
redis.call('HSET', KEYS[1], 'owner', me, 'epoch', epoch, 'reply', reply, 'state', 'running', 'updated_at', now)
if not rec[5] then redis.call('HSET', KEYS[1], 'started_at', now) end
event(KEYS[2], 'state', cjson.encode({state = 'running', coordinator = me, epoch = epoch, resumed_from = owner}))
return {'ok', tostring(epoch), owner}
"""

#: KEYS: run, events[, active set]. ARGV: head, heartbeat key prefix, error (JSON), event data (JSON), processes
#: known dead.
#: An inline run whose coordinating process is gone fails (its caller is gone too); `retry` resumes it.
ABANDON = _HEAD + """
local rec = redis.call('HMGET', KEYS[1], 'state', 'owner')
local state, owner = rec[1], rec[2] or ''
if state ~= 'running' or owner == '' or alive(ARGV[5], ARGV[8], owner) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[6], 'finished_at', now, 'updated_at', now,
  'owner', '')
if KEYS[3] then redis.call('ZREM', KEYS[3], run_id) end
event(KEYS[2], 'state', ARGV[7])
return 1
"""

#: KEYS: run, events, unit records, failed units[, active set]. ARGV: head.
#: A failed or cancelled run goes back to queued with its failed units' records dropped (they run again);
#: every OK unit record stays and is replayed. The fleet coordinates it from now on (an inline run's too).
#: Returns {'ok', attempt, dropped, created at} or {'missing'|'state', state}.
RETRY = _HEAD + """
local rec = redis.call('HMGET', KEYS[1], 'state', 'created_at')
local state = rec[1]
if not state then return {'missing', ''} end
if state ~= 'failed' and state ~= 'cancelled' then return {'state', state} end
local failed = redis.call('SMEMBERS', KEYS[4])
for i = 1, #failed, 1000 do
  redis.call('HDEL', KEYS[3], unpack(failed, i, math.min(i + 999, #failed)))
end
redis.call('DEL', KEYS[4])
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HDEL', KEYS[1], 'result', 'error', 'finished_at', 'final_blackboard', 'cost_usd', 'tokens')
-- whoever ran it before (an inline caller included), the fleet coordinates the retry
redis.call('HSET', KEYS[1], 'state', 'queued', 'owner', '', 'updated_at', now, 'mode', 'submitted')
if KEYS[5] then
  redis.call('ZADD', KEYS[5], rec[2], run_id)
  redis.call('EXPIRE', KEYS[5], retention)
end
event(KEYS[2], 'state', cjson.encode({state = 'queued', attempt = attempt, dropped_failed_units = #failed}))
return {'ok', attempt, #failed, rec[2]}
"""


#: KEYS: run. ARGV: the coordinator letting go. A run stopped from outside names its coordinator in `closing` until
#: that coordinator's final write; a coordinator that ends without that write (the run was cancelled before its
#: scope opened) clears it, else readers and a retry would wait on it as long as it lives. Returns 1 if cleared.
LET_GO = """
if redis.call('HGET', KEYS[1], 'closing') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'closing', '')
  return 1
end
return 0
"""


#: KEYS: a run's events stream, a spare key in its slot. Rewrites the stream as a copy (same entries, ids and TTL)
#: when its run parks or ends: Redis gives a new stream a listpack of stream-node-max-bytes (4 KB) and never shrinks
#: it, while COPY sizes the copy to its entries, so a run with a few events holds 1.3 KB instead of 4.7 KB (a parked
#: or kept run pays it for days). COPY and RENAME only: the documented ACL users may run them. ARGV: most entries
#: (a longer stream has full nodes: copying it would cost far more than the one node's spare room). Returns 1 if done.
COMPACT_EVENTS = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'stream' or redis.call('XLEN', KEYS[1]) > tonumber(ARGV[1]) then return 0 end
redis.call('COPY', KEYS[1], KEYS[2], 'REPLACE')
redis.call('RENAME', KEYS[2], KEYS[1])
return 1
"""
