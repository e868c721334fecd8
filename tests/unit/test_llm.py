"""The LLM node against the fake OpenAI-compatible server, through the real openai client over real HTTP.

Covers the request side (model / messages / stream as values and factories, api_key and base_url resolution,
client_kwargs, extra_body and call-kwargs layering, client options), streaming callbacks, the tool-call loop of
the spec's WeatherAgent, tool failures, the LLMRunRecord, and what lands on the trace (tokens, cost, chat).
Provider failures, fallback chains and client reuse are in test_llm_errors.py.
"""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest

from tasktree_dist import (
    LLM,
    Context,
    LLMModel,
    LLMProvider,
    LLMRunRecord,
    Result,
    Status,
    Tool,
    ToolCall,
    ToolResult,
    TraceNode,
    Tracer,
    Tree,
    get_llm_client,
)
from tasktree_dist.llm.clients import llm_client_count
from tasktree_dist.testing.fake_llm import COMPLETION_PRICE_USD, PROMPT_PRICE_USD, ThreadedFakeLLM
from tests.helpers import llm_nodes, user

KEY = "sk-test"
pytestmark = pytest.mark.usefixtures("llm_clients_closed")


# --------------------------------------------------------------------------- helpers


@dataclass
class BB:
    messages: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    model: Any = "fake-gpt"
    stream: bool = False
    url: str = ""
    key: str = KEY
    tool_log: list[str] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)


async def run(tree: Tree[Any], bb: Any | None = None) -> tuple[Result, Context]:
    context = Context()
    async with context.using_blackboard(bb if bb is not None else BB()):
        result = await tree(context)
    return result, context


def one_llm(context: Context) -> TraceNode:
    (node,) = llm_nodes(context)
    return node


def words(text: str) -> int:
    """The fake's tokenizer: whitespace-separated words."""
    return len(text.split())


class WeatherTool(Tool[BB]):
    NAME = "get_weather"
    DESCRIPTION = "Get mock weather for a city."
    SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    async def execute(self, blackboard: BB, arguments: dict[str, Any], context: Context, tracer: Tracer) -> Any:
        blackboard.tool_log.append(f"weather:{arguments['city']}")
        return {"city": arguments["city"], "condition": "sunny", "temperature_c": 25}


class ClockTool(Tool[BB]):
    NAME = "get_time"
    DESCRIPTION = "Current time in a timezone."
    SCHEMA = {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}

    def execute(self, blackboard: BB, arguments: dict[str, Any], context: Context, tracer: Tracer) -> Any:  # sync
        blackboard.tool_log.append(f"time:{arguments['tz']}")
        return f"12:00 {arguments['tz']}"


class BoomTool(Tool[BB]):
    NAME = "boom"
    DESCRIPTION = "Always fails."

    async def execute(self, blackboard: BB, arguments: dict[str, Any], context: Context, tracer: Tracer) -> Any:
        blackboard.tool_log.append("boom")
        raise RuntimeError("kaboom: disk on fire")


def simple_tree(fake: ThreadedFakeLLM, messages: Any, model: Any = "fake-gpt", **kwargs: Any) -> Tree[BB]:
    kwargs.setdefault("base_url", fake.base_url)
    kwargs.setdefault("api_key", KEY)
    return Tree[BB]().LLM(model, messages, **kwargs).End()


# --------------------------------------------------------------------------- model and messages


async def test_model_string_with_base_url_and_api_key(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    tree = Tree[BB]("LLMString").LLM("fake-gpt", user("REPLY:hello there"), base_url=fake_llm.base_url, api_key=KEY)
    tree.End()
    result, context = await run(tree)
    assert result.status is Status.OK
    assert isinstance(result.data, LLMRunRecord)
    assert result.data.final_output == "hello there"
    assert str(result.data) == "hello there"
    assert fake_llm.calls == 1
    (body,) = fake_llm.requests
    assert body["model"] == "fake-gpt"
    assert body["messages"] == user("REPLY:hello there")
    node = one_llm(context)
    assert node.attributes["model"] == "fake-gpt"
    assert node.attributes["base_url"] == fake_llm.base_url
    assert node.attributes["api_key"] == "***"  # never the key itself
    assert node.attributes["transport"] == transport
    assert KEY not in json.dumps(context.trace_root().json())


async def test_model_as_llmmodel_with_provider(fake_llm: ThreadedFakeLLM) -> None:
    provider = LLMProvider(base_url=fake_llm.base_url, api_key=KEY)
    model = LLMModel("fake-gpt-mini", provider=provider)
    result, context = await run(Tree[BB]().LLM(model, user("REPLY:from provider")).End())
    assert result.status is Status.OK and result.data.final_output == "from provider"
    assert result.data.model == "fake-gpt-mini"
    assert [body["model"] for body in fake_llm.requests] == ["fake-gpt-mini"]
    assert one_llm(context).attributes["base_url"] == fake_llm.base_url


async def test_node_base_url_and_key_override_the_provider(fake_llm: ThreadedFakeLLM) -> None:
    """Node-level base_url/api_key win over the provider's (the provider here points nowhere)."""
    provider = LLMProvider(base_url="http://127.0.0.1:9/v1", api_key="provider-key")
    tree = Tree[BB]().LLM(LLMModel("fake-gpt", provider=provider), user("REPLY:ok"),
                          base_url=fake_llm.base_url, api_key="node-key").End()
    result, _ = await run(tree)
    assert result.status is Status.OK
    assert llm_client_count() == 1
    assert get_llm_client(fake_llm.base_url, "node-key").api_key == "node-key"
    assert llm_client_count() == 1  # the node made exactly that client


async def test_model_factory_per_blackboard(fake_llm: ThreadedFakeLLM) -> None:
    provider = LLMProvider(base_url=fake_llm.base_url, api_key=KEY)
    tree = Tree[BB]().LLM(lambda b: b.model, user("REPLY:x"), base_url=fake_llm.base_url, api_key=KEY).End()
    for model in ("fake-gpt", LLMModel("fake-gpt-mini", provider=provider)):
        result, context = await run(tree, BB(model=model))
        assert result.status is Status.OK
    assert [body["model"] for body in fake_llm.requests] == ["fake-gpt", "fake-gpt-mini"]


async def test_async_model_factory(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    async def pick(b: BB) -> str:
        return "fake-echo"

    result, _ = await run(simple_tree(fake_llm, user("hi"), model=pick))
    assert result.status is Status.OK and result.data.final_output == "echo: hi"
    assert fake_llm.requests[0]["model"] == "fake-echo"


async def test_messages_value_is_not_mutated(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "REPLY:done"}]
    snapshot = json.loads(json.dumps(messages))
    tree = simple_tree(fake_llm, messages)
    for _ in range(2):  # a value is reused across runs: the node must not append to it
        result, _ctx = await run(tree)
        assert result.status is Status.OK
    assert messages == snapshot
    assert result.data.input_messages == snapshot
    assert result.data.messages == [*snapshot, {"role": "assistant", "content": "done"}]
    assert [body["messages"] for body in fake_llm.requests] == [snapshot, snapshot]


async def test_messages_factory_reads_the_blackboard(fake_llm: ThreadedFakeLLM) -> None:
    tree = simple_tree(fake_llm, lambda b: [{"role": "system", "content": "sys"}, *b.messages])
    bb = BB(messages=user("What is up?"))
    result, _ = await run(tree, bb)
    assert result.data.final_output == "echo: What is up?"
    assert fake_llm.requests[0]["messages"][0] == {"role": "system", "content": "sys"}
    assert fake_llm.requests[0]["messages"][1:] == user("What is up?")


async def test_llm_as_a_child_of_the_builder_chain(fake_llm: ThreadedFakeLLM) -> None:
    tree = (
        Tree[BB]("LLMInSequence")
        .Sequence()
        ._().LLM("fake-gpt", user("REPLY:{\"a\": 1}"), base_url=fake_llm.base_url, api_key=KEY, name="ask")
        ._().ParseJSON()
        .End()
    )
    result, context = await run(tree)
    assert result == Result.OK({"a": 1})  # ParseJSON reads the LLMRunRecord's final_output
    node = one_llm(context)
    assert node.name == "LLM(ask)"
    assert node.path == ["ROOT", "Tree(LLMInSequence)", "Sequence", "LLM(ask)"]


# --------------------------------------------------------------------------- streaming


def _collector(kind: str, calls: list[tuple[Any, ...]]) -> Any:
    if kind == "sync4":
        def on_delta(b, full, delta, done):
            calls.append((full, delta, done, None))
    elif kind == "async4":
        async def on_delta(b, full, delta, done):
            calls.append((full, delta, done, None))
    elif kind == "sync5":
        def on_delta(b, full, delta, done, reason=""):
            calls.append((full, delta, done, reason))
    else:
        async def on_delta(b, full, delta, done, reason):
            calls.append((full, delta, done, reason))
    return on_delta


@pytest.mark.parametrize("kind", ["sync4", "async4", "sync5", "async5"])
async def test_stream_on_delta_forms(fake_llm: ThreadedFakeLLM, kind: str) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    calls: list[tuple[Any, ...]] = []
    tree = simple_tree(fake_llm, user("REPLY:" + text), stream=True, stream_on_delta=_collector(kind, calls))
    result, context = await run(tree)
    assert result.status is Status.OK
    assert result.data.final_output == text
    assert result.data.finish_reason == "stop"
    body = fake_llm.requests[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}

    *partial, final = calls
    assert len(partial) > 3  # really streamed, piece by piece
    assert "".join(delta for _full, delta, _done, _reason in partial) == text
    running = ""
    for full, delta, done, _reason in partial:
        running += delta
        assert full == running and done is False
    assert final[:3] == (text, "", True)
    if kind.endswith("5"):
        assert final[3] == "stop"
    # usage arrives in the last chunk (stream_options.include_usage) and reaches the trace
    assert one_llm(context).attributes["tokens"] == {"prompt": words("REPLY:" + text),
                                                     "completion": words(text),
                                                     "total": words("REPLY:" + text) + words(text)}


async def test_stream_factory(fake_llm: ThreadedFakeLLM) -> None:
    calls: list[tuple[Any, ...]] = []
    tree = simple_tree(fake_llm, user("REPLY:a b c"), stream=lambda b: b.stream,
                       stream_on_delta=_collector("sync5", calls))
    result, context = await run(tree, BB(stream=False))
    assert result.data.final_output == "a b c"
    assert calls == []  # not streaming: no delta callbacks
    assert one_llm(context).attributes["stream"] is False
    result, context = await run(tree, BB(stream=True))
    assert result.data.final_output == "a b c"
    assert calls[-1] == ("a b c", "", True, "stop")
    assert one_llm(context).attributes["stream"] is True
    assert [body.get("stream") for body in fake_llm.requests] == [False, True]


def test_stream_callback_arity_is_checked() -> None:
    from tasktree_dist import TasktreeProgrammingError

    with pytest.raises(TasktreeProgrammingError, match="stream callback"):
        LLM("m", [], stream=True, stream_on_delta=lambda b, full, delta: None)
    with pytest.raises(TasktreeProgrammingError):
        LLM("m", [], api_key=lambda: "k")
    with pytest.raises(TasktreeProgrammingError):
        LLM("m", [], on_llm_message=lambda b, message: None)


# --------------------------------------------------------------------------- api key, base url, client options


async def test_api_key_factory_one_param(fake_llm: ThreadedFakeLLM) -> None:
    seen: list[Any] = []

    def key(b: BB) -> str:
        seen.append(b)
        return b.key

    bb = BB(key="sk-from-blackboard")
    result, _ = await run(simple_tree(fake_llm, user("REPLY:k"), api_key=key), bb)
    assert result.status is Status.OK
    assert seen == [bb]
    assert llm_client_count() == 1
    assert get_llm_client(fake_llm.base_url, "sk-from-blackboard").api_key == "sk-from-blackboard"
    assert llm_client_count() == 1


async def test_api_key_factory_two_params_gets_the_model_name(fake_llm: ThreadedFakeLLM) -> None:
    seen: list[str] = []

    async def key(b: BB, model_name: str) -> str:
        seen.append(model_name)
        return f"key-for-{model_name}"

    provider = LLMProvider(base_url=fake_llm.base_url, api_key="provider-key")
    tree = Tree[BB]().LLM(LLMModel("fake-gpt-mini", provider=provider), user("REPLY:k"), api_key=key).End()
    result, _ = await run(tree)
    assert result.status is Status.OK
    assert seen == ["fake-gpt-mini"]
    assert get_llm_client(fake_llm.base_url, "key-for-fake-gpt-mini") is not None
    assert llm_client_count() == 1  # the factory's key, not the provider's


async def test_api_key_factory_returning_none_falls_back_to_the_provider(fake_llm: ThreadedFakeLLM) -> None:
    provider = LLMProvider(base_url=fake_llm.base_url, api_key="provider-key")
    tree = Tree[BB]().LLM(LLMModel("fake-gpt", provider=provider), user("REPLY:k"), api_key=lambda b: None).End()
    result, _ = await run(tree)
    assert result.status is Status.OK
    get_llm_client(fake_llm.base_url, "provider-key")
    assert llm_client_count() == 1


async def test_base_url_factory(fake_llm: ThreadedFakeLLM) -> None:
    tree = simple_tree(fake_llm, user("REPLY:via factory"), base_url=lambda b: b.url)
    result, context = await run(tree, BB(url=fake_llm.base_url))
    assert result.data.final_output == "via factory"
    assert one_llm(context).attributes["base_url"] == fake_llm.base_url
    assert fake_llm.calls == 1


async def test_client_kwargs_reach_async_openai(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    """default_headers set through client_kwargs are sent: the fault header makes the call fail."""
    failing = simple_tree(fake_llm, user("REPLY:x"), client_kwargs={"default_headers": {"X-Fake-Fault": "fail-500"}},
                          max_retries=0)
    result, context = await run(failing)
    assert result.status is Status.FAIL
    assert one_llm(context).attributes["status_code"] == 500
    ok, _ = await run(simple_tree(fake_llm, user("REPLY:x"), max_retries=0))
    assert ok.status is Status.OK
    assert fake_llm.calls == 2


async def test_client_kwargs_layering_node_wins(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    """client_kwargs merge provider < model < node (per key): the node's default_headers replace the provider's."""
    provider = LLMProvider(base_url=fake_llm.base_url, api_key=KEY,
                           client_kwargs={"default_headers": {"X-Fake-Fault": "fail-500"}, "max_retries": 0})
    model = LLMModel("fake-gpt", provider=provider)
    result, _ = await run(Tree[BB]().LLM(model, user("REPLY:x")).End())
    assert result.status is Status.FAIL and fake_llm.calls == 1  # provider's header and max_retries=0 applied
    healthy = LLMModel("fake-gpt", provider=provider, client_kwargs={"default_headers": {"X-Trace": "1"}})
    result, _ = await run(Tree[BB]().LLM(healthy, user("REPLY:x")).End())
    assert result.status is Status.OK
    header = LLMModel("fake-gpt", provider=provider, client_kwargs={"default_headers": {}})
    result, _ = await run(Tree[BB]().LLM(header, user("REPLY:x"),
                                         client_kwargs={"default_headers": {"X-Fake-Fault": "fail-429"}}).End())
    assert result.status is Status.FAIL


async def test_extra_body_merged_provider_model_node(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    provider = LLMProvider(base_url=fake_llm.base_url, api_key=KEY,
                           extra_body={"shared": "provider", "from_provider": 1, "reasoning": {"enabled": True}})
    model = LLMModel("fake-gpt", provider=provider, extra_body={"shared": "model", "from_model": 2})
    tree = Tree[BB]().LLM(model, user("REPLY:x"), extra_body={"shared": "node", "reasoning": {"enabled": False}})
    result, context = await run(tree.End())
    assert result.status is Status.OK
    body = fake_llm.requests[0]
    assert body["shared"] == "node"
    assert body["from_provider"] == 1 and body["from_model"] == 2
    assert body["reasoning"] == {"enabled": False}
    assert "extra_body" not in body  # merged into the body, as openai-python does
    assert one_llm(context).attributes["extra_body"]["shared"] == "node"


async def test_call_kwargs_forwarded_and_layered(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    provider = LLMProvider(base_url=fake_llm.base_url, api_key=KEY,
                           llm_call_kwargs={"temperature": 0.9, "top_p": 0.5, "seed": 1})
    model = LLMModel("fake-gpt", provider=provider, llm_call_kwargs={"seed": 7})
    tree = Tree[BB]().LLM(model, user("REPLY:x"), temperature=0.2, max_tokens=17).End()
    result, context = await run(tree)
    assert result.status is Status.OK
    body = fake_llm.requests[0]
    assert body["temperature"] == 0.2 and body["max_tokens"] == 17
    assert body["top_p"] == 0.5 and body["seed"] == 7
    node = one_llm(context)
    assert node.attributes["temperature"] == 0.2 and node.attributes["max_tokens"] == 17


async def test_max_retries_configures_the_client(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    """openai-python retries 5xx itself; max_retries=2 means 3 attempts, 0 means one."""
    result, context = await run(simple_tree(fake_llm, user("x"), model="fail-500", max_retries=2))
    assert result.status is Status.FAIL and fake_llm.calls == 3
    assert one_llm(context).attributes["status_code"] == 500
    fake_llm.reset()
    result, _ = await run(simple_tree(fake_llm, user("x"), model="fail-500", max_retries=0))
    assert result.status is Status.FAIL and fake_llm.calls == 1


async def test_timeout_configures_the_client(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    import time

    started = time.perf_counter()
    result, context = await run(simple_tree(fake_llm, user("x"), model="timeout", timeout=0.5, max_retries=0))
    elapsed = time.perf_counter() - started
    assert result.status is Status.FAIL
    assert 0.4 <= elapsed < 5.0  # the server would hang for 600 s
    node = one_llm(context)
    assert node.attributes["error_type"] == "APITimeoutError"
    assert "timed out" in node.attributes["error"].lower()
    assert fake_llm.calls == 1


# --------------------------------------------------------------------------- tools: the WeatherAgent loop


def store_llm_message(b: BB, message: dict[str, Any], tracer: Tracer) -> None:
    b.messages.append(message)


async def decide_next_step(b: BB, _tracer: Tracer, context: Context) -> Result:
    record = context._last_result.data
    b.done = not bool(record.tool_calls)
    _tracer.update_attributes(chat_transcript=b.messages)
    context.parent_tracer(2).update_attributes(chat_transcript=b.messages)
    return Result.OK(record.final_output if b.done else None)


def weather_agent(fake: ThreadedFakeLLM, stream: bool, tools: list[Tool[Any]] | None = None, **kw: Any) -> Tree[BB]:
    def make_messages(b: BB) -> list[dict[str, Any]]:
        return [{"role": "system", "content": "Use tools when useful, then answer with the tool result."}, *b.messages]

    return (
        Tree[BB]("WeatherAgent")
        .While(lambda b: not b.done, max_loop_times=4)
        ._().Sequence()
        ._()._().LLM("fake-gpt", make_messages, api_key=KEY, base_url=fake.base_url, stream=stream,
                     extra_body={"reasoning": {"enabled": False}}, tools=tools or [WeatherTool()],
                     on_llm_message=store_llm_message, **kw)
        ._()._().Function(decide_next_step)
        .End()
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_weather_agent_loop(fake_llm: ThreadedFakeLLM, stream: bool, transport: str) -> None:
    bb = BB(messages=user("How is the weather in Tokyo?"))
    result, context = await run(weather_agent(fake_llm, stream), bb)

    assert result.status is Status.OK
    assert result.data.startswith("tool results: ")
    tool_content = json.loads(result.data.removeprefix("tool results: "))
    assert tool_content["ok"] is True
    assert tool_content["result"] == {"city": "Tokyo", "condition": "sunny", "temperature_c": 25}
    assert bb.tool_log == ["weather:Tokyo"]

    user_msg, assistant_call, tool_msg, final = bb.messages
    assert user_msg == user("How is the weather in Tokyo?")[0]
    assert assistant_call["role"] == "assistant" and assistant_call["content"] is None
    (call,) = assistant_call["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Tokyo"}
    assert tool_msg["role"] == "tool" and tool_msg["tool_call_id"] == call["id"] and tool_msg["name"] == "get_weather"
    assert json.loads(tool_msg["content"]) == tool_content
    assert final == {"role": "assistant", "content": result.data}

    # exactly one model call per LLM node execution, and the second call saw the tool exchange
    nodes = llm_nodes(context)
    assert len(nodes) == 2 == fake_llm.calls
    first, second = fake_llm.requests
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather"]
    assert first["reasoning"] == {"enabled": False}
    assert second["messages"][1:] == bb.messages[:3]
    assert all(body["stream"] is stream for body in fake_llm.requests)

    # the trace: tool calls on the first LLM node, the chat transcript on nodes and the loop
    assert nodes[0].attributes["tool_calls"][0]["function"]["name"] == "get_weather"
    assert nodes[0].attributes["finish_reason"] == "tool_calls"
    assert nodes[1].attributes["finish_reason"] == "stop"
    loop = next(node for node in context.trace_root().walk() if node.kind == "While")
    assert loop.attributes["has_chat"] is True and loop.attributes["chat_messages_count"] == 4
    assert loop.attributes["chat_transcript"] == bb.messages


async def test_on_llm_message_gets_each_emitted_message_in_order(fake_llm: ThreadedFakeLLM) -> None:
    got: list[tuple[str, str]] = []

    async def on_message(b: BB, message: dict[str, Any], tracer: Tracer) -> None:
        got.append((message["role"], tracer.name))
        b.seen.append(message)

    text = 'CALL:get_weather({"city": "Tokyo"}) CALL:get_time({"tz": "JST"})'
    tree = simple_tree(fake_llm, user(text), tools=[WeatherTool(), ClockTool()], on_llm_message=on_message)
    bb = BB()
    result, _ = await run(tree, bb)
    record = result.data
    assert got == [("assistant", "LLM"), ("tool", "LLM"), ("tool", "LLM")]
    assert bb.seen == record.emitted_messages
    assert record.messages == [*record.input_messages, *record.emitted_messages]


@pytest.mark.parametrize("stream", [False, True])
async def test_multiple_tool_calls_run_in_order(fake_llm: ThreadedFakeLLM, stream: bool, transport: str) -> None:
    text = ('CALL:get_weather({"city": "Tokyo"}) CALL:get_time({"tz": "JST"}) '
            'CALL:get_weather({"city": "Oslo"})')
    tree = simple_tree(fake_llm, user(text), stream=stream, tools=[WeatherTool(), ClockTool()])
    bb = BB()
    result, context = await run(tree, bb)
    assert result.status is Status.OK
    record: LLMRunRecord = result.data
    assert bb.tool_log == ["weather:Tokyo", "time:JST", "weather:Oslo"]
    assert record.finish_reason == "tool_calls"
    assert all(isinstance(call, ToolCall) for call in record.tool_calls)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in record.tool_calls] == [
        ("get_weather", {"city": "Tokyo"}), ("get_time", {"tz": "JST"}), ("get_weather", {"city": "Oslo"})]
    assert len({c.id for c in record.tool_calls}) == 3
    assert all(isinstance(r, ToolResult) and r.ok for r in record.tool_results)
    assert [r.id for r in record.tool_results] == [c.id for c in record.tool_calls]
    assert [r.result for r in record.tool_results] == [
        {"city": "Tokyo", "condition": "sunny", "temperature_c": 25}, "12:00 JST",
        {"city": "Oslo", "condition": "sunny", "temperature_c": 25}]
    assistant, *tool_messages = record.emitted_messages
    assert len(assistant["tool_calls"]) == 3
    assert [m["tool_call_id"] for m in tool_messages] == [c.id for c in record.tool_calls]
    assert fake_llm.calls == 1
    assert len(one_llm(context).attributes["tool_results"]) == 3
    assert one_llm(context).attributes["transport"] == ("openai" if stream else transport)


async def test_tool_failures_go_back_to_the_model(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    """Unknown tool, malformed arguments, non-object arguments and a raising tool: the node stays OK, each error
    is that tool's result (ToolResult.ok False), in the trace logs, and in what the model sees next."""
    text = ('CALL:no_such_tool({"x": 1}) CALLRAW:get_weather({"city": "Tok) CALL:get_weather(["Tokyo"]) '
            'CALL:boom({}) CALL:get_weather({"city": "Lima"})')
    bb = BB(messages=user(text))
    result, context = await run(weather_agent(fake_llm, False, tools=[WeatherTool(), BoomTool()]), bb)
    assert result.status is Status.OK
    assert bb.tool_log == ["boom", "weather:Lima"]  # failures did not stop the tool after them

    first = llm_nodes(context)[0]
    record: LLMRunRecord = first.result.data
    oks = [r.ok for r in record.tool_results]
    assert oks == [False, False, False, False, True]
    unknown, malformed, not_object, raised, good = record.tool_results
    # tinytasktree's texts and codes
    assert unknown.error == "unknown tool: no_such_tool"
    assert malformed.error.startswith("tool arguments are not valid JSON: ")
    assert not_object.error == "tool arguments must be a JSON object"
    assert raised.error == "kaboom: disk on fire"
    assert good.result["city"] == "Lima" and good.error is None
    assert [r.arguments for r in record.tool_results] == [{"x": 1}, {}, {}, {}, {"city": "Lima"}]
    names = ["no_such_tool", "get_weather", "get_weather", "boom", "get_weather"]
    assert [r.name for r in record.tool_results] == names

    tool_messages = [m for m in bb.messages if m["role"] == "tool"]
    contents = [json.loads(m["content"]) for m in tool_messages]
    assert [c["ok"] for c in contents] == oks
    assert [c.get("code") for c in contents] == ["tool_not_found"] + ["tool_execution_error"] * 3 + [None]
    for content, outcome in zip(contents[:4], record.tool_results[:4], strict=True):
        assert content["error"] == outcome.error
    assert contents[0]["executed"] == 'no_such_tool({"x": 1})'
    assert contents[4]["executed"] == 'get_weather({"city":"Lima"})'  # Tool.format_call of the parsed arguments
    logs = "\n".join(first.logs)
    for name in ("no_such_tool", "get_weather", "boom"):
        assert f"tool {name!r} failed" in logs
    assert "RuntimeError: kaboom" in logs  # the trace keeps the exception's type

    # the second model call received the errors as tool results
    sent = [m for m in fake_llm.requests[1]["messages"] if m["role"] == "tool"]
    assert [json.loads(m["content"])["ok"] for m in sent] == oks
    assert "kaboom: disk on fire" in result.data


async def test_tools_factory(fake_llm: ThreadedFakeLLM) -> None:
    tree = simple_tree(fake_llm, user('CALL:get_time({"tz": "UTC"})'), tools=lambda b: [ClockTool()])
    bb = BB()
    result, _ = await run(tree, bb)
    assert bb.tool_log == ["time:UTC"]
    assert result.data.tool_results[0].result == "12:00 UTC"
    assert [t["function"]["name"] for t in fake_llm.requests[0]["tools"]] == ["get_time"]


def test_duplicate_tool_names_are_refused() -> None:
    from tasktree_dist import TasktreeProgrammingError

    with pytest.raises(TasktreeProgrammingError, match="two tools"):
        LLM("m", [], tools=[WeatherTool(), WeatherTool()])


# --------------------------------------------------------------------------- the record


async def test_llm_run_record_fields(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    prompt = 'What now? CALL:get_weather({"city": "Rome"})'
    model = LLMModel("fake-gpt", provider=LLMProvider(fake_llm.base_url, KEY), input_price_per_m=1.0,
                     output_price_per_m=2.0)
    result, _ = await run(Tree[BB]().LLM(model, user(prompt), tools=[WeatherTool()]).End())
    record: LLMRunRecord = result.data
    assert record.final_output == ""  # a tool-calling turn has no text
    assert record.finish_reason == "tool_calls"
    assert record.input_messages == user(prompt)
    (call,) = record.tool_calls
    assert isinstance(call, ToolCall) and call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    (outcome,) = record.tool_results
    assert isinstance(outcome, ToolResult) and outcome.ok and outcome.id == call.id and outcome.name == "get_weather"
    assert outcome.arguments == {"city": "Rome"}  # parsed, as tinytasktree's ToolResult
    assert outcome.error is None
    assert outcome.result == {"city": "Rome", "condition": "sunny", "temperature_c": 25}
    assert isinstance(outcome.duration_ms, float) and outcome.duration_ms > 0
    assistant, tool = record.emitted_messages
    assert assistant == {"role": "assistant", "content": None, "tool_calls": [call.to_dict()]}
    assert tool["role"] == "tool" and tool["tool_call_id"] == call.id
    assert record.messages == [*user(prompt), assistant, tool]
    completion = words('get_weather {"city": "Rome"}')
    assert record.usage == {"prompt": words(prompt), "completion": completion, "total": words(prompt) + completion}
    assert record.model == "fake-gpt"
    assert record.cost == pytest.approx((words(prompt) * 1.0 + completion * 2.0) / 1e6, rel=1e-12)
    as_json = record.json()
    assert as_json["tool_calls"] == [call.to_dict()]
    assert as_json["tool_results"][0]["ok"] is True
    json.dumps(as_json)  # JSON-able as is


async def test_record_survives_serde(fake_llm: ThreadedFakeLLM) -> None:
    """The record crosses process boundaries (worker results): it must round-trip with its types."""
    from tasktree_dist.core.serde import decode_value, encode_value

    tree = simple_tree(fake_llm, user('CALL:get_weather({"city": "Rome"})'), tools=[WeatherTool()])
    result, _ = await run(tree)
    back = decode_value(json.loads(json.dumps(encode_value(result.data))))
    assert isinstance(back, LLMRunRecord)
    assert isinstance(back.tool_calls[0], ToolCall) and isinstance(back.tool_results[0], ToolResult)
    assert back == result.data
    # what a coordinator holds per item of a large batch: its messages shared once, and no per-instance dict
    assert back.messages[0] is back.input_messages[0] and not hasattr(back, "__dict__")
    assert copy.deepcopy(back) == back and pickle.loads(pickle.dumps(back)) == back


# --------------------------------------------------------------------------- trace: tokens, chat, cost


async def test_trace_tokens_chat_and_totals(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    bb = BB(messages=user("How is the weather in Tokyo?"))
    result, context = await run(weather_agent(fake_llm, False), bb)
    assert result.status is Status.OK
    first, second = llm_nodes(context)
    tokens = [node.attributes["tokens"] for node in (first, second)]
    for node, token in zip((first, second), tokens, strict=True):
        assert node.attributes["model"] == "fake-gpt"
        assert set(token) == {"prompt", "completion", "total"}
        assert token["total"] == token["prompt"] + token["completion"] > 0
        assert node.attributes["has_chat"] is True
        assert node.attributes["chat_messages_count"] == len(node.attributes["chat_transcript"])
    # the first call: system + user prompt words; the transcript ends with the tool message
    system = "Use tools when useful, then answer with the tool result."
    assert tokens[0]["prompt"] == words(system) + words("How is the weather in Tokyo?")
    assert first.attributes["chat_transcript"][-1]["role"] == "tool"
    assert first.attributes["chat_messages_count"] == 4  # system, user, assistant(tool_calls), tool
    assert second.attributes["chat_messages_count"] == 5  # ... the tool message, then the final answer
    root = context.trace_root()
    expected = {k: tokens[0][k] + tokens[1][k] for k in ("prompt", "completion", "total")}
    assert root.total_tokens() == expected
    as_json = root.json()
    assert as_json["total_tokens"] == expected
    loop_json = as_json["children"]["Tree(WeatherAgent)"]["children"]["While(lambda)"]
    llm_json = loop_json["children"]["Sequence"]["children"]["LLM"]
    assert llm_json["attributes"]["has_chat"] is True
    assert json.loads(llm_json["attributes"]["tokens"]) == tokens[0]
    assert json.loads(llm_json["attributes"]["chat_transcript"])[-1]["role"] == "tool"


async def test_cost_from_model_prices(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    text = "REPLY:one two three four five"
    model = LLMModel("fake-gpt", provider=LLMProvider(fake_llm.base_url, KEY), input_price_per_m=3.0,
                     output_price_per_m=15.0)
    result, context = await run(Tree[BB]().LLM(model, user(text)).End())
    prompt, completion = words(text), words("one two three four five")
    expected = prompt * 3.0 / 1e6 + completion * 15.0 / 1e6
    node = one_llm(context)
    assert node.attributes["tokens"] == {"prompt": prompt, "completion": completion, "total": prompt + completion}
    assert node.cost == pytest.approx(expected, rel=1e-12)
    assert context.trace_root().total_cost() == pytest.approx(expected, rel=1e-12)
    assert context.trace_root().json()["total_cost"] == pytest.approx(expected, rel=1e-12)
    assert result.data.cost == pytest.approx(expected, rel=1e-12)


async def test_no_prices_no_provider_cost_means_zero_cost(fake_llm: ThreadedFakeLLM) -> None:
    result, context = await run(simple_tree(fake_llm, user("REPLY:free")))
    assert one_llm(context).cost == 0.0 and result.data.cost == 0.0
    assert one_llm(context).attributes["tokens"]["total"] == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_provider_cost_header_beats_prices(fake_llm: ThreadedFakeLLM, stream: bool, transport: str) -> None:
    model = LLMModel("fake-gpt", provider=LLMProvider(fake_llm.base_url, KEY), input_price_per_m=1000.0,
                     output_price_per_m=1000.0)
    tree = Tree[BB]().LLM(model, user("REPLY:priced by the gateway"), stream=stream,
                          client_kwargs={"default_headers": {"X-Fake-Cost": "0.125"}}).End()
    result, context = await run(tree)
    assert result.status is Status.OK
    assert one_llm(context).cost == 0.125
    assert context.trace_root().total_cost() == 0.125
    assert result.data.cost == 0.125


async def test_provider_cost_from_priced_model_name(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    text = "REPLY:alpha beta gamma"
    model = LLMModel("fake-priced", provider=LLMProvider(fake_llm.base_url, KEY), input_price_per_m=50.0,
                     output_price_per_m=50.0)
    _, context = await run(Tree[BB]().LLM(model, user(text)).End())
    expected = round(words(text) * PROMPT_PRICE_USD + 3 * COMPLETION_PRICE_USD, 10)
    assert one_llm(context).cost == pytest.approx(expected, rel=1e-12)


async def test_costs_and_tokens_sum_over_a_gather(fake_llm: ThreadedFakeLLM, transport: str) -> None:
    model = LLMModel("fake-gpt", provider=LLMProvider(fake_llm.base_url, KEY), input_price_per_m=2.0,
                     output_price_per_m=4.0)
    doc = Tree[BB]("CostDoc").LLM(model, lambda b: user("REPLY:" + b.key)).End()
    texts = ["a", "b c", "d e f", "g h i j"]
    gather = Tree[BB]("CostGather").Gather(lambda b: ([doc] * len(texts), [BB(key=t) for t in texts]),
                                           concurrency_limit=4).End()
    result, context = await run(gather)
    assert result.status is Status.OK
    assert [r.final_output for r in result.data] == texts
    prompt = sum(words("REPLY:" + t) for t in texts)
    completion = sum(words(t) for t in texts)
    root = context.trace_root()
    assert root.total_tokens() == {"prompt": prompt, "completion": completion, "total": prompt + completion}
    assert root.total_cost() == pytest.approx((prompt * 2.0 + completion * 4.0) / 1e6, rel=1e-12)
