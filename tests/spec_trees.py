"""Registered functions, tools and stores for spec tests, and a code tree using every node kind of the builder."""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from tasktree_dist import InMemoryCacheStore, Tool, Tree, register_function, register_tool, register_type
from tasktree_dist.builder.spec_names import register_store


@register_type
class Approval(BaseModel):
    ok: bool


@register_type
@dataclass
class Doc:
    text: str = ""
    ready: bool = True
    words: int = 0
    items: list[str] = field(default_factory=list)
    parsed: Any = None
    out: Any = None


@register_function
def count_words(b: Doc) -> int:
    return len(b.text.split())


@register_function("is_ready")
def ready(b: Any) -> bool:
    return True


@register_function
def cache_key(b: Any) -> str:
    return "k"


@register_function
def weights(b: Any) -> list[float]:
    return [1.0, 2.0]


@register_function
def gather_params(b: Any) -> tuple[list[Any], list[Any]]:
    return [], []


@register_function
def constant(b: Any) -> str:
    return "constant"


@register_function
def message(b: Any) -> str:
    return "message"


@register_function
def save(b: Any, data: Any) -> None:
    b.out = data


@register_function
@contextlib.asynccontextmanager
async def passthrough(child: Any, context: Any) -> Any:
    yield await child(context)


@register_function
def prompt(b: Any) -> list[dict[str, str]]:
    return [{"role": "user", "content": b.text}]


@register_tool
class WordCount(Tool):
    NAME = "word_count"
    DESCRIPTION = "Counts the words of a text."
    SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}

    async def execute(self, blackboard: Any, arguments: dict[str, Any], context: Any, tracer: Any) -> Any:
        return len(str(arguments.get("text", "")).split())


STORE = register_store("memory", InMemoryCacheStore())

leaf = Tree[Doc]("spec_leaf").Function(count_words).End()


def every_kind_tree(name: str = "spec_every_kind") -> Tree[Doc]:
    """One tree with each node kind of the builder (WaitFor excepted: see spec_kinds.RESERVED_KINDS)."""
    return (
        Tree[Doc](name)
        .Sequence(name="main")
        ._().Function(count_words)
        ._().WriteBlackboard("words")
        ._().Function(count_words)
        ._().WriteBlackboard(save)
        ._().Log("hello {not a field}", level="warning")
        ._().Log(message)
        ._().TODO()
        ._().ShowBlackboard(name="show")
        ._().Assert("ready")
        ._().Assert(ready, name="checked")
        ._().ParseJSON(src="text", dst="parsed")
        ._().Subtree(leaf)
        ._().ForceOk()
        ._()._().Failure()
        ._().ForceFail(constant)
        ._()._().TODO()
        ._().Invert()
        ._()._().Invert()
        ._()._()._().TODO()
        ._().Return(constant)
        ._()._().TODO()
        ._().Retry(3, sleep_secs=[0.0, 0.5])
        ._()._().TODO()
        ._().While("ready", max_loop_times=2)
        ._()._().TODO()
        ._().Timeout(5)
        ._()._().TODO()
        ._()._().Fallback()
        ._()._()._().TODO()
        ._().Wrapper(passthrough)
        ._()._().TODO()
        ._().Cacher(cache_key, store=STORE, expiration=dt.timedelta(minutes=5))
        ._()._().TODO()
        ._().Cacher(cache_key, store=STORE, expiration=(10, 20), enabled=False, name="ranged")
        ._()._().TODO()
        ._().Terminable(cache_key, store=STORE, monitor_interval_ms=100)
        ._()._().TODO()
        ._().Remote(queue="q1")
        ._()._().TODO()
        ._().Local()
        ._()._().TODO()
        ._().Selector()
        ._()._().Failure()
        ._()._().TODO()
        ._().Parallel(concurrency_limit=2)
        ._()._().TODO()
        ._()._().TODO()
        ._().Gather(gather_params, concurrency_limit=4)
        ._().RandomSelector(weights=[1, 2])
        ._()._().TODO()
        ._()._().TODO()
        ._().RandomSelector(weights=weights, name="weighted")
        ._()._().TODO()
        ._()._().TODO()
        ._().If("ready")
        ._()._().TODO()
        ._()._().Else()
        ._()._()._().TODO()
        ._().If(ready)
        ._()._().TODO()
        ._().LLM("fake-model", [{"role": "user", "content": "literal {braces}"}], tools=[WordCount()],
                 temperature=0.0, max_retries=0)
        ._().LLM("fake-model", prompt, name="from_function", batch=True, batch_fallback="fail")
        ._().WaitFor("approval", schema={"type": "object", "properties": {"ok": {"type": "boolean"}}}, timeout_s=5,
                     default=None, prompt="Approve?")
        ._().WaitFor("typed_approval", schema=Approval)
        .End()
    )


@register_function
def count_first(b: dict[str, Any]) -> int:
    return len(b["texts"][0].split()) if b["texts"] else 0


@register_function
def count_all(b: dict[str, Any]) -> list[int]:
    return [len(text.split()) for text in b["texts"]]


@register_type
@dataclass
class Typed:
    text: str
    words: int = 0


@register_function
def count_typed(b: Typed) -> int:
    b.words = len(b.text.split())
    return b.words


typed = Tree[Typed]("spec_typed").Function(count_typed).End()


@register_tool
class Lookup(Tool):
    NAME = "lookup"
    DESCRIPTION = "Looks a subject up."
    SCHEMA = {"type": "object", "properties": {"subject": {"type": "string"}}, "required": ["subject"]}

    async def execute(self, blackboard: Any, arguments: dict[str, Any], context: Any, tracer: Any) -> Any:
        return f"{arguments['subject']} live in trees"


PRE_HOOK_CALLS: list[dict[str, Any]] = []


@register_function
def gather_facts(values: dict[str, Any]) -> dict[str, Any]:
    PRE_HOOK_CALLS.append(values)
    if values.get("topic") == "skip":
        return {"skip": True}
    return {"facts": f"{values['topic']} hoot"}


@register_function
def summarize_outcome(outcome: dict[str, Any]) -> dict[str, Any]:
    return {"answer": outcome["output"], "tools": sorted(r["name"] for r in outcome["tool_results"]),
            "facts": outcome["vars"]["facts"]}


AGENT = """\
tasktree: 1
kind: agent
name: writer
description: Writes about a topic with two tools and a helper agent.
prompt: >-
  CALL:word_count({"text": "$facts"})
  CALL:lookup({"subject": "$topic"})
  CALL:helper({"topic": "$topic"})
llm:
  model: fake-model
  connection: local
connections:
  local:
    base_url: $base_url
    api_key: test
tools:
  - word_count
  - lookup
  - agent:
      name: helper
      description: Answers about a topic.
      prompt: "REPLY:helped with $topic"
      llm: {model: fake-model, connection: local}
      connections:
        local: {base_url: $base_url, api_key: test}
max_iterations: 4
max_total_tokens: 100000
pre_hook: gather_facts
post_hook: summarize_outcome
"""


@register_function
async def gate(b: dict[str, Any]) -> str:
    """Waits (with a deadline) until the test opens the gate key named in the blackboard: a step that is visibly
    running for as long as a test needs, without a sleep deciding anything."""
    import asyncio
    import os

    from tasktree_dist.core.redis_client import connect

    client = connect(os.environ["TASKTREE_REDIS_URL"], asynchronous=True)
    try:
        for _ in range(600):
            if await client.exists(b["gate"]):
                return "opened"
            await asyncio.sleep(0.05)  # polling a key with a deadline
        raise TimeoutError(f"gate {b['gate']} was never opened")
    finally:
        await client.aclose()
