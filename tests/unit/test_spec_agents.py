"""Agents as data, in-process against the fake LLM server over real HTTP: two tools, a tool agent, a pre-hook whose
result fills the prompt (or skips the run before any LLM call), a post-hook, the limits, the typed events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tasktree_dist import Context, SpecError, Tree
from tasktree_dist.builder.spec import validate
from tasktree_dist.core import run_events
from tests.spec_trees import AGENT, PRE_HOOK_CALLS


async def run(tree: Any, board: dict[str, Any], run_id: str | None = None, errors: list[str] | None = None) -> Any:
    context = Context(run_id=run_id)
    async with context.using_blackboard(board):
        result = await tree(context)
    if errors is not None:
        errors.extend(n.attributes["error"] for n in context.trace_root().walk() if "error" in n.attributes)
    return result


async def test_an_agent_with_two_tools_a_tool_agent_and_hooks_runs(fake_llm: Any) -> None:
    events: list[tuple[str, str, dict[str, Any]]] = []

    async def sink(run_id: str, kind: str, data: dict[str, Any]) -> None:
        events.append((run_id, kind, data))

    tree = Tree.from_spec(AGENT, {"topic": "owls", "base_url": fake_llm.base_url})
    board: dict[str, Any] = {}
    run_events.set_event_sink(sink)
    try:
        result = await run(tree, board, run_id="agent-run")
    finally:
        run_events.set_event_sink(None)
    assert result.is_ok(), board
    assert result.data == {"answer": "tool results: " + "; ".join(
        m["content"] for m in board["messages"] if m["role"] == "tool"), "tools": ["helper", "lookup", "word_count"],
        "facts": "owls hoot"}
    assert board["turns"] == 2 and board["tokens"] > 0
    results = {r["name"]: r["result"] for r in board["tool_results"]}
    assert results == {"word_count": 2, "lookup": "owls live in trees", "helper": "helped with owls"}
    assert PRE_HOOK_CALLS[-1] == {"topic": "owls", "base_url": fake_llm.base_url}
    first_prompt = fake_llm.requests[0]["messages"][0]["content"]
    assert '"text": "owls hoot"' in first_prompt  # the pre-hook's result filled $facts
    assert {run_id for run_id, _, _ in events} == {"agent-run"}
    kinds = [kind for _, kind, data in events if data["agent"] == "writer"]
    # turn 1: three tool calls as they run, then the turn's messages (the assistant's calls, the tools' answers)
    assert kinds == ["agent_turn_start", *["agent_tool_start", "agent_tool_end"] * 3, *["agent_message"] * 4,
                     "agent_turn_end", "agent_turn_start", "agent_message", "agent_turn_end"]
    helper = [kind for _, kind, data in events if data["agent"] == "helper"]
    assert helper == ["agent_turn_start", "agent_message", "agent_turn_end"]  # the tool agent's own turn
    tool_ends = [data for _, kind, data in events if kind == "agent_tool_end"]
    assert {d["tool"] for d in tool_ends} == {"word_count", "lookup", "helper"} and all(d["ok"] for d in tool_ends)


async def test_a_pre_hook_returning_skip_ends_the_run_before_any_llm_call(fake_llm: Any) -> None:
    tree = Tree.from_spec(AGENT, {"topic": "skip", "base_url": fake_llm.base_url})
    board: dict[str, Any] = {}
    result = await run(tree, board)
    assert result.is_ok() and result.data == {"skipped": True}
    assert fake_llm.calls == 0 and board["skipped"] is True


async def test_the_iteration_limit_fails_the_run_naming_it(fake_llm: Any) -> None:
    looping = AGENT.replace("max_iterations: 4", "max_iterations: 1")
    tree = Tree.from_spec(looping, {"topic": "owls", "base_url": fake_llm.base_url})
    errors: list[str] = []
    result = await run(tree, {}, errors=errors)
    assert not result.is_ok()
    assert errors == ["agent 'writer' stopped after 1 turn(s) without a final answer: max_iterations=1 reached"]


def test_bad_agent_documents_are_refused_naming_the_place() -> None:
    problems = [str(p) for p in validate(AGENT.replace("  - lookup\n", "  - lookdown\n"),
                                         {"topic": "x", "base_url": "http://x"})]
    assert any(p.startswith("18:5: tool 'lookdown' is not registered") for p in problems), problems
    problems = [str(p) for p in validate(AGENT.replace("pre_hook: gather_facts\n", ""), {"base_url": "http://x"})]
    assert any("$topic has no value" in p for p in problems), problems
    with pytest.raises(SpecError, match="connection 'remote' is neither"):
        Tree.from_spec(AGENT.replace("connection: local\nconnections", "connection: remote\nconnections"),
                       {"topic": "x", "base_url": "http://x"})
    with pytest.raises(SpecError, match="unknown key 'max_turns'"):
        Tree.from_spec(AGENT + "max_turns: 3\n", {"topic": "x", "base_url": "http://x"})


def test_an_agent_spec_round_trips() -> None:
    tree = Tree.from_spec(AGENT, {"topic": "owls", "base_url": "http://x"})
    again = Tree.from_spec(tree.to_spec(), {"topic": "owls", "base_url": "http://x"})
    assert again.fingerprint == tree.fingerprint


def test_agent_events_read_as_lines_in_tasktree_events() -> None:
    from tasktree_dist.cli.render import event_line
    from tasktree_dist.runs.model import RunEvent

    def line(kind: str, data: dict[str, Any]) -> str:
        return event_line(RunEvent("1700000000000-0", kind, data), False).plain.split(" ", 1)[1]

    assert line("agent_turn_start", {"agent": "writer", "turn": 2}) == "writer turn start  turn=2"
    assert line("agent_tool_end", {"agent": "writer", "tool": "lookup", "ok": False, "error": "boom"}) == \
        "writer ✗ lookup  boom"
    assert line("agent_message", {"agent": "writer", "role": "assistant", "content": "hi"}) == \
        "writer assistant: hi"


async def test_connections_from_settings_read_the_key_where_the_call_runs(fake_llm: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKTREE_LLM_CONNECTIONS", json.dumps(
        {"fleet": {"base_url": fake_llm.base_url, "api_key_env": "SPEC_TEST_KEY"}}))
    monkeypatch.setenv("SPEC_TEST_KEY", "key-from-the-environment")
    document = {"tasktree": 1, "kind": "agent", "name": "plain", "prompt": "REPLY:hello $who",
                "llm": {"model": "fake-model", "connection": "fleet"}}
    result = await run(Tree.from_spec(document, {"who": "owls"}), {})
    assert result.is_ok() and result.data == "hello owls"
    assert fake_llm.request_meta[-1]["headers"]["authorization"] == "Bearer key-from-the-environment"


def test_a_document_never_points_the_processes_key_at_its_own_url() -> None:
    stolen = AGENT.replace("    api_key: test\n", "    api_key_env: OPENAI_API_KEY\n", 1)
    problems = [str(p) for p in validate(stolen, {"topic": "x", "base_url": "http://attacker"})]
    assert any(p.startswith("15:18: api_key_env is accepted only in TASKTREE_LLM_CONNECTIONS") for p in problems)
    keyless = AGENT.replace("    api_key: test\n", "", 1)
    problems = [str(p) for p in validate(keyless, {"topic": "x", "base_url": "http://attacker"})]
    assert any("connection 'local' in the document needs its api_key" in p for p in problems), problems
    llm = {"tasktree": 1, "name": "n", "root": {"kind": "LLM", "model": "m", "base_url": "http://attacker",
                                                 "messages": [{"role": "user", "content": "hi"}]}}
    smuggled = {**llm, "root": {**llm["root"], "base_url": None, "api_key": None,
                                "client_kwargs": {"base_url": "http://attacker"}}}
    assert any("Additional properties are not allowed ('base_url' was unexpected)" in p.message
               for p in validate(smuggled))
    assert [p.message for p in validate(llm)] == [
        "LLM: an LLM with a base_url in the spec needs its api_key too (a value or {function: <name>}): the "
        "processes' own key is never sent to a URL a spec names"]
