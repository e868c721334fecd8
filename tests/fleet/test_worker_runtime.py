"""The worker runtime in this process against a real redis-server: what one message's batch of units does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from broker_config import TasktreeSettings
from tasktree_dist.distributed import keys
from tasktree_dist.distributed.protocol import Completion, Unit
from tasktree_dist.distributed.runtime import WorkerRuntime
from tasktree_dist.distributed.snapshots import encode_blackboard, store_snapshots
from tasktree_dist.runs.model import RunState
from tasktree_dist.runs.store import RunStore
from tests import dist_trees as T
from tests.helpers import redis_db


@pytest.fixture
def runtime(redis_url: str) -> Iterator[WorkerRuntime]:
    settings = TasktreeSettings(redis_url=redis_db(redis_url, 8))
    runtime = WorkerRuntime(settings, snapshot_cache=1, name="rt@test")  # evicts on every other snapshot
    try:
        yield runtime
    finally:
        runtime.close()


async def doc_units(redis: Any, texts: list[str], state: RunState = RunState.RUNNING) -> list[Unit]:
    """Units of a run recorded as `state` (workers drop units of unknown or finished runs)."""
    payloads = [encode_blackboard(T.Doc(text), 1 << 20)[1] for text in texts]
    run_id = f"rt{time.time_ns()}"
    snapshots = await store_snapshots(redis, run_id, payloads, 60)
    await RunStore(redis, 600, 1000).create(run_id, state, {"tree": T.DocTree.name, "reply": keys.reply(run_id)})
    return [
        Unit(run_id=run_id, execution_id=f"{run_id}:{i}", tree=T.DocTree.name, fingerprint=T.DocTree.fingerprint,
             index=i, snapshot=snapshot, reply_to=keys.reply(run_id), queue="tasktree", sent_at=time.time())
        for i, snapshot in enumerate(snapshots)
    ]


async def replies(redis: Any, key: str) -> list[Completion]:
    return [Completion.from_record(raw) for raw in await redis.lrange(key, 0, -1)]


async def test_a_batch_keeps_its_snapshots_when_the_cache_evicts_them_and_runs_each_unit_once(
    runtime: WorkerRuntime, redis_url: str
) -> None:
    import redis.asyncio as aioredis

    redis = aioredis.Redis.from_url(runtime.redis_url)
    try:
        units = await doc_units(redis, ["a", "b", "c"])
        raw = [orjson.loads(unit.model_dump_json()) for unit in units]
        meta = {"hostname": "rt@test", "task_id": "t1"}
        await asyncio.to_thread(runtime.run_batch, raw, meta)
        done = await replies(redis, units[0].reply_to)
        assert sorted((c.execution_id, c.status, c.data) for c in done) == [
            (units[i].execution_id, "OK", text) for i, text in enumerate(["A", "B", "C"])
        ]
        assert all(c.worker == "rt@test" and c.changes and c.changes.get("upper") for c in done)
        records = await redis.hgetall(keys.units(units[0].run_id))
        assert sorted(records) == sorted(unit.execution_id.encode() for unit in units)  # recorded before sent
        owners = [keys.owner(unit.run_id, unit.execution_id) for unit in units]
        assert not await redis.exists(*owners)  # ownership released
        await redis.delete(units[0].reply_to)
        await asyncio.to_thread(runtime.run_batch, raw, meta)  # a duplicate delivery of the same message
        again = await replies(redis, units[0].reply_to)  # answered from the records: never run twice
        assert sorted(c.model_dump_json() for c in again) == sorted(c.model_dump_json() for c in done)
    finally:
        await redis.aclose()


async def test_a_cancelled_or_expired_unit_is_answered_with_a_failure(runtime: WorkerRuntime) -> None:
    import redis.asyncio as aioredis

    redis = aioredis.Redis.from_url(runtime.redis_url)
    try:
        cancelled, expired = await doc_units(redis, ["x", "y"])
        await redis.set(keys.cancel(cancelled.run_id, cancelled.execution_id), 1, ex=60)
        expired.snapshot = keys.snapshot(expired.run_id, "gone")
        raw = [orjson.loads(unit.model_dump_json()) for unit in (cancelled, expired)]
        await asyncio.to_thread(runtime.run_batch, raw, {"hostname": "rt@test"})
        by_id = {c.execution_id: c for c in await replies(redis, cancelled.reply_to)}
        assert by_id[cancelled.execution_id].status == "FAIL"
        assert "cancelled before it started" in by_id[cancelled.execution_id].error
        assert "expired" in by_id[expired.execution_id].error and "rt@test" in by_id[expired.execution_id].error
    finally:
        await redis.aclose()


async def test_an_unreadable_unit_is_answered_with_a_failure_and_its_batch_mates_still_run(
    runtime: WorkerRuntime,
) -> None:
    import redis.asyncio as aioredis

    redis = aioredis.Redis.from_url(runtime.redis_url)
    try:
        [good] = await doc_units(redis, ["ok"])
        bad = {"run_id": good.run_id, "execution_id": f"{good.run_id}:bad", "reply_to": good.reply_to, "tree": 42}
        raw = [orjson.loads(good.model_dump_json()), bad, "not even a dict"]
        await asyncio.to_thread(runtime.run_batch, raw, {"hostname": "rt@test"})
        by_id = {c.execution_id: c for c in await replies(redis, good.reply_to)}
        assert by_id[good.execution_id].status == "OK" and by_id[good.execution_id].data == "OK"
        assert by_id[bad["execution_id"]].status == "FAIL"
        assert "unreadable unit" in by_id[bad["execution_id"]].error and "rt@test" in by_id[bad["execution_id"]].error
    finally:
        await redis.aclose()


async def test_a_bad_reply_target_fails_only_its_own_units(runtime: WorkerRuntime) -> None:
    """One run's reply list is not a list: its answer is lost (its record stays), the batch mate's arrives."""
    import redis.asyncio as aioredis

    redis = aioredis.Redis.from_url(runtime.redis_url)
    try:
        [broken] = await doc_units(redis, ["broken"])
        [fine] = await doc_units(redis, ["fine"])
        await redis.set(broken.reply_to, "not a list")
        raw = [orjson.loads(unit.model_dump_json()) for unit in (broken, fine)]
        await asyncio.to_thread(runtime.run_batch, raw, {"hostname": "rt@test"})
        [answer] = await replies(redis, fine.reply_to)
        assert answer.execution_id == fine.execution_id and answer.data == "FINE"
        assert await redis.hexists(keys.units(broken.run_id), broken.execution_id)  # recorded all the same
        assert await redis.get(broken.reply_to) == b"not a list"
        await asyncio.to_thread(runtime.run_batch, [orjson.loads(fine.model_dump_json())], {"hostname": "rt@test"})
        assert len(await replies(redis, fine.reply_to)) == 2  # the process keeps serving (answered from record)
    finally:
        await redis.aclose()
