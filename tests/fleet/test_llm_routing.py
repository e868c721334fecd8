"""Deployments and fallbacks (llm/routing.py) in one process, against a real redis-server and two fake LLM servers
over HTTP: the choice by spare capacity, weights, cooldowns, the fallback chain, context-window fallbacks, all
deployments cooling down, prices per deployment, the settings' form. tests/fleet/test_llm_routing_fleet.py shares
a cooldown between two real workers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis

from tasktree_dist import Context, LLMDeployment, LLMModel, LLMProvider, Tree
from tasktree_dist.core.settings import get_settings
from tasktree_dist.llm import limits, routing
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tests.helpers import flow_control_on, redis_db

pytestmark = pytest.mark.timeout(90)

#: This module's Redis database (flow control's tests use 12 to 14).
DB = 11


@dataclass
class Ask:
    i: int
    model: Any
    text: str = "REPLY:answer"


@dataclass
class Batch:
    asks: list[Ask] = field(default_factory=list)


AskTree = Tree[Ask]("RouteAsk").LLM(
    lambda b: b.model, lambda b: [{"role": "user", "content": f"{b.text} {b.i}"}], api_key="k", max_tokens=8,
).End()


def batch(limit: int) -> Tree[Batch]:
    return Tree[Batch](f"RouteBatch{limit}").Gather(
        lambda b: ([AskTree] * len(b.asks), b.asks), concurrency_limit=limit).End()


@pytest.fixture(scope="module")
def second_fake() -> Iterator[ThreadedFakeLLM]:
    with ThreadedFakeLLM() as server:
        yield server


@pytest.fixture
async def route(redis_url: str, fake_llm: ThreadedFakeLLM, second_fake: ThreadedFakeLLM,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[redis.Redis]:
    """Flow control on this module's flushed database, both fake servers reset, a short cooldown."""
    monkeypatch.setattr(get_settings(), "llm_cooldown_s", 30.0)
    second_fake.set_fault(None)
    second_fake.set_limits()
    second_fake.reset()
    async with flow_control_on(redis_db(redis_url, DB)) as client:
        yield client


def providers(a: ThreadedFakeLLM, b: ThreadedFakeLLM) -> tuple[LLMProvider, LLMProvider]:
    return LLMProvider(a.base_url, "key-a"), LLMProvider(b.base_url, "key-b")


async def run(tree: Tree[Any], bb: Any) -> tuple[Any, Context]:
    context = Context()
    async with context.using_blackboard(bb):
        result = await tree(context)
    return result, context


def llm_nodes(context: Context) -> list[Any]:
    return [node for node in context.trace_root().walk() if node.kind == "LLM"]


async def test_calls_go_to_the_deployment_with_the_most_spare_capacity(
    route: redis.Redis, fake_llm: ThreadedFakeLLM, second_fake: ThreadedFakeLLM
) -> None:
    a, b = providers(fake_llm, second_fake)
    # 40 and 10 calls per 15 s window (not a minute: the calls are paced through it, 20 calls took 20 s)
    deployments = [LLMDeployment(a, rpm=40, window_s=15), LLMDeployment(b, rpm=10, window_s=15)]
    model = LLMModel("fake-gpt", deployments=deployments)
    result, context = await run(batch(1), Batch([Ask(i, model) for i in range(20)]))
    assert result.is_ok()
    # each call takes the larger share left: A's 40 a window take four calls for each of B's 10
    assert 14 <= fake_llm.calls <= 18 and 2 <= second_fake.calls <= 6, (fake_llm.calls, second_fake.calls)
    assert fake_llm.calls + second_fake.calls == 20
    labels = {node.attributes["deployment"] for node in llm_nodes(context)}
    assert labels == {f"{fake_llm.base_url}|fake-gpt", f"{second_fake.base_url}|fake-gpt"}


async def test_weights_break_ties_between_deployments_without_limits(
    route: redis.Redis, fake_llm: ThreadedFakeLLM, second_fake: ThreadedFakeLLM
) -> None:
    a, b = providers(fake_llm, second_fake)
    model = LLMModel("fake-gpt", deployments=[LLMDeployment(a, weight=9), LLMDeployment(b, "fake-gpt-mini")])
    result, context = await run(batch(4), Batch([Ask(i, model) for i in range(60)]))
    assert result.is_ok()
    assert fake_llm.calls > 3 * second_fake.calls > 0, (fake_llm.calls, second_fake.calls)  # 9:1 expected
    assert second_fake.calls_per_model == {"fake-gpt-mini": second_fake.calls}  # the deployment's model name


async def test_a_failing_deployment_cools_down_and_its_calls_move_on(
    route: redis.Redis, fake_llm: ThreadedFakeLLM, second_fake: ThreadedFakeLLM, transport: str
) -> None:
    a, b = providers(fake_llm, second_fake)
    second_fake.set_fault("fail-503")
    # B first (weight): it fails after its retries, cools down fleet-wide, the call moves to A
    model = LLMModel("fake-gpt", deployments=[LLMDeployment(a), LLMDeployment(b, weight=10_000)])
    result, context = await run(AskTree, Ask(1, model))
    assert result.is_ok() and result.data.final_output == "answer 1"
    [node] = llm_nodes(context)
    attempts = node.attributes["llm_attempts"]
    on_b = [x for x in attempts if x["deployment"] == f"{second_fake.base_url}|fake-gpt"]
    assert len(on_b) == second_fake.calls >= 2 and {x["status"] for x in on_b} == {503}  # its retries, then moved
    assert attempts[-1] == {**attempts[-1], "deployment": f"{fake_llm.base_url}|fake-gpt", "status": 200}
    assert node.attributes["deployment"] == f"{fake_llm.base_url}|fake-gpt"
    assert node.attributes["transport"] == transport
    [move] = node.attributes["llm_route"]
    assert move["verdict"] == "move" and "503" in move["error"]
    paused_until = await route.hget(f"{limits.KEY_PREFIX}m:{second_fake.base_url}|fake-gpt", "p")
    seconds, micros = await route.time()
    assert float(paused_until) - (seconds * 1000 + micros / 1000) > 20_000  # the 30 s cooldown, in Redis
    # while B cools down, no call goes there, whatever its weight
    calls_on_b = second_fake.calls
    result, _ = await run(batch(4), Batch([Ask(i, model) for i in range(10)]))
    assert result.is_ok() and second_fake.calls == calls_on_b and fake_llm.calls == 11


async def test_the_fallback_chain_is_tried_in_order_after_every_deployment(
    route: redis.Redis, fake_llm: ThreadedFakeLLM, second_fake: ThreadedFakeLLM
) -> None:
    a, b = providers(fake_llm, second_fake)
    second_fake.set_fault("fail-500")
    broken = LLMModel("fake-gpt", deployments=[LLMDeployment(b), LLMDeployment(b, "fake-gpt-mini")])
    also_broken = LLMModel("fake-fail-429", a)
    model = dataclass_replace(broken, fallbacks=[also_broken, LLMModel("fake-echo", a), LLMModel("fake-unused", a)])
    result, context = await run(AskTree, Ask(2, model))
    assert result.is_ok() and result.data.model == "fake-echo"
    [node] = llm_nodes(context)
    moves = [(m["deployment"], m["tier"]) for m in node.attributes["llm_route"]]
    assert sorted(moves[:2]) == sorted([(f"{second_fake.base_url}|fake-gpt", "primary"),
                                        (f"{second_fake.base_url}|fake-gpt-mini", "primary")])
    assert moves[2:] == [(f"{fake_llm.base_url}|fake-fail-429", "fallback fake-fail-429")]
    assert node.attributes["route_tier"] == "fallback fake-echo"
    assert "fake-unused" not in fake_llm.calls_per_model
    assert {x["deployment"].split("|")[1] for x in node.attributes["llm_attempts"]} == {
        "fake-gpt", "fake-gpt-mini", "fake-fail-429", "fake-echo"}


async def test_a_prompt_too_long_goes_to_the_context_window_fallbacks(
    route: redis.Redis, fake_llm: ThreadedFakeLLM
) -> None:
    provider = LLMProvider(fake_llm.base_url, "k")
    small, smaller = LLMModel("fake-ctx-5", provider), LLMModel("fake-ctx-8", provider)
    model = LLMModel("fake-ctx-4", provider, fallbacks=[LLMModel("fake-not-for-context", provider)],
                     context_window_fallbacks=[small, smaller, LLMModel("fake-ctx-1000", provider)])
    result, context = await run(AskTree, Ask(3, model, text="REPLY:a prompt of eleven words that is far too long"))
    assert result.is_ok() and result.data.model == "fake-ctx-1000"
    [node] = llm_nodes(context)
    assert [m["verdict"] for m in node.attributes["llm_route"]] == ["context", "context", "context"]
    assert node.attributes["route_tier"] == "context-window fallback fake-ctx-1000"
    assert "fake-not-for-context" not in fake_llm.calls_per_model  # a context error is no outage
    # without context-window fallbacks the call FAILs with the provider's message, nothing cooled down
    result, context = await run(AskTree, Ask(4, LLMModel("fake-ctx-4", provider, fallbacks=[small]),
                                             text="REPLY:eleven words " * 3))
    assert result.is_fail()
    [node] = llm_nodes(context)
    assert "maximum context length is 4 tokens" in node.attributes["error"]
    assert not await route.hget(f"{limits.KEY_PREFIX}m:{fake_llm.base_url}|fake-ctx-4", "p")


async def test_a_request_error_fails_without_moving(route: redis.Redis, fake_llm: ThreadedFakeLLM) -> None:
    provider = LLMProvider(fake_llm.base_url, "k")
    model = LLMModel("fake-gpt", deployments=[LLMDeployment(provider)], fallbacks=[LLMModel("fake-echo", provider)])
    bad = Tree[Ask]("RouteBad").LLM(lambda b: b.model, lambda b: [{"role": "user", "content": "x"}],
                                    extra_headers={"X-Fake-Fault": "fail-401"}).End()
    result, context = await run(bad, Ask(5, model))
    assert result.is_fail() and fake_llm.calls == 1  # the request, not the deployment: no fallback would help
    [node] = llm_nodes(context)
    assert node.attributes["status_code"] == 401 and node.attributes["llm_route"][0]["verdict"] == "fail"


async def test_all_deployments_cooling_the_call_waits_for_the_earliest_or_fails_naming_them(
    route: redis.Redis, fake_llm: ThreadedFakeLLM, second_fake: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = providers(fake_llm, second_fake)
    model = LLMModel("fake-gpt", deployments=[LLMDeployment(a), LLMDeployment(b)])
    fake_llm.set_fault("fail-500")
    second_fake.set_fault("fail-500")
    monkeypatch.setattr(get_settings(), "llm_cooldown_s", 2.0)
    result, context = await run(AskTree, Ask(6, model))
    assert result.is_fail()
    [node] = llm_nodes(context)
    assert "no deployment or fallback left for 'fake-gpt'" in node.attributes["error"]
    # both cool down now: a call that may wait 0.5 s fails naming them and their cooldowns
    monkeypatch.setattr(get_settings(), "llm_route_wait_s", 0.5)
    calls = fake_llm.calls + second_fake.calls
    result, context = await run(AskTree, Ask(7, model))
    assert result.is_fail() and fake_llm.calls + second_fake.calls == calls  # nothing sent
    error = llm_nodes(context)[0].attributes["error"]
    assert "cooling down past this call's wait of 0.5 s" in error
    assert f"{fake_llm.base_url}|fake-gpt (" in error and f"{second_fake.base_url}|fake-gpt (" in error
    # a call that may wait longer waits for the earliest cooldown to end, then is served
    fake_llm.set_fault(None)
    monkeypatch.setattr(get_settings(), "llm_route_wait_s", 30.0)
    started = time.monotonic()
    result, context = await run(AskTree, Ask(8, model))
    assert result.is_ok() and result.data.final_output == "answer 8"
    assert time.monotonic() - started > 0.5  # it waited for a cooldown (2 s from the first call's failures)


async def test_cost_is_priced_with_the_deployment_that_served_the_call(
    route: redis.Redis, fake_llm: ThreadedFakeLLM, second_fake: ThreadedFakeLLM
) -> None:
    a, b = providers(fake_llm, second_fake)
    model = LLMModel("fake-gpt", input_price_per_m=1.0, output_price_per_m=1.0, deployments=[
        LLMDeployment(a, weight=10_000, input_price_per_m=100.0, output_price_per_m=200.0), LLMDeployment(b)])
    result, _ = await run(AskTree, Ask(9, model))
    usage = result.data.usage
    assert result.data.cost == pytest.approx((usage["prompt"] * 100 + usage["completion"] * 200) / 1e6)
    second_fake.set_fault(None)
    fake_llm.set_fault("fail-500")  # A fails: B serves at the model's prices
    result, _ = await run(AskTree, Ask(10, model))
    usage = result.data.usage
    assert result.data.cost == pytest.approx((usage["prompt"] + usage["completion"]) / 1e6)


async def test_a_model_named_in_the_settings_is_routed(
    route: redis.Redis, fake_llm: ThreadedFakeLLM, second_fake: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTE_TEST_KEY", "sk-from-env")
    table = {
        "team-model": {"deployments": [{"base_url": second_fake.base_url, "api_key_env": "ROUTE_TEST_KEY",
                                        "model_name": "fake-gpt-mini", "rpm": 100}],
                       "fallbacks": ["team-backup"]},
        "team-backup": {"deployments": [{"base_url": fake_llm.base_url, "api_key": "k", "model_name": "fake-echo"}]},
    }
    monkeypatch.setattr(get_settings(), "llm_deployments", table)
    second_fake.set_fault("fail-500", after_calls=1)
    first, _ = await run(AskTree, Ask(11, "team-model"))
    second, context = await run(AskTree, Ask(12, "team-model"))
    assert first.is_ok() and first.data.model == "fake-gpt-mini"
    assert second.is_ok() and second.data.model == "fake-echo"
    assert llm_nodes(context)[0].attributes["route_tier"] == "fallback team-backup"
    meta = second_fake.request_meta[0]
    assert meta["headers"]["authorization"] == "Bearer sk-from-env"


def test_bad_settings_entries_are_named() -> None:
    with pytest.raises(ValueError, match=r"TASKTREE_LLM_DEPLOYMENTS\['m'\].deployments\[0\]: .*base_url"):
        routing.models_from_settings({"m": {"deployments": [{"url": "http://x"}]}})
    with pytest.raises(ValueError, match=r"\['m'\].deployments\[0\]: LLMDeployment.rpm must be a positive"):
        routing.models_from_settings({"m": {"deployments": [{"base_url": "http://x", "rpm": 0}]}})
    with pytest.raises(ValueError, match=r"'NOPE_NOT_SET' \(api_key_env\) is not set"):
        routing.models_from_settings({"m": {"deployments": [{"base_url": "http://x", "api_key_env": "NOPE_NOT_SET"}]}})
    with pytest.raises(ValueError, match=r"\['m'\].fallbacks: expected a list of model names"):
        routing.models_from_settings({"m": {"fallbacks": "other"}})
    with pytest.raises(TypeError, match="deployments: expected LLMDeployment"):
        LLMModel("m", deployments=["http://x"])


def dataclass_replace(model: LLMModel, **changes: Any) -> LLMModel:
    import dataclasses

    return dataclasses.replace(model, **changes)
