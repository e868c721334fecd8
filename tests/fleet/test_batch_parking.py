"""Batch mode parks runs, on real processes: a private redis-server, two `celery -A worker worker` processes serving
units and the runs queue (tests.batch_trees), and the fake OpenAI-compatible server's Batch API over HTTP.

While a run's calls are in a batch the run is `waiting` on waits named `batch:<custom id>`, no coordinator holds
it and no worker runs any of its units; when the batch is read the run resumes and applies the answers as a live
call's (the tool and the step after the LLM run once, after the batch). The fake server's batches stay out until
the test says so (`due_now`), so nothing here depends on timing."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest

from tasktree_dist import RunClient, RunState, SignalError
from tasktree_dist.distributed import keys
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tasktree_dist.testing.fleet import wait_until_ready
from tests.helpers import eventually, two_workers

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def fake() -> Iterator[ThreadedFakeLLM]:
    with ThreadedFakeLLM() as server:
        yield server


@pytest.fixture(scope="module")
def park_fleet(redis_url: str, fake: ThreadedFakeLLM) -> Iterator[dict[str, Any]]:
    """Two workers serving units and runs (databases 14 and 15), stopped by PID."""
    with two_workers(redis_url, (14, 15), "tests.batch_trees", "batchpark", concurrency=8, flush=True,
                     BATCH_FAKE_URL=fake.base_url, TASKTREE_LEASE_TTL="3", TASKTREE_LLM_BATCH_MAX_WAIT_S="0.5",
                     TASKTREE_LLM_BATCH_POLL_S="0.1", TASKTREE_LLM_BATCH_LEASE_S="2") as fleet:
        yield fleet


@pytest.fixture
async def client(park_fleet: dict[str, Any], fake: ThreadedFakeLLM) -> AsyncIterator[RunClient]:
    fake.reset()
    fake.batches.configure(delay_s=3600)  # out until the test calls due_now()
    client = RunClient(park_fleet["app"])
    try:
        yield client
    finally:
        await client.aclose()


async def ran(client: RunClient, key: str, step: str) -> int:
    return int(await client._store().redis.get(f"batchpark:ran:{key}:{step}") or 0)


async def units_running(client: RunClient) -> int:
    """Units running on the fleet's workers now, as their heartbeats report them."""
    redis = client._store().redis
    processes = [p.decode() for p in await redis.zrange(keys.PROCESSES, 0, -1)]
    infos = [orjson.loads(raw) for raw in await redis.mget([keys.process_info(p) for p in processes]) if raw]
    return sum(int(info.get("running") or 0) for info in infos if info.get("role") == "worker")


async def parked_on_batches(client: RunClient, run_id: str, calls: int) -> bool:
    """The run is `waiting`, held by no coordinator, on `calls` waits named after its batched calls, and no worker
    runs a unit (no slot held while the batch is out)."""
    status = await client.astatus(run_id)
    if status.state != RunState.WAITING or status.coordinator is not None:
        return False
    waits = await client.awaits(run_id)
    return (len(waits) == calls and all(w.name.startswith("batch:tt-") for w in waits)
            and await units_running(client) == 0)


async def submitted(fake: ThreadedFakeLLM) -> None:
    """The pending batch goes after TASKTREE_LLM_BATCH_MAX_WAIT_S (its run may park before that)."""
    await eventually(lambda: _true(bool(fake.batches.batches)), "the batch at the provider", within=30)


def one_batch(fake: ThreadedFakeLLM, total: int) -> dict[str, Any]:
    [batch] = fake.batches.batches.values()  # every call in one batch, each once
    assert batch["request_counts"]["total"] == total
    return batch


async def test_a_run_parks_while_its_batch_is_out_and_resumes_applying_the_answers(
    client: RunClient, fake: ThreadedFakeLLM
) -> None:
    from tests import batch_trees as B

    run = await client.asubmit("BatchParkGather", B.Items(key="done", n=6, tool=True))
    await eventually(lambda: parked_on_batches(client, run.id, 6), "the run parked on its 6 calls", within=60)
    await submitted(fake)
    batch = one_batch(fake, 6)
    assert batch["status"] == "in_progress" and batch["metadata"]["tasktree_seal"]
    for i in range(6):  # the unit ended before its tool and the step after the LLM
        assert await ran(client, f"done:{i}", "tool") == 0 and await ran(client, f"done:{i}", "after") == 0
    wait = (await client.awaits(run.id))[0]
    assert wait.prompt == {"batched_call": wait.name.removeprefix("batch:")}
    with pytest.raises(SignalError, match="batched LLM call's wait; its batch answers it"):
        await run.asignal(wait.name, {})  # a person cannot answer it (the call would go live while it runs)
    assert fake.batches.due_now() == 1
    result = await run.aresult(timeout=60)
    assert result.is_ok(), (await run.astatus()).error
    final = await run.ablackboard()
    assert final.outputs == ["", "answer 1", "", "answer 3", "", "answer 5"]  # tool calls: no text
    for i in range(6):  # each once, in the continuation
        assert await ran(client, f"done:{i}", "tool") == (1 if i % 2 == 0 else 0)
        assert await ran(client, f"done:{i}", "after") == 1
    assert fake.calls == 0  # nothing went live
    status = await run.astatus()
    trace = await run.atrace()
    llm = [n for n in _walk(trace) if n.get("kind") == "LLM"]
    assert len(llm) == 6 and {n["attributes"]["batch"] for n in llm} == {"answered"}
    assert {n["attributes"]["batch_id"] for n in llm} == {batch["id"]}
    half = sum(n["attributes"]["prompt_tokens"] * 1.0 + n["attributes"]["completion_tokens"] * 2.0 for n in llm) / 2e6
    assert status.cost_usd == pytest.approx(half) and half > 0  # the batch's half price
    events = [e async for e in client.aevents(run.id, follow=False)]
    states = [e.data.get("state") for e in events if e.type == "state"]
    assert "waiting" in states and states[-1] == "succeeded"


@pytest.mark.parametrize(("configure", "live"), [({"error_share": 0.5}, 2), ({"outcome": "expired"}, 2)],
                         ids=["partially-errored", "expired"])
async def test_what_the_batch_did_not_answer_goes_live_after_the_run_resumes(
    client: RunClient, fake: ThreadedFakeLLM, configure: dict[str, Any], live: int
) -> None:
    from tests import batch_trees as B

    fake.batches.configure(**configure)
    run = await client.asubmit("BatchParkGather", B.Items(key=f"miss-{live}-{len(configure)}", n=4))
    await eventually(lambda: parked_on_batches(client, run.id, 4), "the run parked on its 4 calls", within=60)
    assert fake.calls == 0
    await submitted(fake)
    fake.batches.due_now()
    result = await run.aresult(timeout=60)
    assert result.is_ok(), (await run.astatus()).error
    assert (await run.ablackboard()).outputs == [f"answer {i}" for i in range(4)]
    assert fake.calls_per_model.get("park-batch") == live  # each unanswered one live, once
    trace = await run.atrace()
    verdicts = sorted(n["attributes"]["batch"] for n in _walk(trace) if n.get("kind") == "LLM")
    assert verdicts == ["answered", "answered", "fallback", "fallback"]


@contextlib.contextmanager
def killed(fleet: dict[str, Any], worker: Any) -> Iterator[None]:
    """`worker` killed (SIGKILL, reaped) for the block, then started again and ready, even if the block fails."""
    try:
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(10)
        yield
    finally:
        worker.start()
        wait_until_ready(fleet["app"], [worker])


async def test_a_worker_killed_while_the_batch_is_out_the_run_resumes_on_the_other(
    client: RunClient, fake: ThreadedFakeLLM, park_fleet: dict[str, Any]
) -> None:
    from tests import batch_trees as B

    run = await client.asubmit("BatchParkGather", B.Items(key="killw", n=6))
    await eventually(lambda: parked_on_batches(client, run.id, 6), "the run parked on its 6 calls", within=60)
    with killed(park_fleet, park_fleet["workers"][0]):
        await submitted(fake)
        fake.batches.due_now()
        result = await run.aresult(timeout=90)
    assert result.is_ok(), (await run.astatus()).error
    assert (await run.ablackboard()).outputs == [f"answer {i}" for i in range(6)]
    one_batch(fake, 6)
    assert fake.calls == 0  # no call paid twice
    for i in range(6):
        assert await ran(client, f"killw:{i}", "after") == 1


async def test_a_coordinator_killed_while_the_batch_is_out_another_resumes_and_the_run_parks(
    client: RunClient, fake: ThreadedFakeLLM, park_fleet: dict[str, Any]
) -> None:
    """The Held tree keeps the run live (a branch waits for the test) while its batch is out, so its coordinator
    holds it; that process is killed, another takes the run over by replay, and once the branch is let go the run
    parks on the batch and finishes when it is read."""
    from tests import batch_trees as B

    run = await client.asubmit("BatchParkHeld", B.Items(key="killc", n=4))
    await eventually(lambda: _true(len(fake.batches.batches) == 1), "the batch at the provider", within=60)
    status = await client.astatus(run.id)
    assert status.state == RunState.RUNNING and status.coordinator
    redis = client._store().redis
    pid = orjson.loads(await redis.get(keys.process_info(status.coordinator)))["pid"]
    [doomed] = [w for w in park_fleet["workers"] if w.process is not None and w.process.pid == pid]
    with killed(park_fleet, doomed):
        await eventually(lambda: _taken_over(client, run.id, status.coordinator), "another coordinator took it",
                         within=60)
        await redis.set("batchpark:go:killc", 1, ex=600)
        await eventually(lambda: parked_on_batches(client, run.id, 4), "the run parked on its 4 calls", within=60)
        fake.batches.due_now()
        result = await run.aresult(timeout=90)
    assert result.is_ok(), (await run.astatus()).error
    assert (await run.ablackboard()).outputs == [f"answer {i}" for i in range(4)]
    one_batch(fake, 4)
    assert fake.calls == 0
    for i in range(4):
        assert await ran(client, f"killc:{i}", "after") == 1


async def _taken_over(client: RunClient, run_id: str, dead: str) -> bool:
    status = await client.astatus(run_id)
    return status.state != RunState.RUNNING or (status.coordinator is not None and status.coordinator != dead)


async def _true(value: bool) -> bool:
    return value


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        children = current.get("children")
        stack.extend(children.values() if isinstance(children, dict) else children or [])
