"""How runs, events and traces look in a terminal (rich), and as JSON for scripts."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

from pydantic_core import to_jsonable_python
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree as RichTree

from ..runs.model import RunEvent, RunState, RunStatus

STATE_STYLE = {
    RunState.QUEUED: "cyan", RunState.RUNNING: "yellow", RunState.WAITING: "blue", RunState.SUCCEEDED: "green",
    RunState.FAILED: "bold red", RunState.CANCELLED: "magenta",
}


def to_json(value: Any) -> str:
    """Plain JSON of anything a run holds (dataclasses, pydantic models, LLM records...), for scripts."""
    return json.dumps(to_jsonable_python(value, fallback=repr), ensure_ascii=False, indent=2)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:.0f} s" if minutes < 60 else f"{minutes / 60:.1f} h"


def when(moment: _dt.datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "–"


def state_text(state: RunState) -> Text:
    return Text(state.value, style=STATE_STYLE.get(state, ""))


def progress_text(status: RunStatus) -> str:
    p = status.progress
    failed = f", {p.failed} failed" if p.failed else ""
    return f"{p.done}/{p.total} units{failed}" if p.total else "–"


def cost_text(status: RunStatus) -> str:
    return f"${status.cost_usd:.4f}" if status.cost_usd is not None else "–"


def status_table(status: RunStatus) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    rows: list[tuple[str, Any]] = [
        ("run", status.id), ("tree", status.tree), ("state", state_text(status.state)), ("mode", status.mode.value),
        ("progress", progress_text(status)), ("created", when(status.created_at)),
        ("started", when(status.started_at)), ("finished", when(status.finished_at)),
        ("duration", duration(status.duration_s)),
        ("tokens", str(status.tokens) if status.tokens is not None else "–"),
        ("cost", cost_text(status)), ("attempt", str(status.attempt)),
    ]
    if status.coordinator:
        rows.append(("coordinator", status.coordinator))
    if status.labels:
        rows.append(("labels", ", ".join(f"{k}={v}" for k, v in sorted(status.labels.items()))))
    if status.error:
        where = " ".join(filter(None, [status.error.node and f"at {status.error.node}",
                                       status.error.worker and f"on {status.error.worker}"]))
        rows.append(("error", Text(f"{status.error.message}" + (f" ({where})" if where else ""), style="red")))
    for name, value in rows:
        table.add_row(name, value)
    return table


def runs_table(runs: list[RunStatus]) -> Table:
    table = Table(show_lines=False, header_style="bold")
    for column in ("run", "tree", "state", "progress", "duration", "tokens", "cost", "created", "error"):
        table.add_column(column, overflow="fold" if column in ("run", "error") else "ellipsis")
    for run in runs:
        error = run.error.message[:80] if run.error else ""
        table.add_row(run.id, run.tree, state_text(run.state), progress_text(run), duration(run.duration_s),
                      str(run.tokens) if run.tokens is not None else "–", cost_text(run), when(run.created_at),
                      Text(error, style="red"))
    return table


def waits_table(waits: list[Any]) -> Table:
    """Pending waits (runs.waits.PendingWait): what each waits for, where, since when, until when, and the
    payload's fields (required ones starred)."""
    table = Table(show_lines=False, header_style="bold")
    for column in ("name", "node", "prompt", "payload", "since", "deadline"):
        table.add_column(column, overflow="fold")
    for wait in waits:
        schema = wait.schema or {}
        required = set(schema.get("required") or ())
        fields = ", ".join(f"{name}{'*' if name in required else ''}" for name in (schema.get("properties") or {}))
        payload = fields or str(schema.get("type") or "any JSON")
        prompt = wait.prompt if isinstance(wait.prompt, str) else to_json(wait.prompt) if wait.prompt else ""
        table.add_row(wait.name, wait.node, prompt, payload, when(wait.since), when(wait.deadline))
    return table


def event_json(event: RunEvent) -> str:
    return json.dumps({"id": event.id, "time": event.time.isoformat(), "type": event.type, "data": event.data},
                      ensure_ascii=False, default=str)


def event_line(event: RunEvent, every_unit: bool) -> Text | None:
    """A line for a state change, a warning or error logged in the trace, or a failed unit (every unit with
    `every_unit`); progress goes to the bars."""
    data = event.data
    stamp = event.time.astimezone().strftime("%H:%M:%S")
    if event.type == "state":
        extra = " ".join(f"{k}={v}" for k, v in data.items() if k != "state" and v not in (None, "", 0))
        return Text.assemble((stamp + " ", "dim"), ("state ", "bold"), state_text(RunState(data["state"]))
                             if data.get("state") in RunState._value2member_map_ else str(data.get("state")),
                             (" " + extra) if extra else "")
    if event.type == "wait":
        return Text.assemble((stamp + " ", "dim"), ("wait ", "bold"), (str(data.get("name", "")), "blue"),
                             f" {data.get('state', '')}")
    if event.type == "log":
        error = data.get("level") in ("error", "critical")
        return Text.assemble((stamp + " ", "dim"), ("✗ " if error else "! ", "red" if error else "yellow"),
                             str(data.get("node", "")), (f"  {data.get('message', '')}", "red" if error else "yellow"))
    if event.type == "unit" and (every_unit or data.get("status") != "OK"):
        ok = data.get("status") == "OK"
        line = Text.assemble((stamp + " ", "dim"), ("✓ " if ok else "✗ ", "green" if ok else "red"),
                             str(data.get("node")), (f"  {data.get('ms', 0):.0f} ms", "dim"),
                             (f" on {data.get('worker')}", "dim"))
        if data.get("error"):
            line.append(f"\n    {data['error']}", style="red")
        return line
    if event.type.startswith("agent_"):
        return agent_line(stamp, event.type.removeprefix("agent_"), data)
    return None


def agent_line(stamp: str, kind: str, data: dict[str, Any]) -> Text:
    """An agent's turn, message or tool call (builder.spec_agent's events)."""
    who = f"{data.get('agent', '?')}"
    if kind in ("tool_start", "tool_end"):
        failed = kind == "tool_end" and not data.get("ok", True)
        detail = (f"  {data.get('error')}" if failed else f"  -> {data.get('result')}" if kind == "tool_end"
                  else f"  {data.get('arguments')}")
        what = f"{'→' if kind == 'tool_start' else '✗' if failed else '←'} {data.get('tool')}"
        return Text.assemble((stamp + " ", "dim"), (who + " ", "cyan"), what,
                             (detail[:200], "red" if failed else "dim"))
    if kind == "message":
        text = str(data.get("content") or ", ".join(data.get("tool_calls") or []))
        return Text.assemble((stamp + " ", "dim"), (who + " ", "cyan"), (f"{data.get('role')}: ", "bold"), text[:200])
    extra = " ".join(f"{k}={v}" for k, v in data.items() if k != "agent")
    return Text.assemble((stamp + " ", "dim"), (who + " ", "cyan"), kind.replace("_", " "), (f"  {extra}", "dim"))


def trace_tree(trace: dict[str, Any], depth: int) -> RichTree:
    """The trace as a tree: name, status, duration, worker; errors in red."""
    def label(node: dict[str, Any]) -> Text:
        result = node.get("result") or {}
        status = result.get("status") or ("…" if not node.get("finished") else "")
        attributes = node.get("attributes") or {}
        text = Text(str(node.get("name", "?")), style="bold" if node.get("children") else "")
        if status:
            text.append(f"  {status}", style="green" if status == "OK" else "red" if status == "FAIL" else "yellow")
        if isinstance(node.get("duration"), int | float) and node.get("finished"):
            text.append(f"  {node['duration']:.0f} ms", style="dim")
        if attributes.get("worker"):
            text.append(f"  ⚙ {attributes['worker']}", style="cyan")
        if attributes.get("error"):
            text.append(f"\n{attributes['error']}", style="red")
        return text

    def grow(branch: RichTree, node: dict[str, Any], level: int) -> None:
        children = list((node.get("children") or {}).values())
        if level >= depth and children:
            branch.add(Text(f"… {len(children)} more (--depth)", style="dim"))
            return
        for child in children:
            grow(branch.add(label(child)), child, level + 1)
        paged = node.get("paged")
        if paged:
            branch.add(Text(f"… {paged.get('count', 0)} more children kept in unit records (--json or --save "
                            "reads them all)", style="dim"))

    root = RichTree(label(trace))
    grow(root, trace, 0)
    return root


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False)
