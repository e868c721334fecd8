"""LLM flow control in one process against a real redis-server and the fake LLM server: rate limits, pacing,
corrections, concurrency keys and leases, shared back-off, budgets, fairness between runs. The same Redis state
serves a whole fleet; tests/fleet/test_flow_fleet.py runs it across two real workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis

from broker_config import TasktreeSettings
from tasktree_dist import Budget, Context, LLMBudgetExceeded, LLMModel, LLMProvider, LLMRunRecord, Tree, flow_stats
from tasktree_dist.llm import limits
from tasktree_dist.llm.budget import verdict
from tasktree_dist.llm.limiter import close_limiters
from tasktree_dist.llm.limits import KEY_PREFIX
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tests.helpers import eventually, flow_control_on, redis_db

#: This module's Redis database (the fleet tests use 12 and 13).
DB = 14
WINDOW_S = 1.0
MARGIN_S = 0.1


@dataclass
class Ask:
    i: int
    base_url: str
    text: str = "REPLY:answer"
    tenant: str = ""
    model: Any = "fake-gpt"


@dataclass
class Batch:
    asks: list[Ask] = field(default_factory=list)


def ask_messages(b: Ask) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"{b.text} {b.i}"}]


def ask_model(b: Ask) -> Any:
    return b.model


def ask_url(b: Ask) -> str:
    return b.base_url


def batch(tree: Tree[Ask], limit: int, name: str) -> Tree[Batch]:
    return Tree[Batch](name).Gather(lambda b: ([tree] * len(b.asks), b.asks), concurrency_limit=limit).End()


AskTree = Tree[Ask]("FlowAsk").LLM(ask_model, ask_messages, api_key="k", base_url=ask_url, max_tokens=4).End()


@pytest.fixture
async def flow(redis_url: str, fake_llm: ThreadedFakeLLM) -> AsyncIterator[redis.Redis]:
    """Flow control on this module's flushed Redis database, short windows and leases; the fake LLM reset."""
    async with flow_control_on(redis_db(redis_url, DB), llm_window_margin_s=MARGIN_S, llm_lease_s=5.0) as client:
        flow_stats().reset()
        yield client


async def run(tree: Tree[Any], bb: Any, context: Context | None = None) -> tuple[Any, Context]:
    context = context or Context()
    async with context.using_blackboard(bb):
        result = await tree(context)
    return result, context


def llm_nodes(context: Context) -> list[Any]:
    return [node for node in context.trace_root().walk() if node.kind == "LLM"]


def asks(fake: ThreadedFakeLLM, n: int, model: Any, **kwargs: Any) -> Batch:
    return Batch([Ask(i, fake.base_url, model=model, **kwargs) for i in range(n)])


async def test_an_ungoverned_call_costs_no_redis_round_trip(fake_llm: ThreadedFakeLLM) -> None:
    limits.configure(TasktreeSettings(redis_url="redis://127.0.0.1:1/0"))  # nothing listens: a round trip would fail
    flow_stats().reset()
    try:
        result, context = await run(AskTree, Ask(1, fake_llm.base_url))
    finally:
        limits.configure(None)
    assert result.is_ok() and result.data.final_output == "answer 1"
    assert flow_stats().calls == 0
    assert not {key for key in llm_nodes(context)[0].attributes if key.startswith("limiter_")}


async def test_rpm_limit_holds_in_every_server_window_and_calls_are_paced(
    flow: redis.Redis, fake_llm: ThreadedFakeLLM
) -> None:
    fake_llm.set_limits(rpm=8, window_s=WINDOW_S)
    model = LLMModel("fake-gpt", rpm=8, window_s=WINDOW_S)
    result, context = await run(batch(AskTree, 12, "FlowRpm"), asks(fake_llm, 16, model))
    assert result.is_ok(), [str(data) for data in result.data]
    stats = fake_llm.stats.snapshot()["limits"]
    assert stats["rate_limited"] == 0 and stats["windows_over_limit"] == 0
    assert stats["max_window_requests"] <= 8
    # paced by the limiter (how close to the limit it runs is benchmarks/llm_rate_limit.py's figure, not a test's)
    assert any(a.get("waited_for") == "rpm" for node in llm_nodes(context) for a in node.attributes["llm_attempts"])
    nodes = llm_nodes(context)
    assert nodes[0].attributes["limiter_scopes"] == [f"m:{fake_llm.base_url}|fake-gpt rpm=8/1s"]
    waited = [node.attributes["llm_attempts"][0] for node in nodes if node.attributes["limiter_wait_ms"] > 0]
    assert len(waited) >= 8 and {attempt["waited_for"] for attempt in waited} == {"rpm"}
    assert flow_stats().waits_by_reason["rpm"] == len(waited)


async def test_tokens_are_reserved_before_sending_and_corrected_with_the_real_usage(
    flow: redis.Redis, fake_llm: ThreadedFakeLLM
) -> None:
    model = LLMModel("fake-gpt", tpm=10_000, window_s=30)
    result, context = await run(AskTree, Ask(7, fake_llm.base_url, model=model))
    assert result.is_ok()
    [node] = llm_nodes(context)
    estimate, used = node.attributes["limiter_estimate_tokens"], result.data.usage["total"]
    body = fake_llm.requests[0]
    assert estimate >= used and estimate >= 4  # max_tokens=4 plus the request's size
    assert node.attributes["limiter_correction_tokens"] == used - estimate < 0
    key = f"{KEY_PREFIX}m:{fake_llm.base_url}|fake-gpt"

    async def window_holds_the_usage() -> bool:  # the correction leaves with the loop's next script call
        return int(await flow.hget(key, "tt") or 0) == used

    await eventually(window_holds_the_usage, "the window holding the real usage", within=5)
    assert body["max_tokens"] == 4
    assert flow_stats().refunds == 1 and flow_stats().refunded_tokens == estimate - used


async def test_tpm_limit_holds_in_every_server_window(flow: redis.Redis, fake_llm: ThreadedFakeLLM) -> None:
    # the fake counts words: 41 prompt words and 4 completion tokens a call; 10 calls a window
    fake_llm.set_limits(tpm=450, window_s=WINDOW_S)
    model = LLMModel("fake-gpt", tpm=450, window_s=WINDOW_S)
    result, _ = await run(batch(AskTree, 10, "FlowTpm"), asks(fake_llm, 20, model, text="REPLY:answer" + " w" * 39))
    assert result.is_ok()
    stats = fake_llm.stats.snapshot()["limits"]
    assert stats["rate_limited"] == 0 and stats["windows_over_limit"] == 0 and stats["max_window_tokens"] <= 450


async def test_a_concurrency_limit_caps_the_calls_in_flight_and_frees_its_slots(
    flow: redis.Redis, fake_llm: ThreadedFakeLLM, transport: str
) -> None:
    fake_llm.set_latency(60)
    model = LLMModel("fake-conc", concurrency=3)
    result, context = await run(batch(AskTree, 12, "FlowConc"), asks(fake_llm, 12, model))
    assert result.is_ok()
    assert 2 <= fake_llm.stats.snapshot()["max_concurrent_per_model"]["fake-conc"] <= 3  # never more than K
    assert {node.attributes["transport"] for node in llm_nodes(context)} == {transport}
    assert "concurrency" in flow_stats().waits_by_reason

    async def released() -> bool:
        return not await flow.zcard(f"{KEY_PREFIX}m:{fake_llm.base_url}|fake-conc:c")

    await eventually(released, "the slots released", within=5)


async def test_a_concurrency_key_from_the_blackboard_splits_the_limit_per_tenant(
    flow: redis.Redis, fake_llm: ThreadedFakeLLM
) -> None:
    fake_llm.set_latency(60)
    provider = LLMProvider(fake_llm.base_url, "k", concurrency=2, concurrency_key=lambda b: b.tenant)
    models = {tenant: LLMModel(f"fake-{tenant}", provider) for tenant in ("t1", "t2")}
    bb = Batch([Ask(i, fake_llm.base_url, tenant=t, model=models[t]) for i in range(8) for t in models])
    result, context = await run(batch(AskTree, 16, "FlowTenants"), bb)
    assert result.is_ok()
    per_model = fake_llm.stats.snapshot()["max_concurrent_per_model"]
    assert per_model == {"fake-t1": 2, "fake-t2": 2}
    assert fake_llm.max_concurrent == 4  # one provider-wide limit of 2 would have allowed 2
    scopes = llm_nodes(context)[0].attributes["limiter_scopes"]
    assert any(scope.startswith(f"p:{fake_llm.base_url}#t") and scope.endswith("concurrency=2") for scope in scopes)


async def test_an_expired_slot_lease_frees_its_capacity(flow: redis.Redis, fake_llm: ThreadedFakeLLM) -> None:
    slots = f"{KEY_PREFIX}m:{fake_llm.base_url}|fake-lease:c"
    seconds, micros = await flow.time()
    # a slot held by a process that stopped renewing it: its lease runs out in 0.4 s
    await flow.zadd(slots, {"dead-process-call.0": seconds * 1000 + micros / 1000 + 400})
    model = LLMModel("fake-lease", concurrency=1)
    result, context = await run(AskTree, Ask(1, fake_llm.base_url, model=model))
    assert result.is_ok()
    [attempt] = llm_nodes(context)[0].attributes["llm_attempts"]
    assert attempt["waited_for"] == "concurrency" and 250 <= attempt["wait_ms"] <= 2000


async def test_a_429_pauses_the_model_and_the_retry_waits_for_it(flow: redis.Redis, fake_llm: ThreadedFakeLLM) -> None:
    fake_llm.set_latency(30)
    model = LLMModel("fake-gpt", concurrency=3, llm_call_kwargs={
        "extra_headers": {"X-Fake-Fault": "fail-429", "X-Fake-Fail-Times": "1", "X-Fake-Retry-After": "1"},
    })
    result, context = await run(batch(AskTree, 3, "FlowPause"), asks(fake_llm, 9, model))
    assert result.is_ok()
    answers = list(fake_llm.stats.answers)
    [refused_at] = [answered for _, _, answered, status in answers if status == 429]
    during = [arrived for _, arrived, _, _ in answers if refused_at + 0.1 < arrived < refused_at + 0.95]
    assert during == [], "calls reached the provider during its Retry-After"
    assert any(arrived >= refused_at + 0.95 for _, arrived, _, _ in answers)
    [retried] = [node for node in llm_nodes(context) if len(node.attributes["llm_attempts"]) == 2]
    first, second = retried.attributes["llm_attempts"]
    assert first["status"] == 429 and first["retry_after_s"] == 1.0 and second["status"] == 200
    assert any("paused fleet-wide for 1.00 s" in line for line in retried.logs)
    paused = [node for node in llm_nodes(context) if node.attributes["llm_attempts"][0]["waited_for"] == "pause"]
    assert paused, "no other call waited for the pause"
    assert flow_stats().rate_limited == 1 and flow_stats().pauses == 1


async def test_a_budget_stops_new_calls_and_the_result_says_why(fake_llm: ThreadedFakeLLM) -> None:
    # in-process: counted in memory, no Redis needed
    limits.configure(TasktreeSettings(redis_url="redis://127.0.0.1:1/0"))
    try:
        context = Context(budget=Budget(max_total_tokens=50))
        result, context = await run(batch(AskTree, 2, "FlowBudget"), asks(fake_llm, 12, "fake-gpt"), context)
    finally:
        limits.configure(None)
    assert not result.is_ok()
    done = [data for data in result.data if isinstance(data, LLMRunRecord)]
    stopped = [data for data in result.data if isinstance(data, LLMBudgetExceeded)]
    assert done and stopped and len(done) + len(stopped) == 12
    assert fake_llm.calls == len(done)  # a stopped call never reached the provider
    assert sum(record.usage["total"] for record in done) <= 50
    assert all(record.budget == "max_total_tokens" and record.limit == 50 for record in stopped)
    assert "budget exceeded" in stopped[0].message and context.run_id in stopped[0].message
    failed = [node for node in llm_nodes(context) if not node.result.is_ok()]
    assert failed[0].attributes["budget_exceeded"]["budget"] == "max_total_tokens"
    assert failed[0].attributes["request"]["messages"][0]["content"].startswith("REPLY:answer")


async def test_a_run_budget_in_redis_counts_cost_across_calls(flow: redis.Redis, fake_llm: ThreadedFakeLLM) -> None:
    # a run with a run id and the settings' budget: what every worker of a distributed run does; the provider
    # reports each call's cost (0.01) and no prices are known, so the cap stops calls once it is reached
    url = limits.config().redis_url
    limits.configure(TasktreeSettings(redis_url=url, llm_run_max_cost_usd=0.015))
    costly = LLMModel("fake-gpt", llm_call_kwargs={"extra_headers": {"X-Fake-Cost": "0.01"}})
    context = Context(run_id="run-cost")
    result, context = await run(batch(AskTree, 1, "FlowCost"), asks(fake_llm, 6, costly), context)
    assert not result.is_ok()
    assert [type(data).__name__ for data in result.data] == ["LLMRunRecord"] * 2 + ["LLMBudgetExceeded"] * 4
    assert all(data.budget == "max_cost_usd" and data.reached for data in result.data[2:])
    assert "max_cost_usd=0.015 reached (0.02 USD used) in run run-cost" in result.data[2].message
    budget = await flow.hgetall("tasktree:{flow}:budget:run-cost")
    assert float(budget[b"mc"]) == 0.015 and float(budget[b"uc"]) == pytest.approx(0.02) and int(budget[b"rt"]) == 0
    assert 0 < await flow.ttl("tasktree:{flow}:budget:run-cost") <= 86400


def test_budget_verdicts() -> None:
    caps = (100, None)
    assert verdict(caps, (40, 0.0), (0, 0.0), (50, 0.0)) is None
    assert verdict(caps, (40, 0.0), (30, 0.0), (50, 0.0)) == "wait"  # may fit once the call in flight settles
    assert verdict(caps, (60, 0.0), (0, 0.0), (50, 0.0)) == ("max_total_tokens", 100, 60, 50, False)
    assert verdict(caps, (100, 0.0), (0, 0.0), (1, 0.0)) == ("max_total_tokens", 100, 100, 1, True)
    assert verdict((None, 1.0), (0, 1.5), (0, 0.0), (0, 0.1)) == ("max_cost_usd", 1.0, 1.5, 0.1, True)


async def test_a_call_that_can_never_fit_its_tpm_fails_at_once(flow: redis.Redis, fake_llm: ThreadedFakeLLM) -> None:
    model = LLMModel("fake-gpt", tpm=10)
    result, context = await run(AskTree, Ask(1, fake_llm.base_url, text="REPLY:" + "word " * 50, model=model))
    assert not result.is_ok() and fake_llm.calls == 0
    assert "can never be sent" in llm_nodes(context)[0].attributes["error"]


async def test_unreachable_redis_fails_a_governed_call_naming_the_setting(fake_llm: ThreadedFakeLLM) -> None:
    limits.configure(TasktreeSettings(redis_url="redis://:secret@127.0.0.1:1/0"))
    try:
        result, context = await run(AskTree, Ask(1, fake_llm.base_url, model=LLMModel("fake-gpt", rpm=10)))
    finally:
        await close_limiters()
        limits.configure(None)
    error = llm_nodes(context)[0].attributes["error"]
    assert not result.is_ok() and "TASKTREE_REDIS_URL" in error and "secret" not in error and fake_llm.calls == 0


async def test_waits_are_fair_across_runs(flow: redis.Redis, fake_llm: ThreadedFakeLLM) -> None:
    """A run that queued many calls does not make a later run's few calls wait behind all of them."""
    model = LLMModel("fake-gpt", rpm=10, window_s=WINDOW_S)
    big = run(batch(AskTree, 12, "FlowFairBig"), asks(fake_llm, 20, model, text="REPLY:big"))
    big_task = asyncio.create_task(big)
    await fake_llm.wait_for_calls(2, deadline_s=5)  # the big run's calls now queue behind the limit
    small_started = time.time()
    small, _ = await run(batch(AskTree, 3, "FlowFairSmall"), asks(fake_llm, 3, model, text="REPLY:small"))
    big_result, _ = await big_task
    assert small.is_ok() and big_result.is_ok()
    bodies = [body["messages"][0]["content"] for body in fake_llm.requests]
    arrivals = list(fake_llm.stats.request_times)
    after = [body for body, arrived in zip(bodies, arrivals, strict=True) if arrived >= small_started]
    last_small = max(i for i, body in enumerate(after) if body.startswith("REPLY:small"))
    assert last_small <= 8, f"the small run's last call went out {last_small + 1}th after it started"


async def test_streams_are_governed_too(flow: redis.Redis, fake_llm: ThreadedFakeLLM) -> None:
    fake_llm.set_latency(40)
    model = LLMModel("fake-stream", concurrency=1, tpm=10_000)
    tree = Tree[Ask]("FlowStream").LLM(ask_model, ask_messages, api_key="k", base_url=ask_url, stream=True).End()
    result, context = await run(batch(tree, 3, "FlowStreams"), asks(fake_llm, 3, model))
    assert result.is_ok() and fake_llm.stats.snapshot()["max_concurrent_per_model"]["fake-stream"] == 1
    assert all(node.attributes["limiter_correction_tokens"] < 0 for node in llm_nodes(context))


async def test_a_run_id_without_redis_only_skips_the_budget_lookup(fake_llm: ThreadedFakeLLM) -> None:
    """An in-process run given a run id looks for a budget in Redis once; without Redis it runs without one."""
    limits.configure(TasktreeSettings(redis_url="redis://127.0.0.1:1/0"))
    try:
        result, _ = await run(AskTree, Ask(1, fake_llm.base_url), Context(run_id="no-redis"))
    finally:
        await close_limiters()
        limits.configure(None)
    assert result.is_ok() and result.data.final_output == "answer 1"


def test_limits_from_objects_and_settings_make_one_scope_per_level() -> None:
    settings = TasktreeSettings(
        redis_url="redis://127.0.0.1:1/0", llm_window_s=60, llm_window_margin_s=0.5,
        llm_limits={"http://p/v1": {"rpm": 100, "concurrency": 9}, "gpt-x": {"tpm": 5000, "window_s": 10}},
    )
    cfg = limits.FlowConfig.from_settings(settings)
    provider = LLMProvider("http://p/v1/", "k", rpm=50)  # the object's rpm wins over the setting's
    keyed = LLMModel("gpt-x", provider, concurrency=2, concurrency_key=lambda b: b["tenant"])
    plan = limits.plan("gpt-x", keyed, "http://p/v1/", {"tenant": "acme"}, cfg)
    assert plan is not None and plan.labels == (
        "p:http://p/v1 rpm=50/60s concurrency=9", "m:http://p/v1|gpt-x tpm=5000/10s",
        "m:http://p/v1|gpt-x#acme concurrency=2",
    )
    assert plan.pause.name == "m:http://p/v1|gpt-x" and plan.queue.name == "m:http://p/v1|gpt-x#acme"
    assert plan.scopes[1].window_ms == 10_500  # the window plus the client's margin
    assert limits.plan("other", None, "http://elsewhere/v1", None, cfg) is None  # nothing governs it
    by_settings = limits.plan("gpt-x", None, "http://elsewhere/v1", None, cfg)  # a model name in the settings
    assert by_settings is not None and by_settings.labels == ("m:http://elsewhere/v1|gpt-x tpm=5000/10s",)
    with pytest.raises(ValueError, match="TASKTREE_LLM_LIMITS"):
        limits.FlowConfig.from_settings(TasktreeSettings(llm_limits={"m": {"rmp": 1}}))
    with pytest.raises(ValueError, match="rpm must be a positive number"):
        LLMModel("m", rpm=0)


async def test_a_provider_wide_limit_is_shared_by_its_models(flow: redis.Redis, fake_llm: ThreadedFakeLLM) -> None:
    fake_llm.set_limits(rpm=100, window_s=WINDOW_S)  # only to count per window; the provider allows 6 in all
    provider = LLMProvider(fake_llm.base_url, "k", rpm=6, window_s=WINDOW_S)
    models = [LLMModel("fake-a", provider), LLMModel("fake-b", provider)]
    bb = Batch([Ask(i, fake_llm.base_url, model=models[i % 2]) for i in range(9)])
    result, _ = await run(batch(AskTree, 9, "FlowProvider"), bb)
    assert result.is_ok()
    per_window: dict[int, int] = {}
    for window in fake_llm.stats.snapshot()["limits"]["windows"]:
        per_window[window["index"]] = per_window.get(window["index"], 0) + window["requests"]
    assert max(per_window.values()) <= 6 and len(per_window) >= 2


async def test_every_flow_control_key_has_a_ttl(flow: redis.Redis, fake_llm: ThreadedFakeLLM) -> None:
    """The library's rule: every Redis key it writes expires: while calls wait and hold slots, and after."""
    fake_llm.set_latency(20)
    model = LLMModel("fake-gpt", rpm=4, tpm=10_000, concurrency=2, window_s=WINDOW_S)
    limits.configure(TasktreeSettings(redis_url=limits.config().redis_url, llm_run_max_total_tokens=10_000,
                                      llm_window_margin_s=MARGIN_S))
    running = asyncio.create_task(run(batch(AskTree, 6, "FlowTtl"), asks(fake_llm, 6, model), Context(run_id="ttl")))

    async def keys() -> list[bytes]:
        return [key async for key in flow.scan_iter("tasktree:{flow}:*")]

    async def waiting_room() -> bool:
        return any(key.endswith(b":w") for key in await keys())

    await eventually(waiting_room, "calls waiting", within=10)
    during = await keys()
    result, _ = await running
    assert result.is_ok()
    after = await keys()
    assert {key.rsplit(b":", 1)[-1] for key in during} >= {b"r", b"t", b"w", b"x"}
    assert [key for key in during + after if await flow.ttl(key) == -1] == []
