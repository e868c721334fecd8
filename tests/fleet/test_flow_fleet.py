"""LLM flow control across a fleet: two real `celery -A worker worker` processes share limits, pauses, concurrency
slots and budgets through Redis (databases 12 and 13), against the fake LLM server limiting a TPM and an RPM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from broker_config import TasktreeSettings
from tasktree_dist import Budget, Context, LLMBudgetExceeded, LLMModel, LLMRunRecord, Tree
from tasktree_dist.core.redis_client import connect
from tasktree_dist.distributed import CeleryExecutor, create_app
from tasktree_dist.llm import limits
from tasktree_dist.llm.limiter import budget_key, close_limiters
from tasktree_dist.llm.limits import KEY_PREFIX
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tasktree_dist.testing.fleet import (
    WorkerProcess,
    fleet_env,
    fleet_settings,
    running_workers,
    stop_workers,
    wait_until_ready,
)
from tests.helpers import eventually, redis_db

pytestmark = pytest.mark.timeout(120)

LEASE_S = 3.0  # short, for the dead worker test; long enough that a loaded machine renews in time
MARGIN_S = 0.1
QUEUE = "flow"


@pytest.fixture(scope="module")
def fake(flow_fake: ThreadedFakeLLM) -> ThreadedFakeLLM:
    """The session's flow fake server: tests.flow_trees binds its URL once, at import (test_cluster_flow too)."""
    return flow_fake


@pytest.fixture(scope="module")
def flow_fleet(redis_url: str, fake: ThreadedFakeLLM) -> Iterator[dict[str, Any]]:
    """Two workers on queue `flow` importing tests.flow_trees, their env and app; a third can join. By PID."""
    with flow_workers(redis_db(redis_url, 12), redis_db(redis_url, 13), fake) as fleet:
        yield fleet


@contextlib.contextmanager
def flow_workers(broker_url: str, state_url: str, fake: ThreadedFakeLLM) -> Iterator[dict[str, Any]]:
    """The flow fleet on these URLs (test_cluster_flow runs its state on a Redis Cluster)."""
    env = fleet_env(
        broker_url, state_url, "tests.flow_trees", FLOW_FAKE_URL=fake.base_url,
        TASKTREE_QUEUE=QUEUE, TASKTREE_LLM_LEASE_S=str(LEASE_S), TASKTREE_LLM_WINDOW_MARGIN_S=str(MARGIN_S),
        TASKTREE_LLM_COOLDOWN_S="120", TASKTREE_LLM_BATCH_MAX_REQUESTS="5", TASKTREE_LLM_BATCH_MAX_WAIT_S="0.5",
        TASKTREE_LLM_BATCH_POLL_S="0.1",
    )
    os.environ["FLOW_FAKE_URL"] = fake.base_url  # before this process imports tests.flow_trees
    settings = fleet_settings(env, queue=QUEUE)
    app = create_app(settings)
    workers = [WorkerProcess(f"flow{n}", env, queues=QUEUE, concurrency=16) for n in (1, 2)]
    with running_workers(app, workers):
        yield {"app": app, "settings": settings, "env": env, "workers": workers}


@pytest.fixture
async def fleet(flow_fleet: dict[str, Any], fake: ThreadedFakeLLM) -> AsyncIterator[dict[str, Any]]:
    """The fleet with no flow-control state left from another test (the workers' own keys stay: their liveness),
    the fake server reset, and this process's flow control on the fleet's Redis (a probe call from here counts
    with the workers' calls)."""
    state = connect(flow_fleet["settings"].redis_url, asynchronous=True)
    stale = [key async for key in state.scan_iter(f"{KEY_PREFIX}*")]
    if stale:
        await state.delete(*stale)
    fake.set_limits()
    fake.set_latency(20)
    fake.reset()
    limits.configure(TasktreeSettings(redis_url=flow_fleet["settings"].redis_url, llm_lease_s=LEASE_S))
    try:
        yield {**flow_fleet, "state": state}
    finally:
        await close_limiters()
        limits.configure(None)
        await state.aclose()


def flow_trees() -> Any:
    from tests import flow_trees as F  # imported once FLOW_FAKE_URL is set

    return F


async def run_batch(fleet: dict[str, Any], limit: int, asks: list[Any], **context_kwargs: Any) -> tuple[Any, Context]:
    F = flow_trees()
    executor = CeleryExecutor(fleet["app"], settings=fleet["settings"], batch_size=1)
    context = Context(executor=executor, **context_kwargs)
    try:
        async with context.using_blackboard(F.Batch(asks)):
            result = await asyncio.wait_for(F.BATCHES[limit](context), 60)
    finally:
        await executor.aclose()
    return result, context


def llm_units(context: Context) -> list[tuple[str, Any]]:
    """(worker, LLM trace node) of every Gather child."""
    units = [node for node in context.trace_root().walk() if "worker" in node.attributes]
    return [(unit.attributes["worker"].split("@")[0], node) for unit in units for node in unit.walk()
            if node.kind == "LLM"]


async def test_two_workers_and_several_runs_stay_within_the_server_limits(
    fleet: dict[str, Any], fake: ThreadedFakeLLM
) -> None:
    F = flow_trees()
    fake.set_limits(rpm=F.RPM, tpm=F.TPM, window_s=F.WINDOW_S)
    # every item of every run dispatched at once: the limiter, not dispatch, decides when calls leave
    runs = [run_batch(fleet, 12, [F.Ask(i, "flow-rate", F.WORDS) for i in range(7)]) for _ in range(3)]
    outcomes = await asyncio.gather(*runs)
    for result, _ in outcomes:
        assert result.is_ok(), [str(data) for data in result.data]  # nothing that would have fit FAILed
    stats = fake.stats.snapshot()["limits"]
    assert stats["rate_limited"] == 0 and stats["windows_over_limit"] == 0
    assert stats["max_window_tokens"] <= F.TPM and stats["max_window_requests"] <= F.RPM
    # the limiter, not the provider, held the calls back (how close to the limit it runs is a figure of
    # benchmarks/llm_rate_limit.py, not a test: on a loaded machine the workers may not keep up with it)
    units = [unit for _, context in outcomes for unit in llm_units(context)]
    waited = [a for _, node in units for a in node.attributes["llm_attempts"] if a.get("waited_for") == "tpm"]
    assert waited, "no call waited for the token limit"
    assert {worker for worker, _ in units} == {"flow1", "flow2"}


async def test_a_429_pauses_the_model_on_both_workers(fleet: dict[str, Any], fake: ThreadedFakeLLM) -> None:
    F = flow_trees()
    fake.set_latency(40)
    result, context = await run_batch(fleet, 6, [F.Ask(i, "flow-burst") for i in range(30)])
    assert result.is_ok()
    answers = list(fake.stats.answers)
    [refused_at] = [answered for _, _, answered, status in answers if status == 429]
    # calls let through before the pause reached Redis may still arrive just after the 429 (0.5 s of slack for a
    # loaded machine); none may arrive later in the 2 s Retry-After
    during = [arrived - refused_at for _, arrived, _, _ in answers if refused_at + 0.5 < arrived < refused_at + 1.95]
    assert during == [], "calls reached the provider during its Retry-After"
    paused = {worker for worker, llm in llm_units(context)
              if any(attempt["waited_for"] == "pause" for attempt in llm.attributes["llm_attempts"])}
    assert paused == {"flow1", "flow2"}, "the pause did not reach both workers"
    [retried] = [llm for _, llm in llm_units(context) if len(llm.attributes["llm_attempts"]) == 2]
    assert [a["status"] for a in retried.attributes["llm_attempts"]] == [429, 200]
    assert retried.attributes["llm_attempts"][0]["retry_after_s"] == 2.0


async def test_a_concurrency_limit_holds_across_the_fleet(fleet: dict[str, Any], fake: ThreadedFakeLLM) -> None:
    F = flow_trees()
    fake.set_latency(80)
    asks = [F.Ask(i, "flow-k") for i in range(18)]
    asks += [F.Ask(i, f"flow-t{1 + i % 2}", tenant=f"t{1 + i % 2}") for i in range(16)]
    result, context = await run_batch(fleet, 16, asks)
    assert result.is_ok()
    per_model = fake.stats.snapshot()["max_concurrent_per_model"]
    assert per_model["flow-k"] == 3  # K for the model, never more, across both workers
    assert per_model["flow-t1"] == 2 and per_model["flow-t2"] == 2  # K per tenant (the blackboard's key)
    assert {worker for worker, _ in llm_units(context)} == {"flow1", "flow2"}


async def test_a_budget_stops_new_calls_across_the_fleet_and_the_result_says_why(
    fleet: dict[str, Any], fake: ThreadedFakeLLM
) -> None:
    F = flow_trees()
    asks = [F.Ask(i, "flow-budget") for i in range(12)]
    result, context = await run_batch(fleet, 3, asks, budget=Budget(max_total_tokens=60))
    assert not result.is_ok()
    done = [data for data in result.data if isinstance(data, LLMRunRecord)]
    stopped = [data for data in result.data if isinstance(data, LLMBudgetExceeded)]
    assert done and stopped and len(done) + len(stopped) == 12
    assert fake.calls == len(done) and sum(record.usage["total"] for record in done) <= 60
    assert stopped[0].run_id == context.run_id and "budget exceeded" in stopped[0].message
    record = await fleet["state"].hgetall(f"tasktree:{{flow}}:budget:{context.run_id}")
    assert int(record[b"mt"]) == 60 and int(record[b"ut"]) == sum(r.usage["total"] for r in done)
    assert int(record[b"rt"]) == 0 and await fleet["state"].ttl(f"tasktree:{{flow}}:budget:{context.run_id}") > 0


async def test_a_dead_workers_slots_come_back(fleet: dict[str, Any], fake: ThreadedFakeLLM) -> None:
    F = flow_trees()
    doomed = WorkerProcess("flowdoomed", {**fleet["env"], "TASKTREE_QUEUE": "flow-doomed"}, queues="flow-doomed",
                           concurrency=4)
    settings = fleet["settings"].model_copy(update={"queue": "flow-doomed"})
    executor = CeleryExecutor(fleet["app"], settings=settings, batch_size=1)
    context = Context(executor=executor)
    slots = f"{KEY_PREFIX}m:{F.FAKE_URL}|flow-slow:c"
    # a call from here needs one of the two slots: it must be ready to ask as soon as the worker dies
    probe = Tree[F.Ask]("FlowProbe").LLM(LLMModel("flow-slow", concurrency=2), F.messages, api_key="k",
                                           base_url=F.FAKE_URL).End()
    warm = Tree[F.Ask]("FlowProbeWarm").LLM("flow-warm", F.messages, api_key="k", base_url=F.FAKE_URL).End()
    probe_context = Context()
    try:
        async with probe_context.using_blackboard(F.Ask(0, "flow-warm")):
            assert (await warm(probe_context)).is_ok()  # this process's LLM client and transport are loaded
        doomed.start()
        wait_until_ready(fleet["app"], [doomed])
        async with context.using_blackboard(F.Batch([F.Ask(i, "flow-slow") for i in range(2)])):
            stuck = asyncio.create_task(F.BATCHES[2](context))
            await eventually(lambda: _in_flight(fake, "flow-slow", 2), "both slow calls at the provider")
            assert await fleet["state"].zcard(slots) == 2  # both slots held, renewed by the doomed worker
            os.kill(doomed.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
            doomed.process.wait(10)  # type: ignore[union-attr]
            killed = time.monotonic()
            probe_context = Context()  # it waits until the dead worker's leases run out
            async with probe_context.using_blackboard(F.Ask(1, "flow-slow")):
                probed = await asyncio.wait_for(probe(probe_context), 30)
            waited = time.monotonic() - killed
            stuck.cancel()
    finally:
        await executor.aclose()
        doomed.stop()
    assert probed.is_ok() and probed.data.final_output == "answer 1"
    [attempt] = next(n for n in probe_context.trace_root().walk() if n.kind == "LLM").attributes["llm_attempts"]
    assert attempt["waited_for"] == "concurrency"
    assert waited <= LEASE_S + 2.0, f"the slots came back {waited:.1f} s after the kill (lease {LEASE_S} s)"


async def _in_flight(fake: ThreadedFakeLLM, model: str, count: int) -> bool:
    return fake.stats.in_flight_per_model.get(model, 0) >= count


async def test_a_deployment_cooled_down_by_one_worker_gets_no_calls_from_the_other(
    fleet: dict[str, Any], fake: ThreadedFakeLLM
) -> None:
    F = flow_trees()
    # the failing deployment weighs 10,000 to 1: only its cooldown, shared through Redis, keeps calls away from it
    result, context = await run_batch(fleet, 2, [F.Ask(0, "flow-routed")])
    assert result.is_ok()
    [(first_worker, node)] = llm_units(context)
    failed_calls = fake.calls_per_model["flow-routed-fail-500"]
    assert failed_calls >= 1 and node.attributes["llm_route"][0]["verdict"] == "move"
    assert node.attributes["deployment"].endswith("|flow-routed-a")
    result, context = await run_batch(fleet, 16, [F.Ask(i, "flow-routed") for i in range(1, 33)])
    assert result.is_ok(), [str(data) for data in result.data]
    workers = {worker for worker, _ in llm_units(context)}
    assert len(workers) == 2, workers  # the worker that never saw it fail avoided it too
    assert fake.calls_per_model["flow-routed-fail-500"] == failed_calls
    assert fake.calls_per_model["flow-routed-a"] == 33


async def test_batch_mode_calls_go_through_the_batch_api_and_errored_requests_go_live(
    fleet: dict[str, Any], fake: ThreadedFakeLLM
) -> None:
    F = flow_trees()
    fake.batches.configure(error_share=0.25)
    result, context = await run_batch(fleet, 16, [F.Ask(i, "flow-batch") for i in range(12)])
    assert result.is_ok(), [str(data) for data in result.data]
    assert [data.final_output for data in result.data] == [f"answer {i}" for i in range(12)]
    batches = fake.batches.batches.values()
    assert sum(batch["request_counts"]["total"] for batch in batches) == 12  # every call went in a batch
    errored = sum(batch["request_counts"]["failed"] for batch in batches)
    assert errored >= 2 and fake.calls_per_model.get("flow-batch") == errored  # each errored one answered live
    nodes = [node for _, node in llm_units(context)]
    assert {node.attributes["batch"] for node in nodes} == {"answered", "fallback"}
    answered = [(node, data) for node, data in zip(nodes, result.data, strict=True)
                if node.attributes["batch"] == "answered"]
    for node, data in answered:  # the batch's half price
        usage = data.usage
        assert data.cost == pytest.approx((usage["prompt"] * 1.0 + usage["completion"] * 2.0) / 1e6 * 0.5)
        assert node.attributes["batch_id"] in fake.batches.batches


async def test_a_budget_counts_batched_calls_at_the_batch_price_and_stops_them_before_their_batch(
    fleet: dict[str, Any], fake: ThreadedFakeLLM
) -> None:
    F = flow_trees()
    result, context = await run_batch(fleet, 16, [F.Ask(i, "flow-batch") for i in range(4)],
                                      budget=Budget(max_cost_usd=1.0))
    assert result.is_ok(), [str(data) for data in result.data]
    record = await fleet["state"].hgetall(budget_key(context.run_id))
    # what the budget counted is the answers' usage at half price (the estimate counted at add is corrected)
    assert float(record[b"uc"]) == pytest.approx(sum(data.cost for data in result.data))
    assert int(record[b"ut"]) == sum(data.usage["total"] for data in result.data) and int(record[b"rt"]) == 0
    usage = result.data[0].usage
    assert result.data[0].cost == pytest.approx((usage["prompt"] * 1.0 + usage["completion"] * 2.0) / 2e6)
    fake.reset()
    result, context = await run_batch(fleet, 16, [F.Ask(i, "flow-batch") for i in range(3)],
                                      budget=Budget(max_total_tokens=5))
    assert [type(data) for data in result.data] == [LLMBudgetExceeded] * 3  # no call fits: none is added
    assert not fake.batches.batches and fake.calls == 0


async def test_a_worker_killed_while_its_batch_is_out_the_run_finishes_and_no_call_is_paid_twice(
    fleet: dict[str, Any], fake: ThreadedFakeLLM
) -> None:
    F = flow_trees()
    env = {**fleet["env"], "TASKTREE_QUEUE": "flow-doomed", "TASKTREE_LEASE_TTL": "2",
           "TASKTREE_LLM_BATCH_LEASE_S": "2"}
    doomed = WorkerProcess("flowbatchdoomed", env, queues="flow-doomed", concurrency=4)
    heir = WorkerProcess("flowbatchheir", env, queues="flow-doomed", concurrency=4)
    settings = fleet["settings"].model_copy(update={"queue": "flow-doomed", "lease_ttl": 2.0})
    executor = CeleryExecutor(fleet["app"], settings=settings, batch_size=1)
    context = Context(executor=executor)
    fake.batches.configure(delay_s=4)
    try:
        doomed.start()
        wait_until_ready(fleet["app"], [doomed])
        async with context.using_blackboard(F.Batch([F.Ask(i, "flow-batch") for i in range(3)])):
            run = asyncio.create_task(F.BATCHES[3](context))
            await eventually(lambda: _true(bool(fake.batches.batches)), "the batch at the provider", within=30)
            os.kill(doomed.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
            doomed.process.wait(10)  # type: ignore[union-attr]
            heir.start()  # its units come back here; their calls wait for the same batch
            result = await asyncio.wait_for(run, 90)
    finally:
        await executor.aclose()
        stop_workers([doomed, heir])
    assert result.is_ok(), [str(data) for data in result.data]
    assert [data.final_output for data in result.data] == [f"answer {i}" for i in range(3)]
    assert {worker for worker, _ in llm_units(context)} == {"flowbatchheir"}  # every unit ran again there
    [batch] = fake.batches.batches.values()  # one batch, each call in it once
    assert batch["request_counts"]["total"] == 3 and "flow-batch" not in fake.calls_per_model


async def _true(value: bool) -> bool:
    return value
