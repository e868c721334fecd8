"""Tests of the fake LLM server through the real openai.AsyncOpenAI client over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from tasktree_dist.testing.fake_llm import FakeLLMServer, ThreadedFakeLLM, decide_reply, in_flight_timeline

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    },
}


def user(text: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
async def client(fake_llm: ThreadedFakeLLM) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake_llm.base_url, api_key="test", max_retries=0, timeout=5) as c:
        yield c


async def collect_stream(stream: Any) -> tuple[str, dict[int, dict[str, str]], list[str | None], Any]:
    """Reassemble content, tool calls (by index), finish reasons and usage from chunks."""
    content, calls, finishes, usage = "", {}, [], None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finishes.append(choice.finish_reason)
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += tc.id or ""
                slot["name"] += (tc.function.name or "") if tc.function else ""
                slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
    return content, calls, finishes, usage


# ----------------------------------------------------------------------------- text replies


async def test_echo_non_stream_with_usage(client: openai.AsyncOpenAI, fake_llm: ThreadedFakeLLM) -> None:
    resp = await client.chat.completions.create(model="fake-gpt", messages=user("hello there world"))
    assert resp.object == "chat.completion"
    assert resp.model == "fake-gpt"
    assert resp.choices[0].message.content == "echo: hello there world"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (3, 4, 7)
    assert fake_llm.calls == 1
    assert fake_llm.requests[0]["messages"] == user("hello there world")


async def test_echo_content_parts(client: openai.AsyncOpenAI) -> None:
    parts = [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]
    resp = await client.chat.completions.create(model="fake-gpt", messages=user(parts))
    assert resp.choices[0].message.content == "echo: part one part two"


async def test_echo_stream_with_include_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="fake-gpt", messages=user("one two three four"), stream=True, stream_options={"include_usage": True}
    )
    content, calls, finishes, usage = await collect_stream(stream)
    assert content == "echo: one two three four"
    assert calls == {}
    assert finishes.count("stop") == 1 and finishes[-1] == "stop"
    assert len(finishes) > 3  # really split into several chunks
    assert usage is not None and usage.completion_tokens == 5 and usage.total_tokens == usage.prompt_tokens + 5


async def test_stream_without_include_usage_has_no_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="fake-gpt", messages=user("hi"), stream=True)
    content, _, _, usage = await collect_stream(stream)
    assert content == "echo: hi"
    assert usage is None


async def test_reply_directive(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model="fake-gpt", messages=user('Answer as JSON REPLY:{"a": [1, 2]}'))
    assert json.loads(resp.choices[0].message.content or "") == {"a": [1, 2]}


# ----------------------------------------------------------------------------- tools


async def test_tool_call_inferred_from_prompt(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="fake-gpt", messages=user("What is the weather in Tokyo?"), tools=[WEATHER_TOOL]
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Tokyo"}


async def test_tool_named_in_prompt_is_chosen(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="fake-gpt", messages=user("please use search for Python"), tools=[WEATHER_TOOL, SEARCH_TOOL]
    )
    (call,) = resp.choices[0].message.tool_calls or []
    assert call.function.name == "search" and json.loads(call.function.arguments) == {"q": "Python"}


async def test_no_tool_call_without_tools(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model="fake-gpt", messages=user("weather in Tokyo"))
    assert resp.choices[0].message.content == "echo: weather in Tokyo"


async def test_tool_call_stream_reassembles_arguments(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="fake-gpt",
        messages=user('CALL:get_weather({"city": "Oslo", "unit": "c"})'),
        tools=[WEATHER_TOOL],
        stream=True,
    )
    content, calls, finishes, _ = await collect_stream(stream)
    assert content == ""
    assert finishes[-1] == "tool_calls"
    assert len(finishes) >= 4  # head + several argument fragments + finish
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Oslo", "unit": "c"}


async def test_multiple_call_directives(client: openai.AsyncOpenAI) -> None:
    text = 'CALL:get_weather({"city": "Rome"}) and CALL:search({"q": "f(x) = (1)"}) CALL:unknown_tool({})'
    tools = [WEATHER_TOOL, SEARCH_TOOL]
    resp = await client.chat.completions.create(model="fake-gpt", messages=user(text), tools=tools)
    calls = resp.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "search", "unknown_tool"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Rome"}, {"q": "f(x) = (1)"}, {}]
    assert len({c.id for c in calls}) == 3


async def test_multiple_calls_streamed(client: openai.AsyncOpenAI) -> None:
    text = 'CALL:get_weather({"city": "Rome"}) CALL:search({"q": "pasta"})'
    stream = await client.chat.completions.create(
        model="fake-gpt", messages=user(text), tools=[WEATHER_TOOL, SEARCH_TOOL], stream=True
    )
    _, calls, _, _ = await collect_stream(stream)
    assert [calls[i]["name"] for i in (0, 1)] == ["get_weather", "search"]
    assert json.loads(calls[1]["arguments"]) == {"q": "pasta"}


async def test_callraw_passes_malformed_arguments_verbatim(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="fake-gpt", messages=user('CALLRAW:get_weather({"city": "Oslo",)'), tools=[WEATHER_TOOL]
    )
    (call,) = resp.choices[0].message.tool_calls or []
    assert call.function.arguments == '{"city": "Oslo",'


async def test_tool_results_reply(client: openai.AsyncOpenAI) -> None:
    messages = [
        {"role": "user", "content": "weather in Tokyo and Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny 25C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain 12C"},
    ]
    resp = await client.chat.completions.create(model="fake-gpt", messages=messages, tools=[WEATHER_TOOL])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == "tool results: sunny 25C; rain 12C"


# ----------------------------------------------------------------------------- faults


async def test_fault_429_by_model(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="flaky-fail-429", messages=user("hi"))
    assert info.value.status_code == 429


async def test_fault_500_by_header(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="fake-gpt", messages=user("hi"), extra_headers={"X-Fake-Fault": "fail-500"}
        )


async def test_fault_any_status_by_header_and_request_meta(
    client: openai.AsyncOpenAI, fake_llm: ThreadedFakeLLM
) -> None:
    with pytest.raises(openai.NotFoundError, match="Fake error 404"):
        await client.chat.completions.create(
            model="fake-gpt", messages=user("hi"), extra_headers={"X-Fake-Fault": "fail-404"}, extra_query={"q": "1"}
        )
    (meta,) = fake_llm.request_meta
    assert meta["headers"]["x-fake-fault"] == "fail-404" and meta["query"] == {"q": "1"}


async def test_fault_timeout(client: openai.AsyncOpenAI) -> None:
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="timeout", messages=user("hi"), timeout=0.5)
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("stream", [False, True])
async def test_fault_malformed(client: openai.AsyncOpenAI, stream: bool) -> None:
    with pytest.raises((openai.APIError, ValueError)):
        resp = await client.chat.completions.create(model="malformed", messages=user("hi"), stream=stream)
        if stream:
            await collect_stream(resp)


async def test_fault_truncated_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="truncated", messages=user("a b c d e f"), stream=True)
    finishes: list[str | None] = []
    with pytest.raises(Exception):  # noqa: B017 - transport-level error type depends on the HTTP stack
        _, _, finishes, _ = await collect_stream(stream)
    assert "stop" not in finishes


async def test_fault_truncated_non_stream(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="truncated", messages=user("hi"))


async def test_fail_first_n_then_succeeds_with_retries(fake_llm: ThreadedFakeLLM) -> None:
    async with openai.AsyncOpenAI(base_url=fake_llm.base_url, api_key="t", max_retries=3) as retrying:
        resp = await retrying.chat.completions.create(model="fail-429-first-2", messages=user("retry me"))
    assert resp.choices[0].message.content == "echo: retry me"
    assert fake_llm.calls_per_model["fail-429-first-2"] == 3


async def test_fail_times_header_is_per_model(client: openai.AsyncOpenAI) -> None:
    headers = {"X-Fake-Fault": "fail-500", "X-Fake-Fail-Times": "1"}
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="model-a", messages=user("x"), extra_headers=headers)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="model-b", messages=user("x"), extra_headers=headers)
    ok = await client.chat.completions.create(model="model-a", messages=user("x"), extra_headers=headers)
    assert ok.choices[0].message.content == "echo: x"


async def test_once_suffix_and_bad_numeric_headers(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="fail-429-once", messages=user("x"))
    ok = await client.chat.completions.create(
        model="fail-429-once", messages=user("x"), extra_headers={"X-Fake-Latency-Ms": "soon"}
    )
    assert ok.choices[0].message.content == "echo: x"


# ----------------------------------------------------------------------------- cost, latency, stats


async def test_cost_header_and_priced_model(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="fake-gpt", messages=user("hi"), extra_headers={"X-Fake-Cost": "0.0125"}
    )
    assert resp.usage is not None and resp.usage.model_extra == {"cost": 0.0125}
    priced = await client.chat.completions.create(model="fake-priced", messages=user("hi"))
    assert priced.usage is not None and (priced.usage.model_extra or {})["cost"] > 0
    plain = await client.chat.completions.create(model="fake-gpt", messages=user("hi"))
    assert plain.usage is not None and "cost" not in (plain.usage.model_extra or {})


async def test_latency_is_concurrent(client: openai.AsyncOpenAI, fake_llm: ThreadedFakeLLM) -> None:
    """Two calls are served at once, not one after the other (the server's own count, not a clock)."""
    fake_llm.set_latency(200)
    fake_llm.reset()
    start = time.monotonic()
    await asyncio.gather(*(client.chat.completions.create(model="fake-gpt", messages=user("x")) for _ in range(2)))
    assert fake_llm.max_concurrent == 2
    assert time.monotonic() - start >= 0.2  # each waited its latency


async def test_latency_header_override(client: openai.AsyncOpenAI) -> None:
    start = time.monotonic()
    await client.chat.completions.create(
        model="fake-gpt", messages=user("x"), extra_headers={"X-Fake-Latency-Ms": "150"}
    )
    assert time.monotonic() - start >= 0.15


async def test_models_listing(client: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in client.models.list()]
    assert "fake-gpt" in ids and len(ids) >= 3


async def test_stats_and_reset_endpoints(client: openai.AsyncOpenAI, fake_llm: ThreadedFakeLLM) -> None:
    await client.chat.completions.create(model="fake-gpt", messages=user("a"))
    await client.chat.completions.create(model="fake-gpt-mini", messages=user("b"))
    async with httpx.AsyncClient(base_url=fake_llm.url) as http:
        stats = (await http.get("/stats")).json()
        assert stats["calls"] == 2
        assert stats["calls_per_model"] == {"fake-gpt": 1, "fake-gpt-mini": 1}
        assert stats["max_concurrent"] >= 1 and stats["in_flight"] == 0
        full = (await http.get("/stats", params={"include_requests": "1"})).json()
        assert [r["model"] for r in full["requests"]] == ["fake-gpt", "fake-gpt-mini"]
        assert (await http.post("/reset")).json() == {"ok": True}
        assert (await http.get("/stats")).json()["calls"] == 0
    assert fake_llm.calls == 0 and fake_llm.requests == []


async def test_300_concurrent_requests(client: openai.AsyncOpenAI, fake_llm: ThreadedFakeLLM) -> None:
    fake_llm.set_latency(300)
    results = await asyncio.gather(
        *(client.chat.completions.create(model="fake-gpt", messages=user(f"n{i}")) for i in range(300))
    )
    assert [r.choices[0].message.content for r in results] == [f"echo: n{i}" for i in range(300)]
    assert fake_llm.calls == 300
    assert fake_llm.max_concurrent >= 100


# ----------------------------------------------------------------------------- in-process server


async def test_in_process_server_stops_quickly_with_hanging_request() -> None:
    server = FakeLLMServer(port=0)
    await server.start()
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="t", max_retries=0, timeout=30) as c:
        hanging = asyncio.create_task(c.chat.completions.create(model="timeout", messages=user("x")))
        await server.wait_for_in_flight(1)
        start = time.monotonic()
        await server.stop()
        assert time.monotonic() - start < 2
        with pytest.raises(openai.APIError):
            await hanging


def test_decide_reply_rules() -> None:
    assert decide_reply({"messages": user("hi")}).content == "echo: hi"
    assert decide_reply({"messages": user("x REPLY: exact ")}).content == " exact "
    fallback = decide_reply({"messages": user("what is the weather?"), "tools": [WEATHER_TOOL]})
    assert json.loads(fallback.tool_calls[0].arguments) == {"city": "Paris"}
    assert decide_reply({"messages": []}).content == "echo: "


async def test_client_giving_up_frees_the_handler(client: openai.AsyncOpenAI, fake_llm: ThreadedFakeLLM) -> None:
    hanging = asyncio.create_task(client.chat.completions.create(model="timeout", messages=user("x")))
    await fake_llm.wait_for_in_flight(1)
    hanging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hanging
    assert await asyncio.to_thread(fake_llm.stats.wait_until, lambda s: s.in_flight == 0, 5.0)
    await fake_llm.wait_for_calls(1)


def test_in_flight_timeline_counts_the_mean_in_flight_and_the_gaps_with_none() -> None:
    # two calls overlapping from 0 to 2, nothing from 2 to 3, one call from 3 to 4 (a client's two waves)
    line = in_flight_timeline([(0.0, 2.0), (1.0, 2.0), (3.0, 4.0)])
    assert line == {"span_s": 4.0, "mean_in_flight": 1.0, "idle_s": 1.0, "idle_gaps": 1}
    assert in_flight_timeline([])["idle_gaps"] == 0


def test_stats_carry_the_timeline_of_answered_calls(fake_llm: ThreadedFakeLLM) -> None:
    for i in range(3):
        httpx.post(f"{fake_llm.base_url}/chat/completions", json={
            "model": "fake-gpt", "messages": [{"role": "user", "content": f"n{i}"}]}, timeout=10)
    timeline = fake_llm.stats.snapshot()["timeline"]
    assert timeline["mean_in_flight"] > 0 and timeline["idle_gaps"] == 2  # one call at a time: a gap between each
