"""The spec's WeatherAgent: an LLM with a tool, in a While loop until the model stops calling tools.

    python examples/weather_agent.py                 # against a fake OpenAI-compatible server started in-process
    python examples/weather_agent.py --stream        # the same, streamed (deltas are printed as they arrive)
    python examples/weather_agent.py --question "How is the weather in Lima?"

    # a real OpenAI-compatible provider:
    LLM_BASE_URL=https://openrouter.ai/api/v1 LLM_API_KEY=sk-... LLM_MODEL=openai/gpt-4.1-mini \\
        python examples/weather_agent.py

Environment: LLM_BASE_URL (unset: start the fake server), LLM_API_KEY (unset: OPENAI_API_KEY), LLM_MODEL
(default gpt-4.1-mini; fake-gpt with the fake server), LLM_EXTRA_BODY (JSON merged into the request body; default
'{"reasoning": {"enabled": false}}' as in the spec; set '{}' for providers that reject unknown fields).

Each loop turn is one LLM call: the model asks for `get_weather`, the node runs it and appends the assistant and
tool messages to the blackboard (on_llm_message); the next turn the model answers from the tool result. The
script prints the answer, the conversation, and the id of the trace saved under .traces/ (view it with
`python -m tasktree_dist --httpserver --trace-dir .traces`, then http://127.0.0.1:8000/<trace id>).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from tasktree_dist import (
    JSON,
    Context,
    FileTraceStorageHandler,
    Result,
    Tool,
    Tracer,
    Tree,
    close_llm_clients,
)


@dataclass
class Blackboard:
    messages: list[JSON]
    model: str
    base_url: str | None = None
    api_key: str | None = None
    stream: bool = False
    done: bool = False


class WeatherTool(Tool[Blackboard]):
    NAME = "get_weather"
    DESCRIPTION = "Get mock weather for a city."
    SIGNATURES = ["get_weather(city: str) -> object"]
    EXAMPLES = ['get_weather({"city": "Tokyo"})']
    SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    async def execute(self, blackboard: Blackboard, arguments: JSON, context: Context, tracer: Tracer) -> JSON:
        return {"city": arguments["city"], "condition": "sunny", "temperature_c": 25}


def make_messages(b: Blackboard) -> list[JSON]:
    system = {"role": "system", "content": "Use tools when useful, then answer with the tool result."}
    return [system, *b.messages]


def store_llm_message(b: Blackboard, message: JSON, tracer: Tracer) -> None:
    b.messages.append(message)


def print_delta(b: Blackboard, full: str, delta: str, done: bool, reason: str = "") -> None:
    if delta:
        print(delta, end="", flush=True)
    elif done and full:
        print(flush=True)


async def decide_next_step(b: Blackboard, tracer: Tracer, context: Context) -> Result:
    record = context._last_result.data
    b.done = not bool(record.tool_calls)
    # mark this step and the loop with the whole conversation: the trace viewer shows them as chats
    tracer.update_attributes(chat_transcript=b.messages)
    context.parent_tracer(2).update_attributes(chat_transcript=b.messages)
    return Result.OK(record.final_output if b.done else None)


EXTRA_BODY: dict[str, Any] = json.loads(os.getenv("LLM_EXTRA_BODY") or '{"reasoning": {"enabled": false}}')

tree = (
    Tree[Blackboard]("WeatherAgent")
    .While(lambda b: not b.done, max_loop_times=4)
    ._().Sequence()
    ._()._().LLM(
        lambda b: b.model,
        make_messages,
        stream=lambda b: b.stream,
        stream_on_delta=print_delta,
        api_key=lambda b: b.api_key,
        base_url=lambda b: b.base_url,
        extra_body=EXTRA_BODY,
        tools=[WeatherTool()],
        on_llm_message=store_llm_message,
    )
    ._()._().Function(decide_next_step)
    .End()
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream", action="store_true", help="stream the answer (printed as it arrives)")
    parser.add_argument("--question", default="How is the weather in Tokyo?")
    parser.add_argument("--trace-dir", default=".traces")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    async with AsyncExitStack() as stack:
        base_url = os.getenv("LLM_BASE_URL") or None
        if base_url is None:
            from tasktree_dist.testing.fake_llm import FakeLLMServer

            server = await stack.enter_async_context(FakeLLMServer(port=0))
            base_url, api_key, model = server.base_url, "sk-fake", os.getenv("LLM_MODEL") or "fake-gpt"
            print(f"LLM: fake OpenAI-compatible server at {base_url} (set LLM_BASE_URL to use a real one)")
        else:
            api_key, model = os.getenv("LLM_API_KEY") or None, os.getenv("LLM_MODEL") or "gpt-4.1-mini"
            print(f"LLM: {base_url}")
        print(f"model: {model}  stream: {args.stream}")

        blackboard = Blackboard(
            messages=[{"role": "user", "content": args.question}],
            model=model, base_url=base_url, api_key=api_key, stream=args.stream,
        )
        context = Context()
        async with context.using_blackboard(blackboard):
            result = await tree(context)
        await close_llm_clients()

    print("result:", "OK" if result.is_ok() else "FAIL")
    print("final answer:", result.data)
    print("messages:")
    for message in blackboard.messages:
        print("  " + json.dumps(message, ensure_ascii=False))
    root = context.trace_root()
    tokens = root.total_tokens()
    print(f"tokens: {tokens.get('total', 0)} (prompt {tokens.get('prompt', 0)}, "
          f"completion {tokens.get('completion', 0)})  cost: ${root.total_cost():.6f}")
    trace_id = await FileTraceStorageHandler(args.trace_dir).save(root)
    print("trace id:", trace_id)
    return 0 if result.is_ok() else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
