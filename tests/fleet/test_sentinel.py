"""Redis Sentinel on real processes: a master, a replica and three sentinels (`redis-server --sentinel`), two real
workers whose state and broker URLs are redis+sentinel://, and the master failed over in the middle of a 1000-unit
run: the run completes with every result once, and no worker process exits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tasktree_dist import RunClient, RunState, Status
from tasktree_dist.distributed import create_app, keys
from tasktree_dist.testing.fleet import WorkerProcess, fleet_env, fleet_settings, running_workers
from tasktree_dist.testing.redis_server import RedisServer
from tasktree_dist.testing.sentinels import SentinelDeployment, sentinel_missing
from tests import sentinel_trees as S
from tests.helpers import eventually

pytestmark = [pytest.mark.timeout(150), pytest.mark.skipif(bool(sentinel_missing()), reason=sentinel_missing())]

UNITS = 1000


@pytest.fixture
def deployment() -> Iterator[SentinelDeployment]:
    with SentinelDeployment(master="tasktree", replicas=1, sentinels=3, down_after_ms=1000) as started:
        yield started


@pytest.fixture
def gate() -> Iterator[RedisServer]:
    """A plain Redis the second half of the run's units wait on (opened after the failover)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def fleet(deployment: SentinelDeployment, gate: RedisServer) -> Iterator[dict[str, Any]]:
    env = fleet_env(deployment.url(0), deployment.url(1), "tests.sentinel_trees", TASKTREE_REDIS_OUTAGE_LIMIT="30",
                    SENTINEL_TEST_GATE_URL=gate.url)
    settings = fleet_settings(env, redis_outage_limit=30.0)
    app = create_app(settings)
    workers = [WorkerProcess(f"sentinel{i}", env, concurrency=64) for i in (1, 2)]
    with running_workers(app, workers):
        yield {"app": app, "settings": settings, "workers": workers}


async def _completed(client: RunClient, run_id: str, at_least: int) -> int:
    count = int(await client._store().redis.hlen(keys.units(run_id)))
    return count if count >= at_least else 0


@pytest.mark.parametrize("how", ["sentinel-failover", "master-killed"])
async def test_a_failover_in_the_middle_of_a_run_loses_nothing_and_applies_nothing_twice(
    deployment: SentinelDeployment, fleet: dict[str, Any], gate: RedisServer, how: str
) -> None:
    """Units complete while the master fails over (the first half) and after it (the second half waits for a gate
    opened once the sentinels name the new master), so the run is certainly in progress across the failover: a
    `SENTINEL FAILOVER` (the old master keeps running and accepting writes until the sentinels demote it), or the
    master killed (the sentinels notice it after a second)."""
    pids = [worker.process.pid for worker in fleet["workers"] if worker.process is not None]
    old_master = deployment.master_port()
    client = RunClient(fleet["app"])
    try:
        run = await client.asubmit(S.ItemsTree, S.Items(count=UNITS, pause=0.3, gated_from=UNITS // 2, gate="open"))
        await eventually(lambda: _completed(client, run.id, 100), "100 units completed", within=60)
        fail = deployment.failover if how == "sentinel-failover" else deployment.kill_master
        new_master = await asyncio.to_thread(fail)
        assert new_master != old_master
        await client.aclose()  # the test's own connections were to the old master; the run's are the fleet's
        assert (await run.astatus()).state is RunState.RUNNING
        assert await _completed(client, run.id, 0) <= UNITS // 2
        with redis.Redis.from_url(gate.url) as opener:
            opener.set("open", 1)
        result = await run.aresult(timeout=90)
        assert result.status is Status.OK, (await run.astatus()).error
        # every unit applied exactly once: each index's value once, in order, one completion record per unit
        assert (await run.ablackboard()).values == [2 * index for index in range(UNITS)]
        assert await client._store().redis.hlen(keys.units(run.id)) == UNITS
        # the run's records are on the new master (and its replica, once the old master rejoins as one)
        assert deployment.master_port() == new_master
    finally:
        await client.aclose()
    for worker in fleet["workers"]:
        assert worker.process is not None and worker.process.poll() is None, worker.log()[-3000:]
    assert [worker.process.pid for worker in fleet["workers"] if worker.process is not None] == pids


async def test_a_sentinel_broker_is_guarded_and_read_by_the_fleet_reader(
    deployment: SentinelDeployment, fleet: dict[str, Any]
) -> None:
    """The broker through kombu's Sentinel transport: a message whose envelope cannot be read is refused and
    logged (the guarded transport), the worker keeps serving, and `tasktree workers`' reader finds the queues."""
    from tasktree_dist.cli.fleet import FleetReader
    from tasktree_dist.core.redis_client import connect

    broker = connect(deployment.url(0), asynchronous=False)
    try:
        broker.lpush("tasktree", b"\xff not an envelope {")
    finally:
        broker.close()
    client = RunClient(fleet["app"])
    try:
        run = await client.asubmit(S.ItemsTree, S.Items(count=20))
        assert (await run.aresult(timeout=60)).status is Status.OK
        assert (await run.ablackboard()).values == [2 * index for index in range(20)]
    finally:
        await client.aclose()
    logs = "".join(worker.log() for worker in fleet["workers"])
    assert logs.count("(envelope unreadable)") == 1, logs[-3000:]
    assert all(worker.process is not None and worker.process.poll() is None for worker in fleet["workers"])
    reader = FleetReader(fleet["settings"])
    lengths = reader.queue_lengths(reader.processes())
    assert lengths.get("tasktree") == 0 and "tasktree.runs" in lengths
    assert {info["process"].split("@")[0] for info in reader.processes()} >= {"sentinel1", "sentinel2"}
