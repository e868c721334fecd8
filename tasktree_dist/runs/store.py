"""Run records, events and traces in Redis (async; RunClient wraps it for synchronous callers).

A record is a hash of strings: id, tree, fingerprint, mode, state, created/started/finished/updated_at (epoch
seconds), labels, blackboard (initial, serde JSON), result and final_blackboard (serde JSON), error (JSON),
owner (the coordinating process), epoch (claims so far), reply (where unit completions go), attempt (retries),
total (units planned), cost_usd and tokens (when finished). State changes go through runs.scripts.
"""

from __future__ import annotations

import datetime as _dt
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..core.instruments import hooks as metrics
from ..core.log import logger
from ..core.redis_client import is_cluster
from ..distributed import keys, record_codec
from ..distributed.replicas import Replicas, replicas_for
from .model import (
    ACTIVE_STATES,
    RunError,
    RunEvent,
    RunMode,
    RunProgress,
    RunState,
    RunStatus,
)
from .scripts import ABANDON, CLAIM, COMPACT_EVENTS, CREATE, LET_GO, RETRY, TRANSITION, head_args
from .waits import WaitBook


@dataclass(frozen=True)
class Outcome:
    """What a conditional state change did: `ok`, or why not (`missing`, `state`, `owner`...) and the detail."""

    ok: bool
    reason: str = ""
    detail: str = ""


def _fleet_wide(key: str) -> bool:
    return key in (keys.RUNS, keys.ACTIVE_RUNS, keys.WAITS_DUE)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _time(value: str | None) -> _dt.datetime | None:
    return _dt.datetime.fromtimestamp(float(value), _dt.UTC) if value else None


def status_from_record(record: Mapping[str, str], done: int = 0, failed: int = 0) -> RunStatus:
    """A RunStatus from a decoded record hash (and the unit counts read beside it)."""
    error = record.get("error")
    labels = record.get("labels")
    cost, tokens = record.get("cost_usd"), record.get("tokens")
    return RunStatus(
        id=record["id"],
        tree=record.get("tree", ""),
        fingerprint=record.get("fingerprint", ""),
        state=RunState(record["state"]),
        mode=RunMode(record.get("mode") or RunMode.SUBMITTED.value),
        created_at=_time(record.get("created_at")) or _dt.datetime.fromtimestamp(0, _dt.UTC),
        started_at=_time(record.get("started_at")),
        finished_at=_time(record.get("finished_at")),
        progress=RunProgress(done=done, failed=failed, total=max(int(record.get("total") or 0), done)),
        error=RunError.model_validate_json(error) if error else None,
        labels=orjson.loads(labels) if labels else {},
        attempt=int(record.get("attempt") or 0),
        coordinator=record.get("owner") or None,
        cost_usd=float(cost) if cost else None,
        tokens=int(tokens) if tokens else None,
    )


#: A payload field larger than this (a 100,000-item result) is kept under a key of its own, written a piece at a
#: time, and the record holds a reference to it: status reads stay small and no Redis command carries it whole.
BIG_FIELD_BYTES = 1 << 20
REF = "@tasktree-ref:"


#: Longest events stream rewritten when its run parks or ends: Redis's default node holds 100 entries (4 KB), so a
#: longer stream's spare room is one partly filled node among full ones, not worth a copy of all of them.
COMPACT_EVENTS_MAX = 100

#: One store per redis client (a dispatcher's, a coordinator's): its scripts are registered once.
_stores: weakref.WeakKeyDictionary[Any, RunStore] = weakref.WeakKeyDictionary()


def store_for(redis: Any, settings: Any) -> RunStore:
    """The run store on `redis` (a redis.asyncio client), made on first use."""
    store = _stores.get(redis)
    if store is None:
        store = _stores[redis] = RunStore(redis, settings.run_retention, settings.events_max, settings.reply_ttl,
                                          replicas_for(redis, settings))
    return store


class RunStore:
    """Reads and changes run records on one redis.asyncio client (bytes replies)."""

    def __init__(self, redis: Any, retention: int, events_max: int, reply_ttl: int = 3600,
                 replicas: Replicas | None = None) -> None:
        self.redis = redis
        #: On a Redis Cluster the indexes are updated beside the run scripts (runs.scripts), not inside them.
        self.cluster = is_cluster(redis)
        #: Run record changes must survive a failover: each is acknowledged by a replica (distributed.replicas).
        self.replicas = replicas or replicas_for(redis)
        #: The runs' waits and signals (runs.waits).
        self.waits = WaitBook(redis, retention, events_max, reply_ttl)
        self.retention = retention
        self.events_max = events_max
        self._create = redis.register_script(CREATE)
        self._transition = redis.register_script(TRANSITION)
        self._claim = redis.register_script(CLAIM)
        self._abandon = redis.register_script(ABANDON)
        self._retry = redis.register_script(RETRY)
        self._let_go = redis.register_script(LET_GO)
        self._compact_events = redis.register_script(COMPACT_EVENTS)

    def _head(self, run_id: str) -> list[Any]:
        return head_args(run_id, self.retention, self.events_max)

    def _keys(self, run_id: str, *more: str) -> list[str]:
        """A run script's KEYS: the run record and events, then `more`, the fleet-wide ones left out on a Cluster
        (they are not in the run's slot; the caller updates them after the script)."""
        return [keys.run(run_id), keys.events(run_id), *(k for k in more if not (self.cluster and _fleet_wide(k)))]

    @property
    def _hb(self) -> str:
        """The heartbeat key prefix for the scripts ('' on a Cluster: the caller checks heartbeats)."""
        return "" if self.cluster else keys.heartbeat("")

    async def reindex(self, run_id: str, created_at: float) -> None:
        """Put a run that became queued again back in the active set (a Cluster's second step: runs.scripts)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.ACTIVE_RUNS, {run_id: created_at})
        pipe.expire(keys.ACTIVE_RUNS, self.retention)
        await pipe.execute()

    async def prune_active(self, run_ids: Iterable[str]) -> None:
        """Drop runs that are not queued or running from the active set (on a Cluster a process may die between a
        run's state change and its index update), then put back any that became active meanwhile."""
        run_ids = list(run_ids)
        if not run_ids:
            return
        await self.redis.zrem(keys.ACTIVE_RUNS, *run_ids)
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hmget(keys.run(run_id), "state", "created_at")
        for run_id, (state, created) in zip(run_ids, await pipe.execute(), strict=True):
            if state in (b"queued", b"running"):
                await self.reindex(run_id, float(created or 0))

    # -- changes ----------------------------------------------------------------------------------------------
    async def create(
        self, run_id: str, state: RunState, fields: Mapping[str, str | bytes | bytearray], owner: str = ""
    ) -> bool:
        """Create the record (queued, or running when an inline coordinator owns it); False if it exists."""
        pairs = [item for pair in (await self._spill(run_id, fields)).items() for item in pair]
        head = self._head(run_id)
        if self.cluster:
            # indexes first, without replacing an entry (submit is idempotent): a process dying before the record
            # is written leaves an id without a record, which lists skip and supervisors prune; the other order
            # could leave a queued run no supervisor sees
            now = float(head[1])
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(keys.RUNS, {run_id: now}, nx=True)
            pipe.zremrangebyscore(keys.RUNS, "-inf", now - self.retention)
            pipe.expire(keys.RUNS, self.retention)
            pipe.zadd(keys.ACTIVE_RUNS, {run_id: now}, nx=True)
            pipe.expire(keys.ACTIVE_RUNS, self.retention)
            await pipe.execute()
        created = await self.replicas.run(self._create, keys=self._keys(run_id, keys.RUNS, keys.ACTIVE_RUNS),
                                          args=[*head, state.value, owner, *pairs])
        if created:
            metrics.run_state(state)
        return bool(created)

    async def transition(
        self,
        run_id: str,
        allowed: Iterable[RunState],
        to: RunState,
        *,
        owner: str = "",
        event: Mapping[str, Any] | None = None,
        fields: Mapping[str, str | bytes | bytearray] | None = None,
    ) -> Outcome:
        """Move the run to `to` if it is in one of `allowed` (and owned by `owner` when given), atomically."""
        pairs = [item for pair in (await self._spill(run_id, fields or {})).items() for item in pair]
        data = orjson.dumps({"state": to.value, **(event or {})})
        reason, detail = await self.replicas.run(
            self._transition, keys=self._keys(run_id, keys.ACTIVE_RUNS),
            args=[*self._head(run_id), ",".join(s.value for s in allowed), to.value, owner, data, *pairs],
        )
        reason = _text(reason)
        if self.cluster and reason == "ok" and to.finished:
            await self.redis.zrem(keys.ACTIVE_RUNS, run_id)  # after the record: see prune_active
        if reason == "ok" and _text(detail) != to.value:
            metrics.run_state(to)
        return Outcome(reason == "ok", reason, _text(detail))

    async def claim(self, run_id: str, me: str, reply: str) -> tuple[Outcome, int]:
        """Take over a queued run, or a running one whose coordinator is dead; returns the new epoch."""
        answer = await self.replicas.run(self._claim, keys=self._keys(run_id),
                                         args=[*self._head(run_id), me, reply, self._hb, ""])
        reason = _text(answer[0])
        if self.cluster and reason == "owned" and not await self.redis.exists(keys.heartbeat(_text(answer[1]))):
            # the owner's heartbeat lies in another slot: checked here, the claim made again naming it dead
            answer = await self.replicas.run(self._claim, keys=self._keys(run_id),
                                             args=[*self._head(run_id), me, reply, "", _text(answer[1])])
            reason = _text(answer[0])
        if reason != "ok":
            return Outcome(False, reason, _text(answer[1])), 0
        metrics.run_state(RunState.RUNNING)
        return Outcome(True, reason, _text(answer[2])), int(_text(answer[1]))

    async def let_go(self, run_id: str, me: str) -> bool:
        """Clear `closing` if it still names `me` (see runs.scripts.LET_GO): this coordinator writes nothing more."""
        return bool(await self._let_go(keys=[keys.run(run_id)], args=[me]))

    async def abandon(self, run_id: str, message: str) -> bool:
        """Fail an inline run whose coordinating process died (only if its heartbeat is really gone)."""
        error = RunError(message=message).model_dump_json()
        event = orjson.dumps({"state": RunState.FAILED.value, "error": message})
        dead = ""
        if self.cluster:  # the owner's heartbeat lies in another slot: checked here
            owner = _text(await self.redis.hget(keys.run(run_id), "owner") or b"")
            if not owner or await self.redis.exists(keys.heartbeat(owner)):
                return False
            dead = owner
        abandoned = bool(await self.replicas.run(self._abandon, keys=self._keys(run_id, keys.ACTIVE_RUNS),
                                                 args=[*self._head(run_id), self._hb, error, event, dead]))
        if abandoned and self.cluster:
            await self.redis.zrem(keys.ACTIVE_RUNS, run_id)
        if abandoned:
            metrics.run_state(RunState.FAILED)
        return abandoned

    async def retry(self, run_id: str) -> Outcome:
        answer = await self.replicas.run(
            self._retry, keys=self._keys(run_id, keys.units(run_id), keys.failed_units(run_id), keys.ACTIVE_RUNS),
            args=self._head(run_id))
        reason = _text(answer[0])
        if self.cluster and reason == "ok":
            await self.reindex(run_id, float(_text(answer[3])))
        if reason == "ok":
            metrics.run_state(RunState.QUEUED)
        return Outcome(reason == "ok", reason, _text(answer[1]))

    async def clear_cancel_markers(self, run_id: str) -> int:
        """Delete the cancel markers of the run's units (set when a stop abandoned them): a retry sends those units
        again under the same execution ids, and a marker left behind would refuse them as cancelled."""
        found = 0
        batch: list[bytes] = []
        async for name in self.redis.scan_iter(match=keys.cancel(run_id, "*"), count=1000):
            batch.append(name)
            if len(batch) == 1000:
                found += await self.redis.delete(*batch)
                batch = []
        if batch:
            found += await self.redis.delete(*batch)
        return found

    async def set_fields(self, run_id: str, fields: Mapping[str, str | int | float]) -> None:
        """Fields that are not state (progress total, ...); the record keeps its TTL."""
        await self.redis.hset(keys.run(run_id), mapping=dict(fields))

    async def _spill(self, run_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """The fields with every one over BIG_FIELD_BYTES moved to its own key (see `payload`)."""
        out = dict(fields)
        for name, value in fields.items():
            if isinstance(value, bytes | bytearray) and len(value) > BIG_FIELD_BYTES:
                view, size = memoryview(value), BIG_FIELD_BYTES
                out[name] = await self.put_payload(run_id, name, (view[i:i + size] for i in range(0, len(view), size)))
        return out

    async def put_payload(self, run_id: str, name: str, chunks: Iterator[bytes | memoryview]) -> Any:
        """A payload field's value for the record from its encoded chunks (serde.dump_chunks of BIG_FIELD_BYTES):
        itself when one chunk holds it, else a reference to its own key, written a chunk at a time as encoded."""
        first = next(chunks, b"")
        second = next(chunks, None)
        if second is None:
            return first
        key = keys.run_field(run_id, name)
        await self.redis.set(key, first, ex=self.retention)
        await self.redis.append(key, second)
        for chunk in chunks:
            await self.redis.append(key, chunk)
        return REF + key

    async def payload(self, record: Mapping[str, str], name: str) -> str | bytes | None:
        """A payload field of a record (blackboard, result, final_blackboard), read from its own key if spilled."""
        value = record.get(name)
        if value and value.startswith(REF):
            return await self.redis.get(value.removeprefix(REF))
        return value or None

    # -- reads ------------------------------------------------------------------------------------------------
    async def record(self, run_id: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(keys.run(run_id))
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}

    async def status(self, run_id: str) -> RunStatus | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.run(run_id))
        pipe.hlen(keys.units(run_id))
        pipe.scard(keys.failed_units(run_id))
        raw, done, failed = await pipe.execute()
        if not raw:
            return None
        return status_from_record({_text(k): _text(v) for k, v in raw.items()}, int(done), int(failed))

    async def statuses(self, run_ids: list[str]) -> list[RunStatus]:
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hgetall(keys.run(run_id))
            pipe.hlen(keys.units(run_id))
            pipe.scard(keys.failed_units(run_id))
        replies = await pipe.execute() if run_ids else []
        out = []
        for i in range(0, len(replies), 3):
            raw, done, failed = replies[i : i + 3]
            if raw:
                out.append(status_from_record({_text(k): _text(v) for k, v in raw.items()}, int(done), int(failed)))
        return out

    async def list(
        self,
        state: RunState | None = None,
        tree: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[list[RunStatus], str | None]:
        """Newest first; `cursor` (from the previous page) continues below it. Filters apply within pages; `labels`
        keeps runs carrying every one of them."""
        index = keys.ACTIVE_RUNS if state in ACTIVE_STATES else keys.RUNS
        high = f"({cursor}" if cursor else "+inf"
        found: list[RunStatus] = []
        while len(found) < limit:
            page = await self.redis.zrevrangebyscore(index, high, "-inf", start=0, num=max(limit, 50),
                                                     withscores=True)
            if not page:
                return found, None
            statuses = await self.statuses([_text(member) for member, _ in page])
            for item in statuses:
                if ((state is None or item.state == state) and (tree is None or item.tree == tree)
                        and all(item.labels.get(k) == v for k, v in (labels or {}).items())):
                    found.append(item)
                    if len(found) == limit:
                        return found, repr(item.created_at.timestamp())
            high = f"({page[-1][1]!r}"
        return found, None

    async def active_runs(self, limit: int = 1000) -> list[str]:
        """Queued and running runs, oldest first (what supervisors look after)."""
        return [_text(m) for m in await self.redis.zrange(keys.ACTIVE_RUNS, 0, limit - 1)]

    # -- events -----------------------------------------------------------------------------------------------
    async def emit_many(self, run_id: str, events: list[tuple[str, Mapping[str, Any]]]) -> None:
        name = keys.events(run_id)
        pipe = self.redis.pipeline(transaction=False)
        for kind, data in events:
            pipe.xadd(name, {"type": kind, "data": orjson.dumps(data)}, maxlen=self.events_max, approximate=True)
        pipe.expire(name, self.retention)
        await pipe.execute()

    async def events(self, run_id: str, after: str = "0", block_ms: int | None = None,
                     count: int = 500) -> list[RunEvent]:
        """Events after stream id `after` ("0": from the start); waits up to `block_ms` for new ones."""
        reply = await self.redis.xread({keys.events(run_id): after}, count=count, block=block_ms)
        out = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                data = fields.get(b"data")
                out.append(RunEvent(_text(entry_id), _text(fields.get(b"type", b"")),
                                    orjson.loads(data) if data else {}))
        return out

    async def last_event_id(self, run_id: str) -> str:
        entries = await self.redis.xrevrange(keys.events(run_id), count=1)
        return _text(entries[0][0]) if entries else "0"

    # -- traces and unit records ------------------------------------------------------------------------------
    async def write_trace(self, run_id: str, trace: bytes) -> None:
        """Stored deflated (record_codec, as unit records): a trace is mostly the library's own field names."""
        await self.redis.set(keys.trace(run_id), record_codec.pack(trace), ex=self.retention)

    async def trace(self, run_id: str) -> bytes | None:
        """The trace's JSON (deflated or, written by an older version, as is)."""
        stored = await self.redis.get(keys.trace(run_id))
        return None if stored is None else bytes(record_codec.unpack(stored))

    async def compact_events(self, run_id: str) -> None:
        """Shrink the run's events stream to its entries (scripts.COMPACT_EVENTS), when it parks or ends; best
        effort: a stream left as it is only costs memory."""
        try:
            await self._compact_events(keys=[keys.events(run_id), f"{keys.events(run_id)}:compact"],
                                       args=[COMPACT_EVENTS_MAX])
        except Exception as exc:  # noqa: BLE001 - memory only: the run goes on whatever happens here
            logger.debug("run %s: compacting its events failed: %s: %s", run_id, type(exc).__name__, exc)

    async def unit_records(self, run_id: str, execution_ids: list[str]) -> list[bytes | None]:
        if not execution_ids:
            return []
        return list(await self.redis.hmget(keys.units(run_id), execution_ids))
