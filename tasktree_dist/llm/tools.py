"""Running the tool calls a model asked for: each outcome goes back to the model as a tool message.

A failing call never fails the node: its error is the tool's result, with tinytasktree's texts and codes
(`tool_not_found`: "unknown tool: <name>"; `tool_execution_error`: the exception's message, or "tool arguments
must be a JSON object"), so a model can correct itself on the next turn.
"""

from __future__ import annotations

import inspect
import json
import time
from typing import TYPE_CHECKING, Any

from ..core.trace import Tracer
from .types import Tool, ToolCall, ToolResult

if TYPE_CHECKING:
    from ..core.context import Context

JSONDict = dict[str, Any]
TOOL_NOT_FOUND = "tool_not_found"
TOOL_EXECUTION_ERROR = "tool_execution_error"


def tool_arguments(raw: str) -> JSONDict:
    """The call's arguments: a JSON object (no arguments at all count as `{}`)."""
    try:
        arguments = json.loads(raw or "{}")
    except ValueError as exc:
        raise ValueError(f"tool arguments are not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise ValueError("tool arguments must be a JSON object")
    return arguments


async def run_tool_call(
    call: ToolCall, tools: dict[str, Tool[Any]], b: Any, context: Context, tracer: Tracer
) -> tuple[ToolResult, JSONDict]:
    """Run one call (arguments first, then the tool, as tinytasktree): its ToolResult and its tool message."""
    started = time.perf_counter()
    name, raw = call.function.name, call.function.arguments
    outcome = ToolResult(id=call.id, name=name, arguments={})
    tool = code = None
    try:
        outcome.arguments = tool_arguments(raw)
        tool = tools.get(name)
        if tool is None:
            code, outcome.error = TOOL_NOT_FOUND, f"unknown tool: {name}"
        else:
            value = tool.execute(b, outcome.arguments, context, tracer)
            outcome.result = await value if inspect.isawaitable(value) else value
    except Exception as exc:  # noqa: BLE001 - a tool error goes back to the model, never crashes the node
        code, outcome.error = TOOL_EXECUTION_ERROR, str(exc) or type(exc).__name__
        tracer.log(f"tool {name!r} failed: {type(exc).__name__}: {exc}", "error")
    else:
        if code is not None:
            tracer.log(f"tool {name!r} failed: {outcome.error} (available: {', '.join(sorted(tools)) or 'none'})",
                       "error")
    outcome.ok = code is None
    outcome.duration_ms = round((time.perf_counter() - started) * 1000, 3)
    body: JSONDict = {"ok": outcome.ok}
    if tool is not None and outcome.ok:
        body.update(executed=tool.format_call(outcome.arguments), result=outcome.result)
    else:
        body.update(executed=f"{name}({raw or '{}'})", error=outcome.error, code=code)
    body["duration_ms"] = outcome.duration_ms
    content = json.dumps(body, ensure_ascii=False, default=str, separators=(",", ":"))
    return outcome, {"role": "tool", "tool_call_id": call.id, "name": name, "content": content}
