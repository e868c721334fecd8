"""Fan-out slot gates (distributed.gates): units sent beyond a fan-out's concurrency limit wait on the workers for a
slot, the limit holds fleet-wide, and every slot comes back. Scripts on a private redis-server; the fan-out on two
real `celery -A worker worker` processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tasktree_dist import Result
from tasktree_dist.distributed import CeleryExecutor, keys
from tasktree_dist.distributed.scripts import Outgoing, WorkerScripts
from tests import dist_trees as T
from tests.helpers import eventually
from tests.helpers import run_with_executor as run

pytestmark = pytest.mark.timeout(120)


async def test_a_gate_grants_no_more_slots_than_its_limit_and_a_held_slot_stays_held(redis_client: Any) -> None:
    scripts = WorkerScripts(redis_client)
    gate = keys.gate("r1", "g")
    assert await scripts.claim([(gate, 2, ["a", "b", "c"], 0)], 60) == [True, True, False]
    # a unit sent again (its worker died) asks first and finds its slot held; one that asked before waits
    assert await scripts.claim([(gate, 2, ["c", "a"], 1), (keys.gate("r1", "h"), 1, ["x"], 0)], 60) == [False, True,
                                                                                                          True]
    assert 0 < await redis_client.ttl(gate) <= 60
    await scripts.release(gate, "a")
    assert await scripts.claim([(gate, 2, ["c"], 1)], 60) == [True]
    assert sorted(await redis_client.smembers(gate)) == [b"b", b"c"]


async def test_a_completion_releases_its_slot_or_hands_it_on_with_its_record(redis_client: Any) -> None:
    scripts = WorkerScripts(redis_client)
    gate = keys.gate("r1", "g")
    await redis_client.hset(keys.run("r1"), "state", "running")
    assert await scripts.claim([(gate, 2, ["a", "b"], 0)], 60) == [True, True]

    def done(execution_id: str, hand_on: str = "") -> Outgoing:
        return Outgoing("r1", execution_id, "OK", b"{}", b"{}", keys.reply("c1"), gate=gate, hand_on=hand_on)

    await scripts.publish([done("a", hand_on="c")], 60, 600, 100)
    assert sorted(await redis_client.smembers(gate)) == [b"b", b"c"]
    await scripts.publish([done("b"), done("c")], 60, 600, 100)
    assert not await redis_client.exists(gate)  # every slot back: the gate is gone
    assert sorted(await redis_client.hkeys(keys.units("r1"))) == [b"a", b"b", b"c"]


@pytest.fixture
async def state(fleet: dict[str, Any]) -> AsyncIterator[Any]:
    """A client on the fleet's state Redis, without the test keys of an earlier run."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(fleet["settings"].redis_url)
    await client.delete(T.GATED_RUNNING, T.GATED_MOST, T.GATED_GO)
    try:
        yield client
    finally:
        await client.delete(T.GATED_GO)
        await client.aclose()


async def test_a_fan_out_sends_units_beyond_its_limit_and_the_workers_keep_the_limit(
    fleet: dict[str, Any], state: Any
) -> None:
    """24 units, limit 4, lookahead 1: 8 units go out before any ends, on two workers, and while every one of them
    holds on, only 4 run; the rest start on the workers as slots free up, and every slot comes back."""
    redis_client = state
    executor = CeleryExecutor(fleet["app"], settings=fleet["settings"])
    sent: list[int] = []
    publish = executor._publish
    executor._publish = lambda units: (sent.append(len(units)), publish(units))[1]  # type: ignore[method-assign]
    run_task = asyncio.create_task(run(T.GatedFan, T.Fan(count=24), executor))
    try:

        async def out(n: int) -> bool:
            return sum(sent) >= n or run_task.done()

        await eventually(lambda: out(8), "8 units out at once (limit 4 + lookahead 4)", within=30)
        assert not run_task.done() and sum(sent) == 8  # none has ended: the coordinator holds limit + lookahead
        async def running(n: int) -> bool:
            return int(await redis_client.get(T.GATED_RUNNING) or 0) == n

        await eventually(lambda: running(4), "4 units running", within=30)
        gates = [name async for name in redis_client.scan_iter(match=keys.gate("*", "*"))]
        assert len(gates) == 1 and await redis_client.scard(gates[0]) == 4
        await redis_client.set(T.GATED_GO, 1, ex=600)
        result, _ = await asyncio.wait_for(run_task, 60)
    finally:
        await redis_client.set(T.GATED_GO, 1, ex=600)  # a failed check must not leave units holding on
        if not run_task.done():
            run_task.cancel()
            await asyncio.gather(run_task, return_exceptions=True)
        await executor.aclose()
    assert result == Result.OK([f"D{i}" for i in range(24)])
    assert int(await redis_client.get(T.GATED_MOST)) == 4  # never more than the limit ran at once, fleet-wide
    assert not await redis_client.exists(gates[0])  # every slot came back
