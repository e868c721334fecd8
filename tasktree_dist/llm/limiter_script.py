"""The limiter's one Redis script: every flow-control operation a process issues in a loop iteration, applied
atomically in one round trip, on the Redis server's clock (one clock for the whole fleet).

Per scope (a provider, a model or a concurrency key) six keys: its name h is passed in KEYS, the others are h
followed by their suffix (so a call's keys travel once, not six times: one Redis server, not a cluster):
  h  HASH   tt: tokens in the window; gr/gt: pacing (theoretical arrival time, ms) of requests/tokens;
            p: paused until (ms); hold: average slot hold (ms); v: the waiting room's virtual time;
            qt: the waiters' estimated tokens; a:<call>: a call's tokens in the window;
            q:<ticket>: "<est tokens>|<run>" of a waiter; n:<run>: how many of the run's calls wait
  :r ZSET   requests log: call -> time sent (ms)
  :t ZSET   tokens log: call -> time sent (ms), amounts in h
  :c ZSET   concurrency slots: call -> lease expiry (ms)
  :w ZSET   waiting room: ticket -> fair tag
  :x ZSET   waiting room: ticket -> expiry (ms)
Per run budget two keys: b HASH (mt/mc limits, ut/uc used, rt/rc reserved, a:<call> "<tokens>|<cost>") in KEYS,
and b:z ZSET (reservation -> lease expiry).

Windows are sliding logs: a call is admitted when the requests (tokens) sent in the last window, plus those of
the waiters ahead of it, plus its own, fit the limit; every window of that length then holds at most the limit,
so a provider's fixed or sliding window of the same length does too (the client's window carries a margin for
send-to-arrival jitter). Within the window, calls are paced (GCRA: one request, or one token, every window/limit,
with a burst of 5 % of the window): a window's worth never leaves in one burst, which providers that enforce
per-minute limits per second refuse, and each of their windows sees the same share.

Tags in the waiting room interleave runs (start-time fair queueing, one unit per call): a run's k-th waiting call
gets tag v + k, so a run with one waiting call is served next, whatever another run queued. A waiter at position
p goes as soon as the capacity covers everyone up to p.

ARGV[1]: a JSON list of operations (see limiter.py for their fields); returns the JSON list of their results.
"""

SCRIPT = r"""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local BURST = 0.05  -- of a window: how far pacing lets calls run ahead of an even spread
local function num(value, default) return tonumber(value) or default end

-- ms until pacing lets a call go with `ahead` (requests or tokens) queued before it (GCRA: `field` holds the
-- theoretical arrival time, `spacing` the ms one request or token takes)
local function paced(h, field, ahead, spacing, w)
  return math.max(num(redis.call('HGET', h, field), 0), now) + ahead * spacing - w * BURST - now
end

local SUFFIXES = {'', ':r', ':t', ':c', ':w', ':x'}
local function keep(i, ttl)
  for _, suffix in ipairs(SUFFIXES) do redis.call('PEXPIRE', KEYS[i] .. suffix, ttl) end
end

local function amounts(h, prefix, members)
  local fields = {}
  for n, m in ipairs(members) do fields[n] = prefix .. m end
  return fields, redis.call('HMGET', h, unpack(fields))
end

-- tokens still in the window, after dropping what left it
local function window_tokens(i, w)
  local h, log = KEYS[i], KEYS[i] .. ':t'
  while true do
    local old = redis.call('ZRANGEBYSCORE', log, '-inf', now - w, 'LIMIT', 0, 200)
    if #old == 0 then break end
    local fields, values = amounts(h, 'a:', old)
    local sum = 0
    for _, a in ipairs(values) do sum = sum + num(a, 0) end
    redis.call('HINCRBY', h, 'tt', -sum)
    redis.call('HDEL', h, unpack(fields))
    redis.call('ZREM', log, unpack(old))
    if #old < 200 then break end
  end
  return num(redis.call('HGET', h, 'tt'), 0)
end

-- ms until `need` of the window's `total` tokens have left it (oldest first, a few entries at a time)
local function until_tokens_leave(i, w, need, total)
  if need >= total then  -- everything in the window must leave: when its newest entry does
    local newest = redis.call('ZRANGE', KEYS[i] .. ':t', -1, -1, 'WITHSCORES')
    return #newest > 0 and tonumber(newest[2]) + w - now or w
  end
  local freed = 0
  for start = 0, 192, 8 do
    local entries = redis.call('ZRANGE', KEYS[i] .. ':t', start, start + 7, 'WITHSCORES')
    if #entries == 0 then break end
    local members = {}
    for j = 1, #entries, 2 do members[#members + 1] = entries[j] end
    local _, values = amounts(KEYS[i], 'a:', members)
    for j, a in ipairs(values) do
      freed = freed + num(a, 0)
      if freed >= need then return tonumber(entries[2 * j]) + w - now end
    end
  end
  return w
end

local function forget_ticket(q, k)
  local h = KEYS[q]
  local info = redis.call('HGET', h, 'q:' .. k)
  if info then
    local bar = string.find(info, '|', 1, true)
    local run = string.sub(info, bar + 1)
    if redis.call('HINCRBY', h, 'n:' .. run, -1) <= 0 then redis.call('HDEL', h, 'n:' .. run) end
    redis.call('HINCRBY', h, 'qt', -tonumber(string.sub(info, 1, bar - 1)))
    redis.call('HDEL', h, 'q:' .. k)
  end
  redis.call('ZREM', KEYS[q] .. ':w', k)
  redis.call('ZREM', KEYS[q] .. ':x', k)
end

-- the ticket's position in the waiting room, queued with the run's next tag if it was not there
local function position(q, k, run, est, ttl)
  local rank = redis.call('ZRANK', KEYS[q] .. ':w', k)
  if rank then return rank end
  local h = KEYS[q]
  local tag = num(redis.call('HGET', h, 'v'), 0) + redis.call('HINCRBY', h, 'n:' .. run, 1)
  redis.call('ZADD', KEYS[q] .. ':w', tag, k)
  redis.call('ZADD', KEYS[q] .. ':x', now + ttl, k)  -- the caller sets its real expiry
  redis.call('HSET', h, 'q:' .. k, est .. '|' .. run)
  redis.call('HINCRBY', h, 'qt', est)
  keep(q, ttl)
  return redis.call('ZRANK', KEYS[q] .. ':w', k)
end

-- the tokens the waiters ahead of `rank` will take (their average estimate: calls of one model are alike)
local function tokens_ahead(q, rank)
  if rank == 0 then return 0 end
  local waiting = redis.call('ZCARD', KEYS[q] .. ':w')
  return num(redis.call('HGET', KEYS[q], 'qt'), 0) * rank / math.max(waiting, 1)
end

-- budget: nil when the call fits (or the run has none: second value true), else the answer to give
local function budget_verdict(b)
  local bh, bz = KEYS[b[1]], KEYS[b[1]] .. ':z'
  if redis.call('EXISTS', bh) == 0 then
    if b[5] == 0 then return nil, true end
    if b[6] >= 0 then redis.call('HSET', bh, 'mt', b[6]) end
    if b[7] >= 0 then redis.call('HSET', bh, 'mc', b[7]) end
    redis.call('HSET', bh, 'ut', 0, 'uc', 0, 'rt', 0, 'rc', 0)
    redis.call('EXPIRE', bh, b[4])
  end
  -- the reservations of a process that died count as spent, at their estimates
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', bz, '-inf', now, 'LIMIT', 0, 100)) do
    local a = redis.call('HGET', bh, 'a:' .. m)
    if a then
      local tok, cost = string.match(a, '^([^|]*)|(.*)$')
      redis.call('HINCRBY', bh, 'rt', 0 - tok)  -- not -tok: '-0' is no integer to Redis
      redis.call('HINCRBY', bh, 'ut', tok)
      redis.call('HINCRBYFLOAT', bh, 'rc', 0 - cost)
      redis.call('HINCRBYFLOAT', bh, 'uc', cost)
      redis.call('HDEL', bh, 'a:' .. m)
    end
    redis.call('ZREM', bz, m)
  end
  local f = redis.call('HMGET', bh, 'mt', 'mc', 'ut', 'uc', 'rt', 'rc')
  local mt, mc = tonumber(f[1]), tonumber(f[2])
  local ut, uc, rt, rc = num(f[3], 0), num(f[4], 0), num(f[5], 0), num(f[6], 0)
  local et, ec = b[2], b[3]
  if mt and ut >= mt then return {s = -1, r = 'max_total_tokens', lim = mt, used = ut, est = et, why = 'reached'} end
  if mc and uc >= mc then return {s = -1, r = 'max_cost_usd', lim = mc, used = uc, est = ec, why = 'reached'} end
  if mt and ut + et > mt then return {s = -1, r = 'max_total_tokens', lim = mt, used = ut, est = et, why = 'would'} end
  if mc and uc + ec > mc then return {s = -1, r = 'max_cost_usd', lim = mc, used = uc, est = ec, why = 'would'} end
  -- calls in flight may settle below their estimates: wait for them rather than fail a call that may fit
  if (mt and ut + rt + et > mt) or (mc and uc + rc + ec > mc) then return {s = 0, w = 100, r = 'budget', p = 0} end
  return nil, false
end

local function acquire(op)
  local k, q, est = op.k, op.q, op.e
  local absent = false
  if op.b then
    local verdict
    verdict, absent = budget_verdict(op.b)
    if verdict then
      if q > 0 then forget_ticket(q, k) end
      return verdict
    end
  end
  local rank = 0
  if q > 0 then
    for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[q] .. ':x', '-inf', now, 'LIMIT', 0, 50)) do
      forget_ticket(q, dead)
    end
    if redis.call('ZCARD', KEYS[q] .. ':w') > 0 then rank = position(q, k, op.u, est, op.x) end
  end
  local wait, reason = 0, nil
  for _, s in ipairs(op.s) do
    local paused = num(redis.call('HGET', KEYS[s[1]], 'p'), 0) - now
    if paused > wait then wait, reason = paused, 'pause' end
  end
  if wait == 0 then
    local ahead = nil
    for _, s in ipairs(op.s) do
      local i, rpm, tpm, w, conc = s[1], s[2], s[3], s[4], s[5]
      if rpm > 0 then
        redis.call('ZREMRANGEBYSCORE', KEYS[i] .. ':r', '-inf', now - w)
        local n = redis.call('ZCARD', KEYS[i] .. ':r')
        local over = n + rank + 1 - rpm
        local until_free = paced(KEYS[i], 'gr', rank, w / rpm, w)
        if over > 0 then
          local log_free = w
          if over <= n then
            log_free = tonumber(redis.call('ZRANGE', KEYS[i] .. ':r', over - 1, over - 1, 'WITHSCORES')[2]) + w - now
          end
          until_free = math.max(until_free, log_free)
        end
        if until_free > wait then wait, reason = until_free, 'rpm' end
      end
      if tpm > 0 then
        if est > tpm then
          if q > 0 then forget_ticket(q, k) end
          return {s = -2, key = KEYS[i], lim = tpm, est = est}
        end
        if ahead == nil then ahead = (q > 0) and tokens_ahead(q, rank) or 0 end
        local total = window_tokens(i, w)
        local over = total + ahead + est - tpm
        local until_free = paced(KEYS[i], 'gt', ahead, w / tpm, w)
        -- the log can only add to a wait shorter than a window (what is in it leaves within one)
        if over > 0 and until_free < w then
          until_free = math.max(until_free, until_tokens_leave(i, w, over, total))
        end
        if until_free > wait then wait, reason = until_free, 'tpm' end
      end
      if conc > 0 then
        redis.call('ZREMRANGEBYSCORE', KEYS[i] .. ':c', '-inf', now)
        local over = redis.call('ZCARD', KEYS[i] .. ':c') + rank + 1 - conc
        if over > 0 then
          local until_free = num(redis.call('HGET', KEYS[i], 'hold'), 100) * over / conc
          if until_free > wait then wait, reason = until_free, 'concurrency' end
        end
      end
    end
  end
  if wait > 0 then
    if q > 0 then
      rank = position(q, k, op.u, est, op.x)
      redis.call('ZADD', KEYS[q] .. ':x', now + wait + op.g, k)
    end
    return {s = 0, w = wait, r = reason, p = rank, nb = absent}
  end
  if q > 0 then
    local tag = redis.call('ZSCORE', KEYS[q] .. ':w', k)
    if tag then
      if tonumber(tag) > num(redis.call('HGET', KEYS[q], 'v'), 0) then redis.call('HSET', KEYS[q], 'v', tag) end
      forget_ticket(q, k)
    end
  end
  local m = op.m
  for _, s in ipairs(op.s) do
    local i, rpm, tpm, w = s[1], s[2], s[3], s[4]
    if rpm > 0 then
      redis.call('ZADD', KEYS[i] .. ':r', now, m)
      redis.call('HSET', KEYS[i], 'gr', math.max(num(redis.call('HGET', KEYS[i], 'gr'), 0), now) + w / rpm)
    end
    if tpm > 0 then
      redis.call('ZADD', KEYS[i] .. ':t', now, m)
      redis.call('HSET', KEYS[i], 'a:' .. m, est)
      redis.call('HINCRBY', KEYS[i], 'tt', est)
      redis.call('HSET', KEYS[i], 'gt', math.max(num(redis.call('HGET', KEYS[i], 'gt'), 0), now) + est * w / tpm)
    end
    if s[5] > 0 then redis.call('ZADD', KEYS[i] .. ':c', now + op.l, m) end
    keep(i, op.x)
  end
  if op.b and not absent then
    local b = op.b
    local bh, bz = KEYS[b[1]], KEYS[b[1]] .. ':z'
    redis.call('HINCRBY', bh, 'rt', b[2])
    redis.call('HINCRBYFLOAT', bh, 'rc', b[3])
    redis.call('HSET', bh, 'a:' .. m, b[2] .. '|' .. b[3])
    redis.call('ZADD', bz, now + op.l, m)
    redis.call('EXPIRE', bh, b[4])
    redis.call('EXPIRE', bz, b[4])
  end
  return {s = 1, t = now, nb = absent}
end

-- the call is over: correct its tokens by the real usage, free its slots, settle its budget reservation
local function settle(op)
  local m = op.m
  for _, s in ipairs(op.s) do
    local i, delta, conc, spacing = s[1], s[2], s[3], s[4]
    if delta ~= 0 and redis.call('HEXISTS', KEYS[i], 'a:' .. m) == 1 then
      redis.call('HINCRBY', KEYS[i], 'a:' .. m, delta)
      redis.call('HINCRBY', KEYS[i], 'tt', delta)
      redis.call('HINCRBYFLOAT', KEYS[i], 'gt', delta * spacing)
    end
    if conc == 1 and redis.call('ZREM', KEYS[i] .. ':c', m) == 1 then
      local hold = num(redis.call('HGET', KEYS[i], 'hold'), op.h)
      redis.call('HSET', KEYS[i], 'hold', hold * 0.8 + op.h * 0.2)
    end
  end
  if op.b then
    local b = op.b
    local bh = KEYS[b[1]]
    local a = redis.call('HGET', bh, 'a:' .. m)
    if a then  -- else its lease ran out and it was counted at its estimate
      local tok, cost = string.match(a, '^([^|]*)|(.*)$')
      redis.call('HINCRBY', bh, 'rt', 0 - tok)  -- not -tok: '-0' is no integer to Redis
      redis.call('HINCRBYFLOAT', bh, 'rc', 0 - cost)
      redis.call('HINCRBY', bh, 'ut', b[2])
      redis.call('HINCRBYFLOAT', bh, 'uc', b[3])
      redis.call('HDEL', bh, 'a:' .. m)
      redis.call('ZREM', KEYS[b[1]] .. ':z', m)
      redis.call('EXPIRE', bh, b[4])
    end
  end
  return 1
end

local function pause(op)
  local resume = now + op.ms
  for _, i in ipairs(op.s) do
    if num(redis.call('HGET', KEYS[i], 'p'), 0) < resume then redis.call('HSET', KEYS[i], 'p', resume) end
    keep(i, op.x)
  end
  return resume
end

local function renew(op)
  for _, e in ipairs(op.c) do redis.call('ZADD', KEYS[e[1]] .. ':c', 'XX', now + op.l, e[2]) end
  for _, e in ipairs(op.z) do redis.call('ZADD', KEYS[e[1]] .. ':z', 'XX', now + op.l, e[2]) end
  return 1
end

-- a run's budget, written by its coordinator: limits replaced, counters kept (a resumed run keeps its spending)
local function open_budget(op)
  local b = op.b
  local bh = KEYS[b[1]]
  redis.call('HDEL', bh, 'mt', 'mc')
  if b[3] >= 0 then redis.call('HSET', bh, 'mt', b[3]) end
  if b[4] >= 0 then redis.call('HSET', bh, 'mc', b[4]) end
  for _, counter in ipairs({'ut', 'uc', 'rt', 'rc'}) do redis.call('HSETNX', bh, counter, 0) end
  redis.call('EXPIRE', bh, b[2])
  return 1
end

-- what each scope holds now, for routing's choice between deployments: ms it stays paused, requests and tokens in
-- its window, slots held, waiters (op.s: [key index, window ms] per scope)
local function inspect(op)
  local out = {}
  for n, s in ipairs(op.s) do
    local i, w = s[1], s[2]
    local h = KEYS[i]
    redis.call('ZREMRANGEBYSCORE', h .. ':r', '-inf', now - w)
    redis.call('ZREMRANGEBYSCORE', h .. ':c', '-inf', now)
    out[n] = {math.max(num(redis.call('HGET', h, 'p'), 0) - now, 0), redis.call('ZCARD', h .. ':r'),
              window_tokens(i, w), redis.call('ZCARD', h .. ':c'), redis.call('ZCARD', h .. ':w')}
  end
  return out
end

local handlers = {a = acquire, s = settle, p = pause, r = renew, B = open_budget, i = inspect,
                  l = function(op) forget_ticket(op.q, op.k) return 1 end}
local results = {}
for n, op in ipairs(cjson.decode(ARGV[1])) do results[n] = handlers[op.o](op) end
return cjson.encode(results)
"""
