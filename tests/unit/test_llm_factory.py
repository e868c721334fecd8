"""The LLM node's client factory hook (`LLMNode._new_async_openai_client`), tinytasktree-shaped responses and trace
attributes, `tools=[]`, and the first call's openai import kept off the event loop."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from tasktree_dist import LLM, Context, LLMModel, LLMNode, LLMProvider, Result, Status, Tool, Tracer, Tree
from tasktree_dist.llm.node import provider_cost
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tests.helpers import llm_nodes, user

pytestmark = pytest.mark.usefixtures("llm_clients_closed")


@dataclass
class BB:
    log: list[str] = field(default_factory=list)
    with_tools: bool = True


class Echo(Tool[BB]):
    NAME = "echo"
    SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}}

    async def execute(self, blackboard: BB, arguments: dict[str, Any], context: Context, tracer: Tracer) -> Any:
        blackboard.log.append(arguments["text"])
        return arguments["text"]


class FakeFactory:
    """What tinytasktree's tests patch in: a new client per call, with `chat.completions.create` and `close`."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.made: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.closed = 0

    def __call__(self, **kwargs: Any) -> Any:
        self.made.append(kwargs)
        factory = self

        class Completions:
            async def create(self, **request: Any) -> Any:
                factory.requests.append(request)
                if request["stream"]:
                    async def chunks() -> Any:
                        yield {"choices": [{"delta": {"content": "stre"}}]}
                        yield {"choices": [{"delta": {"content": "amed"}, "finish_reason": "stop"}],
                               "usage": factory.answer["usage"]}
                    return chunks()
                return factory.answer

        class Client:
            chat = type("Chat", (), {"completions": Completions()})()

            async def close(self) -> None:
                factory.closed += 1

        return Client()


ANSWER = {
    "choices": [
        {
            "message": {
                "content": "calling",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "echo", "arguments": '{"text": "hi"}'}}
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    "_hidden_params": {"response_cost": 1.23},
}


async def run(tree: Tree[Any], bb: Any | None = None) -> tuple[Result, Context]:
    context = Context()
    async with context.using_blackboard(bb if bb is not None else BB()):
        result = await tree(context)
    return result, context


@pytest.mark.parametrize("stream", [False, True])
async def test_a_patched_factory_makes_the_client_of_every_call(
    monkeypatch: pytest.MonkeyPatch, transport: str, stream: bool
) -> None:
    """Whatever the transport setting, the call goes through the object the patched factory returns; the node
    closes it after the call, as tinytasktree does."""
    factory = FakeFactory(ANSWER)
    monkeypatch.setattr(LLMNode, "_new_async_openai_client", staticmethod(factory))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # no key needed: the factory decides
    provider = LLMProvider("https://provider.example/v1", api_key="pk", client_kwargs={"timeout": 30})
    model = LLMModel("m", provider=provider, client_kwargs={"max_retries": 2})
    tree = Tree[BB]().Sequence()._().LLM("plain", user("a"), stream=stream)._().LLM(
        model, user("b"), stream=stream, tools=[Echo()], client_kwargs={"timeout": 5}).End()
    result, context = await run(tree)
    assert result.status is Status.OK
    assert factory.made == [{}, {"timeout": 5, "max_retries": 2, "base_url": "https://provider.example/v1",
                                 "api_key": "pk"}]
    assert [r["model"] for r in factory.requests] == ["plain", "m"]
    assert factory.closed == 2
    first, second = llm_nodes(context)
    assert first.attributes["transport"] == second.attributes["transport"] == "openai"
    if not stream:
        assert second.cost == pytest.approx(1.23)  # the dict response's _hidden_params.response_cost
        assert result.data.tool_results[0].result == "hi"


def test_provider_cost_reads_dict_responses_too() -> None:
    assert provider_cost({"_hidden_params": {"response_cost": 1.23}}, {}) == 1.23
    assert provider_cost({"usage": {}}, {"cost": 0.5}) == 0.5
    assert provider_cost({}, {}) is None


async def test_tinytasktree_trace_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    factory = FakeFactory({k: v for k, v in ANSWER.items() if k != "_hidden_params"})
    monkeypatch.setattr(LLMNode, "_new_async_openai_client", staticmethod(factory))
    model = LLMModel("m", provider=LLMProvider("https://p.example/v1", api_key="k"), input_price_per_m=0.5,
                     output_price_per_m=1.5)
    tree = Tree[BB]().LLM(model, user("x"), tools=[Echo()], extra_body={"reasoning": {"enabled": False}}).End()
    result, context = await run(tree)
    (node,) = llm_nodes(context)
    attrs = node.attributes
    assert (attrs["prompt_tokens"], attrs["completion_tokens"], attrs["total_tokens"]) == (4, 2, 6)
    assert attrs["tokens"] == {"prompt": 4, "completion": 2, "total": 6}
    assert attrs["reasoning"] == {"enabled": False}
    assert (attrs["input_price_per_m"], attrs["output_price_per_m"]) == (0.5, 1.5)
    assert node.cost == pytest.approx((4 * 0.5 + 2 * 1.5) / 1e6)  # no provider cost: priced from the model
    assert attrs["tool_executions"] == attrs["tool_results"] == [r.json() for r in result.data.tool_results]
    assert attrs["emitted_messages"] == result.data.emitted_messages
    assert [m["role"] for m in attrs["emitted_messages"]] == ["assistant", "tool"]
    assert json.loads(attrs["emitted_messages"][1]["content"])["result"] == "hi"


async def test_a_tools_factory_returning_no_tools_sends_an_empty_list(fake_llm: ThreadedFakeLLM) -> None:
    """As tinytasktree: `tools=[]` on the request when the factory returns []; no `tools` when there are none."""
    def tools(b: BB) -> list[Tool[BB]]:
        return [Echo()] if b.with_tools else []

    common = {"base_url": fake_llm.base_url, "api_key": "sk"}
    await run(Tree[BB]().LLM("m", user("REPLY:x"), tools=tools, **common).End(), BB(with_tools=False))
    await run(Tree[BB]().LLM("m", user("REPLY:x"), tools=tools, **common).End(), BB(with_tools=True))
    await run(Tree[BB]().LLM("m", user("REPLY:x"), **common).End())
    sent = [request.get("tools", "absent") for request in fake_llm.requests]
    assert sent[0] == [] and [t["function"]["name"] for t in sent[1]] == ["echo"] and sent[2] == "absent"


FIRST_CALL = """
import asyncio, sys, time
import tasktree_dist
assert "openai" not in sys.modules

class Client:
    class chat:
        class completions:
            @staticmethod
            async def create(**request):
                return {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}

tasktree_dist.LLMNode._new_async_openai_client = staticmethod(lambda **kwargs: Client())

async def main():
    gaps, stop = [], False
    async def ticker():
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    result = await tasktree_dist.Tree().LLM("m", [{"role": "user", "content": "x"}]).End()(tasktree_dist.Context())
    took = time.perf_counter() - started
    stop = True
    await ticking
    assert result.is_ok() and "openai" in sys.modules, result
    print(f"{took:.3f} {max(gaps):.3f}")

asyncio.run(main())
"""


def test_the_first_call_imports_openai_off_the_event_loop() -> None:
    """The import (~0.4 s here) runs in a thread: the loop's other tasks keep running meanwhile."""
    done = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    took, longest_gap = map(float, done.stdout.split())
    assert took > 0.15, "openai imported too fast to tell: the test proves nothing"
    assert longest_gap < took / 2, (took, longest_gap)


def test_the_default_factory_is_the_shared_client() -> None:
    from tasktree_dist.llm.clients import shared_client

    assert LLM._new_async_openai_client is shared_client
