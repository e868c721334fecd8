"""The worker's two Redis scripts: a message's units are admitted, and a burst of completions published, in one
atomic round trip each (a unit costs the worker two Redis commands shared with its batch, not eight).

Atomic also means the coordinator's lease check can never see a unit between states: taken but not leased,
or neither leased nor done while its completion is on the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import keys

#: KEYS: per unit (cancel, done, lease, started), then the snapshot keys to fetch.
#: ARGV: lease ms, started-marker TTL s, worker name, number of units.
#: Returns {flags per unit (1 cancelled + 2 already done), snapshot payloads (nil when missing)}.
ADMIT = """
local units = tonumber(ARGV[4])
local flags = {}
for i = 0, units - 1 do
  local k = i * 4
  local cancelled = redis.call('EXISTS', KEYS[k + 1])
  local done = redis.call('EXISTS', KEYS[k + 2])
  if done == 0 then
    redis.call('SET', KEYS[k + 3], ARGV[3], 'PX', ARGV[1])
    redis.call('SET', KEYS[k + 4], ARGV[3], 'EX', ARGV[2])
  end
  flags[i + 1] = cancelled + 2 * done
end
local snapshots = {}
if #KEYS > units * 4 then
  snapshots = redis.call('MGET', unpack(KEYS, units * 4 + 1))
end
return {flags, snapshots}
"""

#: KEYS: per completion (done, lease, reply list). ARGV: TTL s, then one payload per completion.
PUBLISH = """
local ttl = ARGV[1]
for i = 0, #KEYS / 3 - 1 do
  local k = i * 3
  redis.call('SET', KEYS[k + 1], '1', 'EX', ttl)
  redis.call('DEL', KEYS[k + 2])
  redis.call('RPUSH', KEYS[k + 3], ARGV[i + 2])
  redis.call('EXPIRE', KEYS[k + 3], ttl)
end
return #KEYS / 3
"""

CANCELLED, ALREADY_DONE = 1, 2


class WorkerScripts:
    """The scripts registered on one redis.asyncio client (redis-py loads them again after a server restart)."""

    def __init__(self, redis: Any) -> None:
        self._admit = redis.register_script(ADMIT)
        self._publish = redis.register_script(PUBLISH)

    async def admit(
        self, execution_ids: Sequence[str], snapshots: Sequence[str], worker: str, lease_ms: int, started_ttl: int
    ) -> tuple[list[int], list[bytes | None]]:
        """Flags per unit, and the payloads of `snapshots`; takes the lease of each unit not already done."""
        names = [
            name
            for execution_id in execution_ids
            for name in (keys.cancel(execution_id), keys.done(execution_id), keys.lease(execution_id),
                         keys.started(execution_id))
        ]
        flags, payloads = await self._admit(
            keys=[*names, *snapshots], args=[lease_ms, started_ttl, worker, len(execution_ids)]
        )
        return [int(flag) for flag in flags], list(payloads)

    async def publish(self, completions: Sequence[tuple[str, str, bytes]], ttl: int) -> None:
        """Publish (execution id, reply list, payload) completions: done-marker set, lease released, reply sent."""
        names = [
            name
            for execution_id, reply_to, _ in completions
            for name in (keys.done(execution_id), keys.lease(execution_id), reply_to)
        ]
        await self._publish(keys=names, args=[ttl, *(payload for _, _, payload in completions)])
