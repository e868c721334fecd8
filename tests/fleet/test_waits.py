"""Durable waits on real processes: a private redis-server and two `celery -A worker worker` processes serving
units and coordinators. A run parks (state `waiting`, no coordinator holds it), resumes by replay on a signal or
a deadline, and nothing that finished runs again; bad signals are refused with nothing recorded."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tasktree_dist import Context, RunClient, RunNotFoundError, RunState, SignalError, Status
from tasktree_dist.distributed import CeleryExecutor, keys
from tasktree_dist.testing.fleet import stop_workers, wait_until_ready
from tests import wait_trees as W
from tests.helpers import eventually, two_workers
from tests.ops_fleet import tasktree

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def waits_fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    """Two workers serving units and the runs queue (own Redis databases), stopped by PID."""
    with two_workers(redis_url, (6, 7), "tests.wait_trees", "waits", concurrency=16, TASKTREE_LEASE_TTL="3") as fleet:
        yield fleet


@pytest.fixture
async def client(waits_fleet: dict[str, Any]) -> AsyncIterator[RunClient]:
    client = RunClient(waits_fleet["app"])
    try:
        yield client
    finally:
        await client.aclose()


async def ran(client: RunClient, key: str, step: str) -> int:
    return int(await client._store().redis.get(f"waitstest:ran:{key}:{step}") or 0)


async def parked(client: RunClient, run_id: str, waits: int = 1) -> bool:
    status = await client.astatus(run_id)
    return status.state == RunState.WAITING and len(await client.awaits(run_id)) == waits


def restart(waits_fleet: dict[str, Any]) -> None:
    """Stop every worker (warm shutdown, by PID) and start them again: nothing of a parked run is in a process."""
    stop_workers(waits_fleet["workers"])
    for worker in waits_fleet["workers"]:
        worker.start()
    wait_until_ready(waits_fleet["app"], waits_fleet["workers"])


async def test_a_run_parks_releases_its_slot_and_resumes_on_its_signal(client: RunClient) -> None:
    run = await client.asubmit("WaitReview", W.Doc(key="park1"))
    await eventually(lambda: parked(client, run.id), "the run parks on its review")
    status = await client.astatus(run.id)
    assert status.coordinator is None  # nobody holds it
    (wait,) = await client.awaits(run.id)
    assert (wait.name, wait.node, wait.prompt) == ("review", "WaitReview/Sequence/WaitFor(review)",
                                                     "Publish 'draft of park1'?")
    assert wait.schema["properties"]["decision"]["enum"] == ["approve", "reject"]
    assert wait.deadline is None and wait.since.timestamp() <= time.time()
    listed = await client.alist(state="waiting")
    assert run.id in [s.id for s in listed]

    assert await run.asignal("review", {"decision": "approve", "note": "ship it"}, signal_id="r1")
    result = await run.aresult(timeout=30)
    assert result.status == Status.OK
    final = await run.ablackboard()
    assert (final.decision, final.note, final.draft) == ("approve", "ship it", "draft of park1")
    assert await ran(client, "park1", "draft") == 1 and await ran(client, "park1", "publish") == 1
    with pytest.raises(SignalError, match="succeeded: a finished run takes no signals"):
        await run.asignal("review", {"decision": "approve"})
    events = [e async for e in client.aevents(run.id, follow=False)]
    states = [e.data.get("state") for e in events if e.type in ("state", "wait")]
    assert states.index("reached") < states.index("waiting") < states.index("signalled") < states.index("succeeded")
    trace = await run.atrace()
    node = trace_node(trace, "WaitFor(review)")
    assert node["attributes"]["signal_id"] == "r1" and "ship it" in node["attributes"]["payload"]
    assert node["attributes"]["waited_ms"] > 0


def trace_node(trace: dict[str, Any], name: str) -> dict[str, Any]:
    stack = [trace]
    while stack:
        node = stack.pop()
        if node.get("name") == name:
            return node
        stack.extend(node.get("children", {}).values() if isinstance(node.get("children"), dict)
                     else node.get("children") or [])
    raise AssertionError(f"no {name} in the trace")


async def test_bad_signals_are_refused_with_nothing_recorded(client: RunClient) -> None:
    run = await client.asubmit("WaitReview", W.Doc(key="bad1"))
    await eventually(lambda: parked(client, run.id), "the run parks")
    before = await client._store().redis.hgetall(keys.waits(run.id))
    with pytest.raises(SignalError, match=r"decision: Input should be 'approve' or 'reject'"):
        await run.asignal("review", {"decision": "maybe"})
    with pytest.raises(SignalError, match="has no WaitFor named 'nope'"):
        await run.asignal("nope", {})
    with pytest.raises(SignalError, match="no run 'missing-run'"):
        await client.asignal("missing-run", "review", {"decision": "approve"})
    with pytest.raises(SignalError, match="wait name must be a non-empty string"):
        await run.asignal("", {})
    assert await client._store().redis.hgetall(keys.waits(run.id)) == before
    assert (await client.astatus(run.id)).state == RunState.WAITING
    assert await run.asignal("review", {"decision": "reject"}, signal_id="once")
    assert not await run.asignal("review", {"decision": "approve"}, signal_id="once")  # recorded once
    assert (await run.aresult(timeout=30)).is_ok()
    assert (await run.ablackboard()).decision == "reject"


async def test_an_early_signal_is_kept_until_its_wait_is_reached(client: RunClient) -> None:
    run = await client.asubmit("WaitReview", W.Doc(key="early1"), run_id=f"early-{time.time_ns()}")
    assert await run.asignal("review", {"decision": "approve", "note": "early"})
    assert (await run.aresult(timeout=30)).is_ok()
    assert (await run.ablackboard()).note == "early"
    assert await ran(client, "early1", "draft") == 1


async def test_timeouts_with_and_without_default(client: RunClient) -> None:
    started = time.time()
    with_default = await client.asubmit("WaitTimeoutDefault", W.Timed(key="t1"))
    without = await client.asubmit("WaitTimeoutFail", W.Timed(key="t2"))
    result = await with_default.aresult(timeout=30)
    assert result.is_ok() and (await with_default.ablackboard()).got == "fallback"
    failed = await without.aresult(timeout=30)
    assert failed.status == Status.FAIL
    status = await without.astatus()
    assert "wait 'never' timed out: no signal by its deadline" in status.error.message
    assert time.time() - started >= 1.5


async def test_all_workers_restarted_while_parked_the_run_completes(
    client: RunClient, waits_fleet: dict[str, Any]
) -> None:
    run = await client.asubmit("WaitReview", W.Doc(key="restart1"))
    await eventually(lambda: parked(client, run.id), "the run parks")
    restart(waits_fleet)
    assert (await client.astatus(run.id)).state == RunState.WAITING
    assert await run.asignal("review", {"decision": "approve"})
    assert (await run.aresult(timeout=60)).is_ok()
    assert await ran(client, "restart1", "draft") == 1 and await ran(client, "restart1", "publish") == 1


async def test_a_gather_of_20_waits_half_signalled_before_a_restart(
    client: RunClient, waits_fleet: dict[str, Any]
) -> None:
    run = await client.asubmit("WaitGather", W.Many(key="g1", n=20))
    await eventually(lambda: parked(client, run.id, waits=20), "20 waits pending", within=60)
    names = sorted(w.name for w in await client.awaits(run.id))
    assert names == sorted(f"item:{i}" for i in range(20))
    for i in range(10):
        assert await run.asignal(f"item:{i}", {"answer": f"a{i}"})
    await eventually(lambda: parked(client, run.id, waits=10), "parked again on the other 10", within=60)
    restart(waits_fleet)
    for i in range(10, 20):
        assert await run.asignal(f"item:{i}", {"answer": f"a{i}"})
    result = await run.aresult(timeout=60)
    assert result.is_ok(), (await run.astatus()).error
    for i in range(20):
        assert await ran(client, f"g1:{i}", "prepare") == 1
        assert await ran(client, f"g1:{i}", "finish") == 1


async def test_a_loop_waits_again_each_iteration(client: RunClient) -> None:
    run = await client.asubmit("WaitLoop", W.Chat(key="loop1"))
    for turn in range(3):
        await eventually(lambda: parked(client, run.id), f"parked on turn {turn}")
        (wait,) = await client.awaits(run.id)
        assert wait.prompt == f"turn {turn}"
        assert await run.asignal("answer", f"answer {turn}")
        if turn < 2:
            await eventually(lambda t=turn: _asked(client, t + 1), f"turn {turn + 1} asked")
    assert (await run.aresult(timeout=30)).is_ok()
    assert (await run.ablackboard()).answers == ["answer 0", "answer 1", "answer 2"]
    for turn in range(3):
        assert await ran(client, f"loop1:{turn}", "ask") == 1


async def _asked(client: RunClient, turn: int) -> bool:
    return await ran(client, f"loop1:{turn}", "ask") >= 1


async def test_every_key_a_parked_run_writes_has_a_ttl(client: RunClient, waits_fleet: dict[str, Any]) -> None:
    run = await client.asubmit("WaitTimeoutDefault", W.Timed(key="ttl1"))
    await eventually(lambda: parked(client, run.id), "the run parks")
    redis = client._store().redis
    names = [name async for name in redis.scan_iter(match=f"*{run.id}*")] + [keys.WAITS_DUE.encode()]
    ttls = {name: await redis.ttl(name) for name in names}
    assert keys.waits(run.id).encode() in ttls
    assert not [name for name, ttl in ttls.items() if ttl == -1], ttls
    await run.aresult(timeout=30)
    await asyncio.sleep(0)


async def test_a_parked_run_holds_its_events_and_trace_in_what_they_need(client: RunClient) -> None:
    """Parked (and later kept) for days: its events stream is rewritten to its entries (Redis gives a new stream
    a 4 KB node and never shrinks it) and its trace is stored deflated; both read back whole."""
    from tasktree_dist.distributed import record_codec

    run = await client.asubmit("WaitReview", W.Doc(key="small1"))
    await eventually(lambda: parked(client, run.id), "the run parks")
    redis = client._store().redis
    events = keys.events(run.id)
    before = [e async for e in client.aevents(run.id, follow=False)]
    assert before and 0 < await redis.ttl(events)
    assert await redis.memory_usage(events, samples=0) < 2048  # 4.7 KB as the stream was written
    stored = await redis.get(keys.trace(run.id))
    assert stored[:1] == record_codec.TAG_V1 and trace_node(await run.atrace(), "WaitFor(review)")
    assert await run.asignal("review", {"decision": "approve"})
    assert (await run.aresult(timeout=30)).status == Status.OK
    after = [e async for e in client.aevents(run.id, follow=False)]
    assert [e.id for e in after[:len(before)]] == [e.id for e in before] and len(after) > len(before)
    assert await redis.memory_usage(events, samples=0) < 4096 and 0 < await redis.ttl(events)  # rewritten at the end


async def test_a_branch_that_is_not_waiting_keeps_running_and_the_run_parks_after_it(client: RunClient) -> None:
    run = await client.asubmit("WaitParallel", W.Par(key="par1"))
    await eventually(lambda: _reached(client, run.id), "the wait is reached")
    assert (await client.astatus(run.id)).state == RunState.RUNNING  # the other branch is still working
    assert await ran(client, "par1", "slow") == 0
    await eventually(lambda: parked(client, run.id), "parked once the other branch is done")
    assert await ran(client, "par1", "slow") == 1
    assert await run.asignal("go", True)
    assert (await run.aresult(timeout=30)).is_ok()
    assert (await run.ablackboard()).slow_done and await ran(client, "par1", "slow") == 1


async def _reached(client: RunClient, run_id: str) -> bool:
    try:
        return len(await client.awaits(run_id)) == 1
    except RunNotFoundError:  # an inline run's record is written as its tree starts
        return False


async def test_the_command_line_lists_waits_and_signals(client: RunClient, waits_fleet: dict[str, Any],
                                                        tmp_path: Any) -> None:
    env = waits_fleet["env"]
    run = await client.asubmit("WaitReview", W.Doc(key="cli1"))
    await eventually(lambda: parked(client, run.id), "the run parks")
    listed = await asyncio.to_thread(tasktree, env, "runs", "--state", "waiting", "--json")
    assert run.id in listed.stdout, listed.stderr
    shown = await asyncio.to_thread(tasktree, env, "waits", run.id, "--json")
    assert shown.returncode == 0, shown.stderr
    (wait,) = json.loads(shown.stdout)[run.id]
    assert (wait["name"], wait["prompt"]) == ("review", "Publish 'draft of cli1'?")
    table = await asyncio.to_thread(tasktree, env, "waits")
    assert run.id in table.stdout and "decision*" in table.stdout, table.stdout
    bad = await asyncio.to_thread(tasktree, env, "signal", run.id, "review", "-d", '{"decision": "maybe"}')
    assert bad.returncode == 2 and "decision" in bad.stderr and "approve" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    unknown = await asyncio.to_thread(tasktree, env, "signal", "no-such-run", "review", "-d", "{}")
    assert unknown.returncode == 2 and "no run 'no-such-run'" in unknown.stderr
    payload = tmp_path / "review.json"
    payload.write_text('{"decision": "approve", "note": "from a file"}')
    good = await asyncio.to_thread(tasktree, env, "signal", run.id, "review", "-d", f"@{payload}", "--id", "c1")
    assert good.returncode == 0 and "recorded" in good.stdout, good.stderr
    again = await asyncio.to_thread(tasktree, env, "signal", run.id, "review", "-d", f"@{payload}", "--id", "c1")
    assert "recorded before; nothing changed" in again.stderr or "succeeded" in again.stderr
    assert (await run.aresult(timeout=30)).is_ok()
    assert (await run.ablackboard()).note == "from a file"


async def test_an_inline_run_waits_in_place_and_is_signalled_the_same_way(
    client: RunClient, waits_fleet: dict[str, Any]
) -> None:
    """`await tree(context)` with a CeleryExecutor: the caller holds the run, so it does not park; its wait is
    listed and answered through Redis all the same (the signal reaches the waiting node on the reply list)."""
    executor = CeleryExecutor(waits_fleet["app"], settings=waits_fleet["settings"])
    context = Context(executor=executor, run_id=f"inline-{time.time_ns()}")
    doc = W.Doc(key="inline1")
    try:
        async with context.using_blackboard(doc):
            task = asyncio.ensure_future(W.ReviewTree(context))
            await eventually(lambda: _reached(client, context.run_id), "the inline run's wait is reached")
            assert (await client.astatus(context.run_id)).state == RunState.RUNNING
            assert await client.asignal(context.run_id, "review", {"decision": "approve", "note": "inline"})
            result = await asyncio.wait_for(task, 30)
    finally:
        await executor.aclose()
    assert result.is_ok() and (doc.decision, doc.note) == ("approve", "inline")
    assert await ran(client, "inline1", "draft") == 1
