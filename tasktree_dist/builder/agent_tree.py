"""An agent as a tree (the document is read by spec_agent):

    Sequence(<name>)
      Function(start)          vars = defaults + --var values + the blackboard + the pre-hook's result; the prompt
                               rendered ($names); a pre-hook returning {"skip": true} ends the run here
      Selector(run)
        Assertion(b.skipped)
        While(turns: not done, tokens under max_total_tokens; at most max_iterations rounds)
          Sequence(turn): Function(turn_start), LLM (the conversation so far, the tools), Function(turn_end)
      Function(finish)         the final answer, given to the post-hook with the tool results (a limit reached
                               first FAILs the run, naming it)

The blackboard is a dict (JSON from any submitter): the inputs, plus the agent's state (`messages`, `vars`,
`turns`, `tokens`, `output`, `tool_results`, `done`, `skipped`), so every step can run on any worker. Each turn,
message and tool call is a typed event on the run's stream (core.run_events). A tool may be another agent
(`tools: [{agent: {...}}]`): it runs in-process where its caller's tool call runs, on a blackboard of its arguments.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.callables import resolve
from ..core.result import Result, Status
from ..core.run_events import emit

STATE_KEYS = frozenset({"messages", "vars", "turns", "tokens", "output", "tool_results", "done", "skipped", "result"})
PROMPT_VAR = re.compile(r"\$(\$|\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")
DEFAULT_MAX_ITERATIONS = 10


@dataclass
class AgentConfig:
    name: str
    prompt: str
    model: str
    description: str = ""
    system: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    tools: list[Any] = field(default_factory=list)
    base_url: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    max_total_tokens: int | None = None
    pre_hook: Callable[..., Any] | None = None
    post_hook: Callable[..., Any] | None = None

    def prompt_vars(self) -> list[str]:
        return prompt_vars(self.prompt) + prompt_vars(self.system)


def prompt_vars(text: str) -> list[str]:
    return [m.group(2) or m.group(3) for m in PROMPT_VAR.finditer(text or "") if m.group(1) != "$"]


def fill_prompt(text: str, values: dict[str, Any], agent: str) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        name = match.group(2) or match.group(3)
        if name not in values:
            raise KeyError(f"agent {agent!r}: ${name} has no value (give it with --var {name}=..., in the blackboard, "
                           "or return it from the pre-hook)")
        value = values[name]
        return value if isinstance(value, str) else str(value)

    return PROMPT_VAR.sub(one, text)


class EventTool:
    """A tool as the agent offers it: the same name and schema, with tool start/end events around each call."""

    def __init__(self, inner: Any, agent: str) -> None:
        self.inner, self.agent = inner, agent
        self.NAME = inner.NAME

    def description(self) -> str:
        return self.inner.description()

    def openai_schema(self) -> dict[str, Any]:
        return self.inner.openai_schema()

    def format_call(self, arguments: Any) -> str:
        return self.inner.format_call(arguments)

    async def execute(self, blackboard: Any, arguments: dict[str, Any], context: Any, tracer: Any) -> Any:
        base = {"agent": self.agent, "tool": self.NAME}
        await emit(context, tracer, "agent_tool_start", {**base, "arguments": arguments})
        try:
            value = self.inner.execute(blackboard, arguments, context, tracer)
            value = await resolve(value)
        except Exception as exc:
            await emit(context, tracer, "agent_tool_end", {**base, "ok": False, "error": str(exc)[:500]})
            raise
        await emit(context, tracer, "agent_tool_end", {**base, "ok": True, "result": _short(value)})
        return value


class AgentTool:
    """Another agent offered as a tool: its $names are the arguments; it runs where the call runs."""

    def __init__(self, tree: Any, config: AgentConfig) -> None:
        self.tree, self.config = tree, config
        self.NAME = config.name
        names = [n for n in dict.fromkeys(config.prompt_vars()) if n not in config.defaults]
        self.SCHEMA = {"type": "object", "properties": {n: {"type": "string"} for n in names}, "required": names}

    def description(self) -> str:
        return self.config.description or f"Ask the agent {self.config.name!r}."

    def openai_schema(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.NAME, "description": self.description(), "parameters": self.SCHEMA}}

    def format_call(self, arguments: Any) -> str:
        return f"{self.NAME}({arguments})"

    async def execute(self, blackboard: Any, arguments: dict[str, Any], context: Any, tracer: Any) -> Any:
        board = dict(arguments)
        context._blackboards.append(board)
        try:
            result = await self.tree(context)
        finally:
            context._blackboards.pop()
        if not result.is_ok():
            raise RuntimeError(f"agent {self.NAME!r} failed: {_short(result.data)}")
        return result.data


def _short(value: Any, limit: int = 2000) -> Any:
    text = value if isinstance(value, str) else repr(value)
    return value if len(text) <= limit and isinstance(value, str | int | float | bool | None) else text[:limit]


def compile_agent(tree_class: Any, config: AgentConfig, tree_name: str) -> Any:
    name = config.name
    tools = [EventTool(AgentTool(_tool_tree(tree_class, tool), tool) if isinstance(tool, AgentConfig) else tool, name)
             for tool in config.tools]

    async def start(b: Any, tracer: Any, context: Any) -> Any:
        if not isinstance(b, dict):
            raise TypeError(f"agent {name!r} runs on a JSON object blackboard, got {type(b).__name__}")
        values = {**config.defaults, **{k: v for k, v in b.items() if k not in STATE_KEYS}}
        if config.pre_hook is not None:
            extra = await resolve(config.pre_hook(dict(values)))
            if extra is not None and not isinstance(extra, dict):
                raise TypeError(f"agent {name!r}: pre_hook must return a dict or None, got {type(extra).__name__}")
            if (extra or {}).get("skip") is True:
                b.update(vars=values, skipped=True, done=True)
                await emit(context, tracer, "agent_skipped", {"agent": name})
                return {"skipped": True}
            values.update(extra or {})
        messages = [{"role": "system", "content": fill_prompt(config.system, values, name)}] if config.system else []
        messages.append({"role": "user", "content": fill_prompt(config.prompt, values, name)})
        b.update(vars=values, messages=messages, skipped=False, done=False, turns=0, tokens=0, output="",
                 tool_results=[])
        return None

    def continues(b: Any) -> bool:
        under = config.max_total_tokens is None or b["tokens"] < config.max_total_tokens
        return not b["done"] and under

    async def turn_start(b: Any, tracer: Any, context: Any) -> None:
        b["turns"] += 1
        await emit(context, tracer, "agent_turn_start", {"agent": name, "turn": b["turns"]})

    async def turn_end(b: Any, tracer: Any, context: Any) -> Any:
        last = context.last_result
        record = last.data if last is not None else None
        if record is None or not hasattr(record, "emitted_messages"):
            raise TypeError(f"agent {name!r}: the LLM step left no record")
        b["messages"] = [*b["messages"], *record.emitted_messages]
        b["tokens"] += int(record.usage.get("total", 0) or 0)
        b["tool_results"] = [*b["tool_results"], *(r.json() for r in record.tool_results)]
        for message in record.emitted_messages:
            await emit(context, tracer, "agent_message", {
                "agent": name, "turn": b["turns"], "role": message.get("role"),
                "content": _short(message.get("content") or ""),
                **({"tool_calls": [c["function"]["name"] for c in message["tool_calls"]]}
                   if message.get("tool_calls") else {}),
            })
        b["done"] = not record.tool_calls
        if b["done"]:
            b["output"] = record.final_output
        await emit(context, tracer, "agent_turn_end", {"agent": name, "turn": b["turns"], "tokens": b["tokens"],
                                                       "done": b["done"]})
        return record.final_output

    async def finish(b: Any, tracer: Any, context: Any) -> Any:
        if b["skipped"]:
            return {"skipped": True}
        if not b["done"]:
            if b["turns"] >= config.max_iterations:
                why = f"max_iterations={config.max_iterations} reached"
            elif config.max_total_tokens is not None and b["tokens"] >= config.max_total_tokens:
                why = f"max_total_tokens={config.max_total_tokens} reached ({b['tokens']} used)"
            else:
                why = "a turn failed (see the trace)"
            message = f"agent {name!r} stopped after {b['turns']} turn(s) without a final answer: {why}"
            tracer.error(message)
            tracer.update_attributes(error=message)  # the run's error, wherever it runs
            return Result(Status.FAIL, {"error": message})
        data: Any = b["output"]
        if config.post_hook is not None:
            value = await resolve(config.post_hook({"output": b["output"], "tool_results": b["tool_results"],
                                                    "vars": b["vars"]}))
            data = data if value is None else value
        b["result"] = data
        return data

    api_key: Any = config.api_key
    if config.api_key_env:
        env = config.api_key_env

        def api_key(b: Any) -> str | None:  # read where the call runs: the key never travels in a spec
            return os.environ.get(env)

    def conversation(b: Any) -> list[dict[str, Any]]:
        return b["messages"]

    return (
        tree_class(tree_name)
        .Sequence(name=name)
        ._().Function(start, name="start")
        ._().Selector(name="run")
        ._()._().Assert("skipped")
        ._()._().While(continues, max_loop_times=config.max_iterations, name="turns")
        ._()._()._().Sequence(name="turn")
        ._()._()._()._().Function(turn_start, name="turn_start")
        ._()._()._()._().LLM(config.model, conversation, name="llm", base_url=config.base_url, api_key=api_key,
                             tools=tools or None, **config.call_kwargs)
        ._()._()._()._().Function(turn_end, name="turn_end")
        ._().Function(finish, name="finish")
        .End()
    )


def _tool_tree(tree_class: Any, config: AgentConfig) -> Any:
    """A tool agent's tree: unnamed, so it is not registered (it runs inside its caller's tool call)."""
    tree = compile_agent(tree_class, config, "")
    tree.fullname = f"Tree({config.name})"
    return tree
