"""Supervision on real processes: a run survives the death of a worker holding prefetched and running units, the
death of its coordinator (takeover by replay), and a Redis restart; Redis away past the limit fails it clearly.
A private redis-server with AOF (restartable) and real `celery -A worker worker` processes, stopped by PID."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tasktree_dist import Context, RunClient, RunState, Status
from tasktree_dist.distributed import CeleryExecutor, create_app, keys
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tasktree_dist.testing.fleet import WorkerProcess, fleet_env, fleet_settings, stop_workers, wait_until_ready
from tasktree_dist.testing.redis_server import RedisServer
from tests import run_trees as R
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(150)

TTL = 2.0


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A private, restartable Redis (AOF): broker and store alike, as in a small deployment."""
    with RedisServer(appendonly=True) as redis_server:
        yield redis_server


@pytest.fixture(scope="module")
def env(server: RedisServer) -> dict[str, str]:
    return supervision_env(f"{server.url}/0", f"{server.url}/1")


def supervision_env(broker_url: str, state_url: str) -> dict[str, str]:
    """The fleet's environment: short leases, one unit per message (test_cluster_supervision reuses it)."""
    return fleet_env(broker_url, state_url, "tests.run_trees", TASKTREE_LEASE_TTL=str(TTL),
                     TASKTREE_BATCH_SIZE="1", TASKTREE_REDIS_OUTAGE_LIMIT="4", TASKTREE_LLM_BATCH_MAX_WAIT_S="0.5",
                     TASKTREE_LLM_BATCH_POLL_S="0.2", TASKTREE_LLM_BATCH_LEASE_S=str(TTL))


@pytest.fixture
def fleet(env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A rescuer serving units and runs; tests start their victims with `spawn` (all stopped by PID)."""
    settings = fleet_settings(env, lease_ttl=TTL, batch_size=1, redis_outage_limit=4.0)
    app = create_app(settings)
    started: list[WorkerProcess] = []

    def spawn_all(names: tuple[str, ...], queues: str = "tasktree,tasktree.runs", prefetch: int = 1,
                  concurrency: int = 32) -> dict[str, WorkerProcess]:
        """Workers started together (their boots overlap), returned once every one answers."""
        workers = {name: WorkerProcess(name, {**env, "TASKTREE_PREFETCH_MULTIPLIER": str(prefetch)}, queues=queues,
                                       concurrency=concurrency) for name in names}
        started.extend(worker.start() for worker in workers.values())
        wait_until_ready(app, list(workers.values()))
        return workers

    def spawn(name: str, **options: Any) -> WorkerProcess:
        return spawn_all((name,), **options)[name]

    try:
        yield {"app": app, "settings": settings, "spawn": spawn, "spawn_all": spawn_all, "workers": started}
    finally:
        stop_workers(started)


@pytest.fixture
async def client(fleet: dict[str, Any]) -> AsyncIterator[RunClient]:
    client = RunClient(fleet["app"])
    try:
        yield client
    finally:
        await client.aclose()


async def _owned_by(client: RunClient, prefix: str, at_least: int) -> int:
    redis = client._store().redis
    owners = [await redis.get(name) async for name in redis.scan_iter(match=keys.owner("*", "*"))]
    count = sum(1 for owner in owners if owner and owner.decode().startswith(prefix))
    return count if count >= at_least else 0


def kill(worker: WorkerProcess) -> None:
    assert worker.process is not None
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait(10)


async def test_a_killed_worker_with_prefetched_and_running_units_loses_nothing(
    fleet: dict[str, Any], client: RunClient
) -> None:
    """Three times: a worker holding running and prefetched (received, not started) units is killed; another
    worker gets them within the heartbeat TTL and every run completes with every result."""
    fleet["spawn"]("rescuer", concurrency=64)
    for round_ in range(3):
        victim = fleet["spawn"](f"victim{round_}", queues="tasktree", prefetch=4, concurrency=4)
        run = await client.asubmit(R.NapsTree, R.Naps(seconds=0.5, count=60))
        await eventually(lambda v=victim: _owned_by(client, v.name, 8), f"{victim.name} holding 8 units", within=20)
        killed_at = time.monotonic()
        kill(victim)
        result = await run.aresult(timeout=40)
        assert result.status is Status.OK, (await run.astatus()).error
        assert (await run.ablackboard()).results == ["rested"] * 60
        assert time.monotonic() - killed_at < TTL + 10
        trace = await run.atrace()
        gather = trace["children"]["Tree(RunNaps)"]["children"]["Sequence"]["children"]["Gather"]["children"]
        lost = [c for c in gather.values() if c["attributes"].get("lost_workers")]
        assert len(lost) >= 8 and all(victim.name in str(c["attributes"]["lost_workers"]) for c in lost)
        assert all(c["attributes"]["dispatches"] == 2 for c in lost)
    assert all(w.process is not None and w.process.poll() is None for w in fleet["workers"] if w.name == "rescuer")


async def test_runs_waiting_in_pool_threads_never_take_every_thread_their_units_need(
    fleet: dict[str, Any], client: RunClient
) -> None:
    """One worker with 2 pool threads and 16 coordinator slots: 6 runs submitted at once. A `tasktree.coordinate`
    task waits in its thread for its run only while half the pool is left for units; the others return at once and
    their runs go on all the same (otherwise the two threads wait for runs whose units never get a thread)."""
    fleet["spawn"]("narrow", concurrency=2)
    runs = [await client.asubmit(R.NapsTree, R.Naps(seconds=0.1, count=2)) for _ in range(6)]
    for run in runs:
        assert (await run.aresult(timeout=60)).status is Status.OK, (await run.astatus()).error
        assert (await run.ablackboard()).results == ["rested"] * 2


async def _holds_a_slot(client: RunClient, prefix: str) -> bool:
    """Whether a unit owned by a process named `prefix`... holds a fan-out slot (distributed.gates)."""
    redis = client._store().redis
    async for gate in redis.scan_iter(match=keys.gate("*", "*")):
        run_id = gate.decode().split("{", 1)[1].split("}", 1)[0]
        for execution_id in await redis.smembers(gate):
            owner = await redis.get(keys.owner(run_id, execution_id.decode()))
            if owner and owner.decode().startswith(prefix):
                return True
    return False


async def test_a_worker_killed_holding_fan_out_slots_loses_none_of_them(
    fleet: dict[str, Any], client: RunClient
) -> None:
    """A fan-out of 40 units with a limit of 8 (8 more wait on the workers for a slot): the worker killed holds
    slots; its units are sent again, find their slots held, and the run completes with every slot given back."""
    fleet["spawn"]("rescuer", concurrency=64)
    victim = fleet["spawn"]("victim", queues="tasktree", prefetch=4, concurrency=4)
    run = await client.asubmit(R.GatedNapsTree, R.Naps(seconds=0.5, count=40))
    await eventually(lambda: _holds_a_slot(client, victim.name), f"{victim.name} holding a slot", within=20)
    kill(victim)
    result = await run.aresult(timeout=60)
    assert result.status is Status.OK, (await run.astatus()).error
    assert (await run.ablackboard()).results == ["rested"] * 40
    redis = client._store().redis
    assert [gate async for gate in redis.scan_iter(match=keys.gate("*", "*"))] == []  # no slot left taken
    trace = await run.atrace()
    gather = trace["children"]["Tree(RunGatedNaps)"]["children"]["Sequence"]["children"]["Gather"]["children"]
    assert any(victim.name in str(c["attributes"].get("lost_workers")) for c in gather.values())


async def test_a_killed_coordinator_is_replaced_and_no_finished_llm_call_is_repeated(
    fleet: dict[str, Any], client: RunClient, fake_llm: ThreadedFakeLLM
) -> None:
    """The process coordinating an LLM batch is killed: the other takes the run over by replay; every recorded
    call is applied from its record (made once), only those running on the killed process run again."""
    workers = fleet["spawn_all"](("coordA", "coordB"), concurrency=64)
    fake_llm.set_latency(200)
    board = R.Batch(base_url=fake_llm.base_url, texts=[f"doc{i}" for i in range(300)])
    reference = await client.asubmit(R.BatchTree, board)  # an uninterrupted run, for comparison
    assert (await reference.aresult(timeout=60)).status is Status.OK
    fake_llm.reset()
    run = await client.asubmit(R.BatchTree, board)
    coordinator = await eventually(lambda: _coordinator(client, run.id), "a coordinator", within=20)
    victim = next(w for name, w in workers.items() if coordinator.startswith(name + "@"))
    survivor = next(w for w in workers.values() if w is not victim)
    await eventually(lambda: _calls_at_least(fake_llm, 60), "60 LLM calls", within=30)
    kill(victim)
    running_on_victim = await _owned_by(client, victim.name, 0)
    killed_at = time.monotonic()
    result = await run.aresult(timeout=90)
    assert result.status is Status.OK
    assert time.monotonic() - killed_at < TTL + 15
    status = await run.astatus()
    assert status.attempt == 0 and status.state is RunState.SUCCEEDED
    assert status.coordinator is None
    assert (await run.ablackboard()).answers == (await reference.ablackboard()).answers
    texts = [body["messages"][-1]["content"] for body in fake_llm.requests]
    repeated = {text for text in texts if texts.count(text) > 1}
    assert len(set(texts)) == 300 and len(repeated) <= running_on_victim  # only what ran on the victim again
    assert _shape(await run.atrace()) == _shape(await reference.atrace())
    events = [e async for e in run.events(follow=False) if e.type == "state"]
    resumed = [e for e in events if e.data.get("resumed_from", "").startswith(victim.name + "@")]
    assert resumed and resumed[0].data["coordinator"].startswith(survivor.name + "@")
    assert survivor.process is not None and survivor.process.poll() is None


async def test_a_coordinator_killed_while_its_runs_batch_is_out_is_replaced_and_nothing_is_paid_twice(
    fleet: dict[str, Any], client: RunClient, fake_llm: ThreadedFakeLLM
) -> None:
    """Batch mode: the process coordinating the run (and running some of its units) dies while the batch is at the
    provider; the other takes the run over, its units wait for the same batch: one batch, no live call."""
    workers = fleet["spawn_all"](("coordA", "coordB"), concurrency=64)
    fake_llm.batches.configure(delay_s=4)
    board = R.Batch(base_url=fake_llm.base_url, texts=[f"doc{i}" for i in range(20)])
    run = await client.asubmit(R.BatchModeTree, board)
    coordinator = await eventually(lambda: _coordinator(client, run.id), "a coordinator", within=20)
    victim = next(w for name, w in workers.items() if coordinator.startswith(name + "@"))
    await eventually(lambda: _batch_total(fake_llm, 20), "the 20 calls in batches at the provider", within=30)
    kill(victim)
    result = await run.aresult(timeout=90)
    assert result.status is Status.OK
    assert (await run.ablackboard()).answers == [f"summary of doc{i}" for i in range(20)]
    assert sum(b["request_counts"]["total"] for b in fake_llm.batches.batches.values()) == 20  # each call once
    assert fake_llm.calls == 0  # nothing went live
    status = await run.astatus()
    assert status.coordinator is None and status.state is RunState.SUCCEEDED


async def _batch_total(llm: ThreadedFakeLLM, n: int) -> bool:
    return sum(b["request_counts"]["total"] for b in llm.batches.batches.values()) >= n


async def _coordinator(client: RunClient, run_id: str) -> str | None:
    return (await client.astatus(run_id)).coordinator


async def _calls_at_least(llm: ThreadedFakeLLM, n: int) -> bool:
    return llm.calls >= n


def _shape(trace: dict[str, Any]) -> Any:
    """A trace without timings, workers and ids: names, kinds, statuses and data, recursively."""
    result = trace.get("result") or {}
    return (trace["name"], trace["kind"], result.get("status"), result.get("data"),
            [_shape(child) for child in trace["children"].values()])


async def test_redis_restarting_mid_run_costs_no_process_and_the_run_completes(
    fleet: dict[str, Any], client: RunClient, server: RedisServer
) -> None:
    workers = list(fleet["spawn_all"](("steady1", "steady2")).values())
    run = await client.asubmit(R.NapsTree, R.Naps(seconds=0.2, count=100))
    await eventually(lambda: _owned_by(client, "steady", 5), "units running", within=20)
    server.stop(keep_data=True)
    await asyncio.sleep(2.0)  # the outage itself (shorter than TASKTREE_REDIS_OUTAGE_LIMIT=4), not a wait for state
    server.start()
    await client.aclose()  # the test's own client reconnects on next use
    result = await run.aresult(timeout=60)
    assert result.status is Status.OK and (await run.ablackboard()).results == ["rested"] * 100
    assert all(w.process is not None and w.process.poll() is None for w in workers)


async def test_redis_away_longer_than_the_limit_fails_the_run_clearly(
    fleet: dict[str, Any], server: RedisServer
) -> None:
    fleet["spawn"]("outage1", queues="tasktree")
    executor = CeleryExecutor(fleet["app"], settings=fleet["settings"])
    context = Context(executor=executor)
    try:
        async with context.using_blackboard(R.Naps(seconds=0.3, count=40)):
            run = asyncio.ensure_future(R.NapsTree(context))
            await eventually(lambda: _executor_busy(executor), "units in flight", within=20)
            server.stop(keep_data=True)
            stopped_at = time.monotonic()
            result = await asyncio.wait_for(run, 30)
            assert time.monotonic() - stopped_at < 4 + 5  # the limit, plus a watch period or two
            server.start()
    finally:
        if server.process is None:
            server.start()
        await executor.aclose()
    assert result.status is Status.FAIL
    with RunClient(fleet["app"]) as client:
        status = await eventually(lambda: _failed(client, context.run_id), "the failure recorded", within=20)
    # whichever noticed first (a Redis call or the broker giving up, or the run's watcher), the error names what
    # was unreachable and its setting
    message = status.error.message
    assert "unreachable" in message or "cannot" in message, status.error
    assert "TASKTREE_REDIS" in message or "TASKTREE_BROKER_URL" in message, status.error
    assert all(w.process is not None and w.process.poll() is None for w in fleet["workers"])


async def _executor_busy(executor: CeleryExecutor) -> bool:
    return len(executor._dispatcher().inflight) > 0


async def _failed(client: RunClient, run_id: str | None) -> Any:
    status = await asyncio.to_thread(client.status, run_id)
    return status if status.state is RunState.FAILED else None


async def test_an_inline_run_whose_process_dies_fails_clearly_and_resumes_in_the_fleet_on_retry(
    fleet: dict[str, Any], client: RunClient, env: dict[str, str]
) -> None:
    """`await tree(context)` in an app that is then killed: the fleet marks its run failed (naming the dead
    process) within the heartbeat TTL, and `retry()` finishes it in the fleet, reusing what was recorded."""
    import subprocess
    import sys

    from tasktree_dist.testing.fleet import REPO_ROOT

    fleet["spawn"]("keeper", concurrency=64)
    code = """
import asyncio, sys
from tasktree_dist import Context
from tasktree_dist.distributed import CeleryExecutor, create_app
from tests import run_trees as R

async def main():
    context = Context(executor=CeleryExecutor(create_app()))
    async with context.using_blackboard(R.Naps(seconds=0.3, count=40)):
        task = asyncio.ensure_future(R.NapsTree(context))
        while context.run_id is None:
            await asyncio.sleep(0.01)
        print(context.run_id, flush=True)
        await task

asyncio.run(main())
"""
    app = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=REPO_ROOT, env=env,
                                               stdout=subprocess.PIPE)
    try:
        assert app.stdout is not None
        run_id = (await asyncio.wait_for(app.stdout.readline(), 30)).decode().strip()
        await eventually(lambda: _units_done(client, run_id, 8), "some units recorded", within=30)
        app.kill()
        await asyncio.wait_for(app.wait(), 10)
    finally:
        if app.returncode is None:
            app.kill()
    status = await eventually(lambda: _failed(client, run_id), "the run marked failed", within=TTL + 10)
    assert "died" in status.error.message and "retry" in status.error.message
    run = await client.aretry(run_id)
    result = await run.aresult(timeout=60)
    assert result.status is Status.OK and (await run.ablackboard()).results == ["rested"] * 40


async def _units_done(client: RunClient, run_id: str, n: int) -> bool:
    from tasktree_dist import RunNotFoundError

    try:
        return (await client.astatus(run_id)).progress.done >= n
    except RunNotFoundError:  # the app prints the id a moment before it records the run
        return False
