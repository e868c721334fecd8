"""The trace model: one TraceNode per executed node under a TraceRoot per run.

JSON follows tinytasktree's format (children keyed by unique name, logs as "time [level] : message" lines,
duration in ms, attribute values as strings) so its trace viewer and existing tooling read ours. Trace nodes are
made on the hot path, so they are slotted and keep float timestamps; datetimes and JSON are built on demand.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import orjson

from .display import display_string
from .redact import redact_text
from .result import Result, Status

JSONDict = dict[str, Any]
#: Log levels a run reports as events (a trace's own logs keep every level).
ALERT_LEVELS = frozenset({"warning", "error", "critical"})
#: Levels of trace log lines (any other string is written as given).
TraceLevel = Literal["info", "warning", "error"]


def _token_fields(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    tokens = {k: int(value[k]) for k in ("prompt", "completion", "total") if isinstance(value.get(k), int | float)}
    if "total" not in tokens and "prompt" in tokens and "completion" in tokens:
        tokens["total"] = tokens["prompt"] + tokens["completion"]
    return tokens


def fragment_alerts(fragment: JSONDict) -> list[tuple[str, str, str]]:
    """(path from the fragment's own node, level, message) of every warning or error logged in a trace fragment."""
    alerts = []
    stack: list[tuple[str, JSONDict]] = [("", fragment)]
    while stack:
        prefix, item = stack.pop()
        path = f"{prefix}/{item.get('name', '')}" if prefix else str(item.get("name", ""))
        for line in item.get("logs") or ():
            head, _, message = str(line).partition(" : ")
            level = head.rpartition("[")[2].rstrip("]")
            if level in ALERT_LEVELS:
                alerts.append((path, level, message))
        stack.extend((path, child) for child in item.get("children") or ())
    return alerts


#: Items of a long list result shown in a trace node: a 100,000-item Gather's data is in the run's result, and
#: rendering all of it at every trace write would cost the coordinator a copy of it as text each time.
RESULT_ITEMS_SHOWN = 200


def _result_json(result: Any) -> JSONDict | None:
    if not hasattr(result, "json"):
        return None
    data = getattr(result, "data", None)
    if isinstance(data, list | tuple) and len(data) > RESULT_ITEMS_SHOWN:
        more = f"… {len(data) - RESULT_ITEMS_SHOWN} more items (not shown in the trace)"
        return {"status": str(result.status), "data": display_string([*data[:RESULT_ITEMS_SHOWN], more])}
    return result.json()


def _safe(value: Any) -> Any:
    """JSON-native values stay as they are (chat transcripts, token dicts); anything else becomes display text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | dict):
        try:
            orjson.dumps(value)
            return value
        except TypeError:
            return display_string(value)
    return display_string(value)


class PagedChildren:
    """The children of a large fan-out that are not kept in memory: how many, what they cost, where to read them.

    A coordinator keeps the first children of a fan-out (what a viewer's first screen shows) and its failed ones;
    the others are counted here and read back from the run's unit records on demand (`RunClient.trace_children`),
    so a 100,000-item Gather costs the coordinator O(kept) trace memory, not O(N)."""

    __slots__ = ("total", "kept_below", "unit", "count", "cost", "tokens", "failed")

    def __init__(self, total: int, kept_below: int, unit: str) -> None:
        self.total = total
        self.kept_below = kept_below
        #: Execution id of child {i} within its run, as a format string (the unit records' key).
        self.unit = unit
        self.count = 0
        self.cost = 0.0
        self.tokens: dict[str, int] = {}
        self.failed = 0

    def add(self, cost: float, tokens: dict[str, int]) -> None:
        self.count += 1
        self.cost += cost
        for key, value in tokens.items():
            self.tokens[key] = self.tokens.get(key, 0) + value

    def json(self) -> JSONDict:
        return {"count": self.count, "total": self.total, "kept_below": self.kept_below, "unit": self.unit,
                "cost": self.cost, "tokens": dict(self.tokens)}


class TraceNode:
    """What one node execution did: timing, result, logs, cost and attributes."""

    __slots__ = ("name", "kind", "parent", "_children", "started", "ended", "cost", "logs", "result", "attributes",
                 "paged")

    def __init__(self, name: str = "", kind: str = "", parent: TraceNode | None = None) -> None:
        self.name = name
        self.kind = kind
        self.parent = parent
        self._children: list[TraceNode] = []
        self.started: float = time.time()
        self.ended: float | None = None
        self.cost: float = 0.0
        self.logs: list[str] = []
        self.result: Any = None
        self.attributes: JSONDict = {}
        self.paged: PagedChildren | None = None

    # -- structure --------------------------------------------------------------------------------------------
    def add_child(self, name: str, kind: str = "") -> TraceNode:
        node = TraceNode(name, kind, self)
        self._children.append(node)
        return node

    @property
    def children(self) -> dict[str, TraceNode]:
        """Children by unique name; a name run again (loops, retries) gets `#2`, `#3`... in run order."""
        out: dict[str, TraceNode] = {}
        for child in self._children:
            key, n = child.name, 1
            while key in out:
                n += 1
                key = f"{child.name}#{n}"
            out[key] = child
        return out

    def child_list(self) -> list[TraceNode]:
        return list(self._children)

    @property
    def path(self) -> list[str]:
        names = []
        node: TraceNode | None = self
        while node is not None:
            names.append(node.name)
            node = node.parent
        names.reverse()
        return names

    def position(self) -> str:
        """Where this node sits in its trace: its index under each ancestor, from the root ("0.2.0.7").

        Deterministic for a given control flow (Gather and Parallel add their children in index order, loops and
        retries append), so it tells two executions of one node apart the same way in every replay of a run. The
        scan runs from the end, where a running node almost always is."""
        parts: list[int] = []
        node = self
        while node.parent is not None:
            siblings = node.parent._children
            for i in range(len(siblings) - 1, -1, -1):
                if siblings[i] is node:
                    parts.append(i)
                    break
            node = node.parent
        return ".".join(map(str, reversed(parts)))

    def walk(self) -> Iterator[TraceNode]:
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node._children))

    # -- timing -----------------------------------------------------------------------------------------------
    def set_start(self) -> None:
        self.started = time.time()
        self.ended = None

    def set_end(self, result: Any) -> None:
        self.ended = time.time()
        self.result = result

    finish = set_end

    def set_kind(self, kind: str) -> None:
        self.kind = kind

    @property
    def finished(self) -> bool:
        return self.ended is not None

    @property
    def start_at(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self.started)

    @property
    def end_at(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self.ended if self.ended is not None else 0)

    @property
    def duration(self) -> _dt.timedelta:
        return _dt.timedelta(seconds=(self.ended - self.started) if self.ended is not None else 0)

    @property
    def duration_ms(self) -> float:
        return (self.ended - self.started) * 1000.0 if self.ended is not None else 0.0

    # -- recording --------------------------------------------------------------------------------------------
    def log(self, msg: Any, level: TraceLevel | str = "info") -> None:
        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        self.logs.append(f"{stamp} [{level}] : {msg}")
        if level in ALERT_LEVELS:  # rare: only warnings and errors look for a listener at the root
            root = self
            while root.parent is not None:
                root = root.parent
            listener = getattr(root, "on_alert", None)
            if listener is not None:
                listener(self, str(level), str(msg))

    def error(self, e: str | BaseException) -> None:
        if isinstance(e, BaseException):
            text = redact_text(f"{type(e).__name__}: {e}")
            self.attributes["error"] = text
            self.log(text, "error")
        else:
            self.log(e, "error")

    def warning(self, msg: Any) -> None:
        self.log(msg, "warning")

    def incr_cost(self, delta: float) -> None:
        self.cost += float(delta or 0.0)

    def incr_tokens(self, prompt: int = 0, completion: int = 0) -> None:
        """Add token usage to this node (summed into the root's total_tokens)."""
        tokens = _token_fields(self.attributes.get("tokens"))
        prompt_total = tokens.get("prompt", 0) + int(prompt or 0)
        completion_total = tokens.get("completion", 0) + int(completion or 0)
        self.attributes["tokens"] = {
            "prompt": prompt_total,
            "completion": completion_total,
            "total": prompt_total + completion_total,
        }

    def update_attributes(self, **kwargs: Any) -> None:
        self.attributes.update(kwargs)
        transcript = kwargs.get("chat_transcript")
        if isinstance(transcript, list):
            self.attributes["chat_transcript"] = list(transcript)  # a snapshot, not the live list
            self.attributes["has_chat"] = True
            self.attributes["chat_messages_count"] = len(transcript)

    # -- totals and rendering ---------------------------------------------------------------------------------
    def total_cost(self) -> float:
        return sum(node.cost + (node.paged.cost if node.paged is not None else 0.0) for node in self.walk())

    def total_tokens(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for node in self.walk():
            for key, value in _token_fields(node.attributes.get("tokens")).items():
                total[key] = total.get(key, 0) + value
            if node.paged is not None:
                for key, value in node.paged.tokens.items():
                    total[key] = total.get(key, 0) + value
        return total

    def json(self) -> JSONDict:
        result = self.result
        data = {
            "name": self.name,
            "kind": self.kind,
            "start_at": self.start_at.isoformat(),
            "end_at": self.end_at.isoformat(),
            "duration": self.duration_ms,
            "finished": self.ended is not None,
            "cost": self.cost,
            "logs": list(self.logs),
            "result": _result_json(result),
            "attributes": {k: v if isinstance(v, bool | int | float) else display_string(v) for k, v in
                           self.attributes.items()},
            "children": {key: child.json() for key, child in self.children.items()},
        }
        if self.paged is not None:
            data["paged"] = self.paged.json()
        return data

    # -- crossing processes -----------------------------------------------------------------------------------
    def to_fragment(self) -> JSONDict:
        """A JSON form that rebuilds this subtree in another process (float times, values made JSON-safe)."""
        result = self.result
        return {
            "name": self.name,
            "kind": self.kind,
            "started": self.started,
            "ended": self.ended,
            "cost": self.cost,
            "logs": list(self.logs),
            "result": None if result is None else {"status": int(result.status), "data": _safe(result.data)},
            "attributes": {k: _safe(v) for k, v in self.attributes.items()},
            "children": [child.to_fragment() for child in self._children],
        }

    @classmethod
    def from_fragment(cls, data: JSONDict, parent: TraceNode | None = None) -> TraceNode:
        node = cls(data.get("name", ""), data.get("kind", ""), parent)
        node.absorb(data)
        node.started = float(data.get("started") or node.started)
        ended = data.get("ended")
        node.ended = float(ended) if ended is not None else None
        return node

    def absorb(self, data: JSONDict) -> None:
        """Merge a fragment of this same node (run elsewhere) into it: logs, attributes, cost, result, children."""
        self.logs.extend(data.get("logs") or ())
        self.attributes.update(data.get("attributes") or {})
        self.cost += float(data.get("cost") or 0.0)
        result = data.get("result")
        if result is not None:
            self.result = Result(Status(result["status"]), result.get("data"))
        for child in data.get("children") or ():
            self._children.append(TraceNode.from_fragment(child, self))

    def __repr__(self) -> str:
        return f"TraceNode({'/'.join(self.path)!r}, kind={self.kind!r}, finished={self.finished})"


class TraceRoot(TraceNode):
    """The trace of one run (named ROOT, like tinytasktree's); adds run-wide totals to the JSON."""

    __slots__ = ("trace_id", "on_alert")

    def __init__(self, name: str = "ROOT", kind: str = "ROOT") -> None:
        super().__init__(name, kind, None)
        self.trace_id: str | None = None
        #: Called as on_alert(node, level, message) for each warning or error logged anywhere in this trace (a
        #: recorded run turns them into events).
        self.on_alert: Callable[[TraceNode, str, str], Any] | None = None

    def json(self) -> JSONDict:
        data = super().json()
        data["total_cost"] = self.total_cost()
        tokens = self.total_tokens()
        data["total_tokens"] = tokens
        return data


Tracer = TraceNode
