"""The fake LLM server's rate limits: fixed windows per model, 429 with Retry-After, counters a test can trust."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from tasktree_dist.testing.fake_limits import WindowLimits
from tasktree_dist.testing.fake_llm import FakeLLMServer, ThreadedFakeLLM, parse_args


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def chat(http: httpx.AsyncClient, model: str, text: str, **body: Any) -> httpx.Response:
    return await http.post("/v1/chat/completions", json={"model": model, "messages": user(text), **body})


async def test_requests_over_the_window_limit_get_429_with_retry_after_and_are_not_admitted() -> None:
    # a 60 s window: the test cannot straddle two windows unless it runs at the very end of one (then it retries)
    async with FakeLLMServer(rpm=3, window_s=60) as server, httpx.AsyncClient(base_url=server.url) as http:
        answers = [await chat(http, "fake-gpt", f"n{i}") for i in range(5)]
        other = await chat(http, "fake-gpt-mini", "own counters")
        stats = server.stats.snapshot()["limits"]
    if len({w["index"] for w in stats["windows"] if w["model"] == "fake-gpt"}) > 1:
        pytest.skip("the requests straddled two windows")
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert other.status_code == 200
    refused = answers[3]
    assert 0 < float(refused.headers["retry-after-ms"]) <= 60_000
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "3 requests per 60 s window" in refused.json()["error"]["message"]
    [window] = [w for w in stats["windows"] if w["model"] == "fake-gpt"]
    assert (window["requests"], window["rejected"]) == (3, 2)
    assert stats["max_window_requests"] == 3 and stats["windows_over_limit"] == 1 and stats["rate_limited"] == 2


async def test_tokens_count_prompt_and_completion_and_max_tokens_cuts_the_answer() -> None:
    async with FakeLLMServer(tpm=12, window_s=60) as server, httpx.AsyncClient(base_url=server.url) as http:
        cut = await chat(http, "fake-gpt", "REPLY:one two three four five", max_tokens=2)  # 5 words + 2 tokens
        body = cut.json()
        assert body["choices"][0]["message"]["content"] == "one two"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["total_tokens"] == 7
        fits = await chat(http, "fake-gpt", "REPLY:a b")  # 2 + 2 tokens: 11 in the window
        over = await chat(http, "fake-gpt", "REPLY:x")  # 2 more: over 12
        stats = server.stats.snapshot()["limits"]
    if len(stats["windows"]) > 1:
        pytest.skip("the requests straddled two windows")
    assert (fits.status_code, over.status_code) == (200, 429)
    assert "12 tokens per 60 s window" in over.json()["error"]["message"]
    assert stats["max_window_tokens"] == 11


def test_windows_are_aligned_to_the_clock_and_counted_per_model() -> None:
    limits = WindowLimits(rpm=2, window_s=10)
    assert limits.admit("a", 1, now=100.0) is None
    assert limits.admit("a", 1, now=109.9) is None
    refusal = limits.admit("a", 1, now=109.95)
    assert refusal is not None and refusal.reason == "requests" and refusal.retry_after_s == pytest.approx(0.05)
    assert limits.admit("a", 1, now=110.0) is None  # the next window
    assert limits.admit("b", 1, now=109.99) is None
    snapshot = limits.snapshot()
    assert [(w["model"], w["start"], w["requests"], w["rejected"]) for w in snapshot["windows"]] == [
        ("a", 100.0, 2, 1), ("a", 110.0, 1, 0), ("b", 100.0, 1, 0),
    ]
    limits.configure(rpm=1, window_s=10, models={"a"})
    assert limits.applies_to("a") and not limits.applies_to("b")


async def test_limits_through_openai_and_the_threaded_server(fake_llm: ThreadedFakeLLM) -> None:
    fake_llm.set_limits(rpm=1, window_s=60, models={"fake-limited"})
    async with openai.AsyncOpenAI(base_url=fake_llm.base_url, api_key="k", max_retries=0) as client:
        await client.chat.completions.create(model="fake-limited", messages=user("a"))
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="fake-limited", messages=user("b"))
        await client.chat.completions.create(model="fake-gpt", messages=user("unlimited"))
    async with httpx.AsyncClient(base_url=fake_llm.url) as http:
        stats = (await http.get("/stats")).json()
    if stats["limits"]["windows_over_limit"] == 0:
        pytest.skip("the two requests straddled two windows")
    assert stats["limits"]["rpm"] == 1 and stats["limits"]["rate_limited"] == 1
    assert [(model, status) for model, _, _, status in fake_llm.stats.answers] == [
        ("fake-limited", 200), ("fake-limited", 429), ("fake-gpt", 200),
    ]


async def test_fault_retry_after_header_and_per_model_concurrency(fake_llm: ThreadedFakeLLM) -> None:
    async with httpx.AsyncClient(base_url=fake_llm.url) as http:
        faulted = await http.post(
            "/v1/chat/completions", json={"model": "fake-gpt", "messages": user("x")},
            headers={"X-Fake-Fault": "fail-429", "X-Fake-Retry-After": "1.5"},
        )
        assert faulted.status_code == 429
        assert faulted.headers["retry-after-ms"] == "1500" and faulted.headers["retry-after"] == "2"
        fake_llm.set_latency(100)
        await asyncio.gather(*(chat(http, "fake-a", "a") for _ in range(3)), chat(http, "fake-b", "b"))
    assert fake_llm.stats.snapshot()["max_concurrent_per_model"] == {"fake-gpt": 1, "fake-a": 3, "fake-b": 1}


def test_cli_flags() -> None:
    args = parse_args(["--rpm", "60", "--tpm", "1000", "--window-s", "5", "--limit-model", "m1",
                       "--limit-model", "m2"])
    assert (args.rpm, args.tpm, args.window_s, args.limit_model) == (60, 1000, 5.0, ["m1", "m2"])
    assert parse_args([]).rpm is None


async def test_an_unlimited_server_counts_no_windows() -> None:
    with ThreadedFakeLLM() as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await chat(http, "fake-gpt", "a")).status_code == 200
        assert server.stats.snapshot()["limits"]["windows"] == []
