"""A worker that dies holding a unit: its heartbeat expires and the coordinator sends the unit again (real
processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tasktree_dist import Context, Result, Status
from tasktree_dist.distributed import CeleryExecutor, create_app, keys
from tasktree_dist.testing.fleet import WorkerProcess, fleet_env, fleet_settings, stop_workers, wait_until_ready
from tests import dist_trees as T
from tests.helpers import eventually, redis_db

pytestmark = pytest.mark.timeout(120)

LEASE_TTL = "1.5"


@pytest.fixture
def doomed_fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    """A worker on queue `doomed` that hangs in T.Doomed, and the environment for a rescuer; stopped by PID."""
    env = fleet_env(redis_db(redis_url, 6), redis_db(redis_url, 7), "tests.dist_trees", TASKTREE_LEASE_TTL=LEASE_TTL)
    settings = fleet_settings(env, lease_ttl=float(LEASE_TTL), max_dispatches=2)
    app = create_app(settings)
    doomed = WorkerProcess("doomed", {**env, "TASKTREE_TEST_DOOMED": "1"}, queues="doomed", concurrency=4)
    rescuer = WorkerProcess("rescuer", env, queues="doomed", concurrency=4)
    try:
        doomed.start()
        wait_until_ready(app, [doomed])
        yield {"app": app, "settings": settings, "doomed": doomed, "rescuer": rescuer}
    finally:
        stop_workers([doomed, rescuer])


async def taken_unit(dispatcher: Any) -> tuple[str, bytes]:
    """(execution id, owner) of the one unit in flight, once a worker has received it."""
    [execution_id] = await eventually(lambda: _units(dispatcher), "dispatch")
    run_id = dispatcher.inflight[execution_id].unit.run_id
    owner = await eventually(lambda: dispatcher.redis.get(keys.owner(run_id, execution_id)),
                             "a worker receiving the unit")
    return execution_id, owner


async def _units(dispatcher: Any) -> list[str]:
    return list(dispatcher.inflight)


async def test_a_unit_whose_worker_dies_is_sent_again_and_completes_elsewhere(doomed_fleet: dict[str, Any]) -> None:
    executor = CeleryExecutor(doomed_fleet["app"], settings=doomed_fleet["settings"])
    board, context = T.Board(), Context(executor=executor, run_id=f"lease{time.time_ns()}")
    try:
        async with context.using_blackboard(board):
            run = asyncio.create_task(T.Doomed(context))
            dispatcher = executor._dispatcher()
            _, owner = await taken_unit(dispatcher)
            assert owner.decode().startswith("doomed@")
            os.kill(doomed_fleet["doomed"].process.pid, signal.SIGKILL)  # dies mid-unit, no completion
            doomed_fleet["doomed"].process.wait(10)
            doomed_fleet["rescuer"].start()
            result = await asyncio.wait_for(run, 60)
    finally:
        await executor.aclose()
    assert result == Result.OK("survived") and board.where  # the rescuer's run updated the blackboard
    [unit] = [node for node in context.trace_root().walk() if "worker" in node.attributes]
    assert unit.attributes["worker"].startswith("rescuer@")
    assert unit.attributes["dispatches"] == 2 and unit.attributes["lost_workers"][0].startswith("doomed@")


async def test_a_unit_is_failed_after_max_dispatches_naming_the_dead_workers(doomed_fleet: dict[str, Any]) -> None:
    """With no worker left to rescue it, the unit FAILs after max_dispatches instead of waiting forever."""
    settings = doomed_fleet["settings"].model_copy(update={"max_dispatches": 1})
    executor = CeleryExecutor(doomed_fleet["app"], settings=settings)
    context = Context(executor=executor, run_id=f"lease{time.time_ns()}")
    try:
        async with context.using_blackboard(T.Board()):
            run = asyncio.create_task(T.Doomed(context))
            dispatcher = executor._dispatcher()
            await taken_unit(dispatcher)
            os.kill(doomed_fleet["doomed"].process.pid, signal.SIGKILL)
            started = time.monotonic()
            result = await asyncio.wait_for(run, 30)
    finally:
        await executor.aclose()
    assert result.status is Status.FAIL and time.monotonic() - started < 10
    [unit] = [node for node in context.trace_root().walk() if node.attributes.get("error")]
    error = unit.attributes["error"]
    assert "died" in error and "doomed@" in error and "DistDoomed" in error and "TASKTREE_MAX_DISPATCHES" in error


def test_a_private_redis_stopping_for_good_stops_this_process_s_heartbeats_to_it() -> None:
    """A test's server going away takes this process's heartbeats to it along (none warns at a closed port); one
    restarted with its data keeps them."""
    from tasktree_dist.distributed.liveness import _heartbeats, process_heartbeat
    from tasktree_dist.testing.redis_server import RedisServer

    server = RedisServer(appendonly=True).start()
    try:
        beat = process_heartbeat(f"{server.url}/5", ttl=3.0)
        server.stop(keep_data=True)
        assert beat.alive and _heartbeats[f"{server.url}/5"] is beat  # a restart, not the end
        server.start()
    finally:
        server.stop()
    assert not beat.alive and f"{server.url}/5" not in _heartbeats
