"""What the example specs (examples/specs/*.yaml) name: functions, a tool, hooks. A fleet lists this module in
TASKTREE_IMPORTS; `tasktree run/validate -i examples.spec_parts` imports it here."""

from __future__ import annotations

from typing import Any

from tasktree_dist import Tool, register_function, register_tool


@register_function
def count_words(b: dict[str, Any]) -> int:
    return len(b["text"].split())


@register_function
def find_facts(values: dict[str, Any]) -> dict[str, Any]:
    """Pre-hook: facts for the prompt's $facts; a topic of "none" skips the run before any LLM call."""
    if values["topic"] == "none":
        return {"skip": True}
    return {"facts": f"{values['topic']} are nocturnal"}


@register_function
def keep_output(outcome: dict[str, Any]) -> dict[str, Any]:
    """Post-hook: the run's result."""
    return {"note": outcome["output"], "tools_used": [r["name"] for r in outcome["tool_results"]]}


@register_tool
class Encyclopedia(Tool):
    NAME = "encyclopedia"
    DESCRIPTION = "Looks a subject up."
    SCHEMA = {"type": "object", "properties": {"subject": {"type": "string"}}, "required": ["subject"]}

    async def execute(self, blackboard: Any, arguments: dict[str, Any], context: Any, tracer: Any) -> str:
        return f"{arguments['subject']}: an entry"
