"""Batch mode's shared state (llm/batch.py) on a real redis-server against the fake server's Batch API over HTTP:
two queues stand for two processes of the fleet (own Redis connections, own tokens). A pending batch is shared
and submitted once at its size or its age; each call's outcome is read by custom_id; errored requests, expired
batches, bad output files and a provider without a Batch API end calls not ok with the reason; one poller per
batch, taken over when its lease runs out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis

from broker_config import TasktreeSettings
from tasktree_dist import close_llm_clients
from tasktree_dist.llm.batch import KEY, BatchError, BatchQueue
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tests.helpers import eventually, redis_db

pytestmark = pytest.mark.timeout(60)

DB = 10


def body(i: int) -> dict[str, Any]:
    return {"model": "fake-gpt", "messages": [{"role": "user", "content": f"REPLY:answer {i}"}], "max_tokens": 8}


def text(outcome: Any) -> str:
    return outcome.body["choices"][0]["message"]["content"]


@pytest.fixture
async def queues(redis_url: str, fake_llm: ThreadedFakeLLM) -> AsyncIterator[tuple[BatchQueue, BatchQueue]]:
    url = redis_db(redis_url, DB)
    client = redis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
    settings = TasktreeSettings(redis_url=url, llm_batch_max_requests=5, llm_batch_max_wait_s=0.5,
                                llm_batch_poll_s=0.05, llm_batch_lease_s=1.0)
    pair = BatchQueue(url, settings), BatchQueue(url, settings)
    try:
        yield pair
    finally:
        for queue in pair:
            await queue.aclose()
        await close_llm_clients()


async def add(queue: BatchQueue, fake: ThreadedFakeLLM, i: int) -> str:
    return await queue.add(fake.base_url, "k", "fake-gpt", body(i))


async def test_the_fleet_shares_pending_batches_submitted_at_their_size_or_their_age(
    queues: tuple[BatchQueue, BatchQueue], fake_llm: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = queues
    # the 12 calls must all be added before a pending batch is old enough to go (a loaded machine, the first
    # submission importing openai on the loop): the last two then go by age
    monkeypatch.setattr(a.settings, "llm_batch_max_wait_s", 3.0)
    ids = [await add((a, b)[i % 2], fake_llm, i) for i in range(12)]  # two processes fill the same batches
    outcomes = await asyncio.wait_for(asyncio.gather(*((a, b)[i % 2].wait(cid) for i, cid in enumerate(ids))), 30)
    assert [o.ok for o in outcomes] == [True] * 12
    assert [text(o) for o in outcomes] == [f"answer {i}" for i in range(12)]
    batches = fake_llm.batches.batches
    assert sorted(batch["request_counts"]["total"] for batch in batches.values()) == [2, 5, 5]  # 5, 5, then by age
    assert a.stats["batches"] + b.stats["batches"] == 3 and a.stats["batches"] and b.stats["batches"]
    assert {o.batch_id for o in outcomes} == set(batches)


async def test_errored_requests_and_expired_batches_end_their_calls_not_ok_with_the_reason(
    queues: tuple[BatchQueue, BatchQueue], fake_llm: ThreadedFakeLLM
) -> None:
    a, _ = queues
    fake_llm.batches.configure(error_share=0.2)
    ids = [await add(a, fake_llm, i) for i in range(5)]
    outcomes = await asyncio.wait_for(asyncio.gather(*(a.wait(cid) for cid in ids)), 30)
    assert [o.ok for o in outcomes] == [True, True, True, True, False]
    assert "request errored (HTTP 500)" in outcomes[4].error and "The server had an error" in outcomes[4].error
    fake_llm.batches.configure(outcome="expired")
    ids = [await add(a, fake_llm, i) for i in range(5)]
    outcomes = await asyncio.wait_for(asyncio.gather(*(a.wait(cid) for cid in ids)), 30)
    assert [o.ok for o in outcomes] == [True, True, False, False, False]
    assert "[batch_expired]" in outcomes[3].error


async def test_a_batch_cancelled_outside_the_fleet_and_an_output_file_that_is_not_jsonl(
    queues: tuple[BatchQueue, BatchQueue], fake_llm: ThreadedFakeLLM
) -> None:
    a, _ = queues
    fake_llm.batches.configure(delay_s=60)
    ids = [await add(a, fake_llm, i) for i in range(5)]
    waiting = asyncio.ensure_future(asyncio.gather(*(a.wait(cid) for cid in ids)))
    batch_id = await _batch_of(a, ids[0])
    await a.cancel(batch_id)  # as the provider's console would
    outcomes = await asyncio.wait_for(waiting, 30)
    assert not any(o.ok for o in outcomes)
    assert f"batch {batch_id} ended cancelled without this request's result" == outcomes[0].error
    fake_llm.batches.configure(delay_s=0, output_override=b"this is not JSONL\n{\"no\": \"custom id\"}\n")
    ids = [await add(a, fake_llm, i) for i in range(5)]
    outcomes = await asyncio.wait_for(asyncio.gather(*(a.wait(cid) for cid in ids)), 30)
    assert not any(o.ok for o in outcomes)
    assert "ended completed without this request's result (2 unreadable lines in its files)" in outcomes[0].error


async def _batch_of(queue: BatchQueue, custom_id: str) -> str:
    return await eventually(lambda: queue.batch_of(custom_id), "the call's batch submitted", within=10)


async def test_a_provider_without_a_batch_api_is_remembered_and_its_calls_told_to_go_live(
    queues: tuple[BatchQueue, BatchQueue], fake_llm: ThreadedFakeLLM
) -> None:
    a, b = queues
    fake_llm.batches.configure(enabled=False)
    ids = [await add(a, fake_llm, i) for i in range(5)]
    outcomes = await asyncio.wait_for(asyncio.gather(*(a.wait(cid) for cid in ids)), 30)
    assert {o.error for o in outcomes} == {f"{fake_llm.base_url} has no Batch API (404 on /v1/batches)"}
    with pytest.raises(BatchError, match="has no Batch API"):  # the other process knows it too
        await add(b, fake_llm, 6)


async def test_one_poller_per_batch_and_a_dead_pollers_batch_is_taken_over(
    queues: tuple[BatchQueue, BatchQueue], fake_llm: ThreadedFakeLLM
) -> None:
    a, b = queues
    fake_llm.batches.configure(delay_s=0.5)
    ids = [await add((a, b)[i % 2], fake_llm, i) for i in range(5)]
    outcomes = await asyncio.wait_for(asyncio.gather(*((a, b)[i % 2].wait(cid) for i, cid in enumerate(ids))), 30)
    assert all(o.ok for o in outcomes)
    assert min(a.stats["polls"], b.stats["polls"]) <= 1 < max(a.stats["polls"], b.stats["polls"])
    # a poller that died holding the lease: after the lease (1 s) another process polls the batch
    ids = [await add(a, fake_llm, i) for i in range(5)]
    batch_id = await _batch_of(a, ids[0])
    await a.redis.set(f"{KEY}lease:{batch_id}", "a-dead-process", px=1000)
    polls = a.stats["polls"] + b.stats["polls"]
    outcomes = await asyncio.wait_for(asyncio.gather(*(b.wait(cid) for cid in ids)), 30)
    assert all(o.ok for o in outcomes) and a.stats["polls"] + b.stats["polls"] > polls


async def test_every_key_it_writes_has_a_ttl(queues: tuple[BatchQueue, BatchQueue], fake_llm: ThreadedFakeLLM) -> None:
    a, _ = queues
    ids = [await add(a, fake_llm, i) for i in range(7)]
    await asyncio.wait_for(asyncio.gather(*(a.wait(cid) for cid in ids)), 30)
    keys = [key async for key in a.redis.scan_iter(f"{KEY}*")]
    ttls = {key: await a.redis.pttl(key) for key in keys}
    assert ttls and all(ttl > 0 or ttl == -2 for ttl in ttls.values()), {k: t for k, t in ttls.items() if t <= 0}


async def test_in_process_and_streaming_batch_calls_go_live_saying_so(fake_llm: ThreadedFakeLLM) -> None:
    from tasktree_dist import Context, LLMModel, Tree

    model = LLMModel("fake-gpt", batch=True)
    for stream in (False, True):
        tree = Tree(f"BatchLive{stream}").LLM(model, [{"role": "user", "content": "REPLY:live"}], stream=stream,
                                              api_key="k", base_url=fake_llm.base_url).End()
        context = Context()
        async with context.using_blackboard({}):
            result = await tree(context)
        assert result.is_ok() and result.data.final_output == "live"
        [trace] = [n for n in context.trace_root().walk() if n.kind == "LLM"]
        assert trace.attributes["batch"] == "live"
        why = "a streaming call" if stream else "an in-process run (no fleet)"
        assert trace.attributes["batch_live_reason"] == f"batch mode: {why} goes live"
    assert fake_llm.calls == 2 and not fake_llm.batches.batches
    await close_llm_clients()


async def test_a_call_added_again_with_its_custom_id_goes_in_its_batch_once(
    queues: tuple[BatchQueue, BatchQueue], fake_llm: ThreadedFakeLLM
) -> None:
    a, b = queues
    first = await a.add(fake_llm.base_url, "k", "fake-gpt", body(1), "tt-unit-1")
    again = await b.add(fake_llm.base_url, "k", "fake-gpt", body(1), "tt-unit-1")  # a re-dispatched unit
    assert first == again == "tt-unit-1"
    ids = [first, *[await add(a, fake_llm, i) for i in range(2, 6)]]
    outcomes = await asyncio.wait_for(asyncio.gather(*(a.wait(cid) for cid in ids), b.wait(again)), 30)
    assert all(o.ok for o in outcomes) and text(outcomes[-1]) == "answer 1"
    [batch] = fake_llm.batches.batches.values()
    assert batch["request_counts"]["total"] == 5


async def test_a_batch_answer_that_is_no_chat_completion_goes_live_and_fail_fails(
    redis_url: str, fake_llm: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with a run id (as on a worker) in this process: batch mode end to end through the node."""
    from tasktree_dist import Context, LLMModel, Tree
    from tasktree_dist.core.settings import get_settings
    from tasktree_dist.llm.batch import close_batch_queues

    url = redis_db(redis_url, DB)
    for name, value in (("redis_url", url), ("llm_batch_max_wait_s", 0.2), ("llm_batch_poll_s", 0.05)):
        monkeypatch.setattr(get_settings(), name, value)
    monkeypatch.setattr(fake_llm.batches, "answer", lambda body: {"object": "not a chat completion"})
    results = []
    for fallback in ("live", "fail"):
        tree = Tree(f"BatchOdd{fallback}").LLM(LLMModel("fake-gpt", batch=True, batch_fallback=fallback),
                                               [{"role": "user", "content": "REPLY:live"}], api_key="k",
                                               base_url=fake_llm.base_url).End()
        context = Context(run_id=f"run-{fallback}")
        async with context.using_blackboard({}):
            result = await asyncio.wait_for(tree(context), 30)
        [trace] = [n for n in context.trace_root().walk() if n.kind == "LLM"]
        results.append((result, trace.attributes))
    await close_batch_queues()
    await close_llm_clients()
    (live, live_trace), (failed, failed_trace) = results
    assert live.is_ok() and live.data.final_output == "live" and live_trace["batch"] == "fallback"
    assert "response has no choices" in live_trace["batch_error"]
    assert failed.is_fail() and failed_trace["batch"] == "failed" and "BatchError" in failed_trace["error"]
    assert fake_llm.calls == 1 and len(fake_llm.batches.batches) == 2


async def _dies_after(queue: BatchQueue, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`queue` stands for a process that dies right after `step` of a submission: what it did stays in Redis,
    nothing after it happens, and it never supervises batches."""
    async def died(*_: Any) -> None:
        return None

    monkeypatch.setattr(queue, step, died)
    monkeypatch.setattr(queue, "ensure_supervising", lambda: None)


async def test_a_batch_sealed_but_never_created_is_submitted_by_another_process(
    queues: tuple[BatchQueue, BatchQueue], fake_llm: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = queues
    await _dies_after(a, "_submit", monkeypatch)  # sealed (its 5th call), then gone before the upload
    ids = [await add(a, fake_llm, i) for i in range(5)]
    assert not fake_llm.batches.batches and await a.redis.zcard(f"{KEY}index:sealed") == 1
    outcomes = await asyncio.wait_for(asyncio.gather(*(b.wait(cid) for cid in ids)), 30)  # after its lease (1 s)
    assert [text(o) for o in outcomes] == [f"answer {i}" for i in range(5)]
    [batch] = fake_llm.batches.batches.values()
    assert batch["request_counts"]["total"] == 5 and b.stats["recovered"] == 1
    assert await a.redis.zcard(f"{KEY}index:sealed") == 0


async def test_a_batch_created_but_not_recorded_is_found_at_the_provider_not_paid_twice(
    queues: tuple[BatchQueue, BatchQueue], fake_llm: ThreadedFakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of a worker killed between the provider's answer to `create` and recording the batch: its calls
    waited for a batch nobody polled. The seal token in the batch's metadata finds it again."""
    a, b = queues
    await _dies_after(a, "_record_submitted", monkeypatch)
    ids = [await add(a, fake_llm, i) for i in range(5)]
    await eventually(lambda: _created(fake_llm), "the batch created at the provider", within=10)
    assert await a.batch_of(ids[0]) is None  # not recorded: nobody would poll it
    outcomes = await asyncio.wait_for(asyncio.gather(*(b.wait(cid) for cid in ids)), 30)
    assert [text(o) for o in outcomes] == [f"answer {i}" for i in range(5)]
    [batch] = fake_llm.batches.batches.values()  # found, not submitted again
    assert {o.batch_id for o in outcomes} == {batch["id"]} and b.stats["recovered"] == 1


async def _created(fake: ThreadedFakeLLM) -> bool:
    return bool(fake.batches.batches)
