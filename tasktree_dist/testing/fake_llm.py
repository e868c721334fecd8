"""An OpenAI-compatible fake LLM server for tests and benchmarks.

Why: tests of LLM nodes and the distributed worker fleet need a real HTTP endpoint
(so the real ``openai`` client, its retries, timeouts and streaming parser are exercised)
whose answers are deterministic and scriptable from the request itself, and which can
inject faults and latency on demand.  Non-streaming chat completions are served by a lean HTTP/1.1
layer (``lean_http``: httptools, a timer per call, no task); everything else by ``aiohttp.web`` on the same port.
It holds hundreds of concurrent connections (latency is an ``asyncio`` sleep, never a blocking one).  It spends
little CPU per request (orjson, no access log, raw headers kept until read), so a client
benchmark measures the client.

Behaviour is scripted by the *last user message* (see :func:`decide_reply`):

* default: echo -> ``"echo: " + <last user text>``
* ``REPLY:<text>`` -> reply exactly ``<text>`` (everything after ``REPLY:``, verbatim)
* with ``tools`` offered: ``CALL:<tool>(<json args>)`` (repeatable) -> tool calls;
  ``CALLRAW:<tool>(<raw>)`` -> tool call whose ``arguments`` string is ``<raw>`` verbatim;
  otherwise mentioning a tool's name (or the word "weather") calls that tool (or the first
  offered one) with arguments built from its JSON schema.
* last message has role ``tool`` -> ``"tool results: " + "; ".join(<tool contents>)``

Faults are selected by header ``X-Fake-Fault`` or by a token inside the model name
(``fail-429``, ``fail-500``, ``timeout``, ``malformed``, ``truncated``); the header also takes
``fail-<status>`` for any other HTTP error status (OpenAI-style error body).  ``X-Fake-Fail-Times: N``
or a model suffix ``-first-N`` limits the fault to the first N calls for that model. ``set_fault(fault,
after_calls=N)`` starts an outage of the whole server after N more calls. A model name with ``ctx-<N>`` has a
context window of N (prompt) tokens: a longer prompt is answered 400 ``context_length_exceeded``.
Other headers: ``X-Fake-Latency-Ms`` (per-request latency override), ``X-Fake-Cost``
(adds ``usage.cost``; a number is used verbatim, anything else prices tokens; a model name
containing ``priced`` does the same).

Rate limits (``rpm``/``tpm``/``window_s`` constructor arguments, ``--rpm``/``--tpm``/``--window-s`` flags, or
``set_limits``): requests and tokens (prompt + completion, as this server counts them) per fixed window of the
server clock, per model; a request over a limit is answered 429 with Retry-After up to the window's end and not
admitted (see ``fake_limits``). ``/stats`` and ``stats.snapshot()`` carry each window's admitted requests and
tokens, ``windows_over_limit`` and ``rate_limited``. ``max_tokens`` / ``max_completion_tokens`` cut a longer answer
(finish_reason ``length``), so prompt + max_tokens bounds what a call can cost. ``X-Fake-Retry-After`` (seconds)
sets Retry-After on a fault's 429/500/503.

Files and batches (``/v1/files``, ``/v1/batches``: OpenAI's Batch API, see ``fake_batches``): a batch answers its
requests as live calls would, after ``batches.configure(delay_s=)``, with a share of errored requests
(``error_share``) or an ``expired`` / ``failed`` outcome.

Run standalone: ``python -m tasktree_dist.testing.fake_llm --port 8001 --latency-ms 200`` (add ``--rpm N --tpm N
--window-s S`` to limit it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import re
import signal
import socket
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from ..core import tuning
from ..llm.types import message_text
from .fake_batches import FakeBatches
from .fake_limits import WindowLimits, retry_after_headers
from .lean_http import LeanHTTPProtocol, LeanRequest, LeanResponse

__all__ = [
    "FAULTS",
    "FakeLLMServer",
    "FakeLLMStats",
    "Reply",
    "ThreadedFakeLLM",
    "ToolCall",
    "decide_reply",
    "main",
    "run_in_thread",
]

MODELS = ("fake-gpt", "fake-gpt-mini", "fake-priced", "fake-echo")
FAULTS = ("fail-429", "fail-500", "timeout", "malformed", "truncated")
TIMEOUT_SLEEP_S = 600.0
MAX_REQUESTS_KEPT = 10_000
PROMPT_PRICE_USD = 1e-6
COMPLETION_PRICE_USD = 2e-6
FALLBACK_CITY = "Paris"
MALFORMED_BODY = "this is { not json"
MAX_BODY = 64 * 1024**2

_DIRECTIVE_RE = re.compile(r"\b(CALLRAW|CALL):([A-Za-z_][\w.\-]*)\(")
_FIRST_N_RE = re.compile(r"-first-(\d+)|-(once)\b")
_WORD_RE = re.compile(r"[A-Za-z][\w'\-]*")
_PIECE_RE = re.compile(r"\s*\S+\s*|\s+")
_FAIL_STATUS_RE = re.compile(r"fail-([1-5]\d\d)")
_CONTEXT_RE = re.compile(r"ctx-(\d+)")


# --------------------------------------------------------------------------- reply scripting


@dataclass(frozen=True)
class ToolCall:
    """A tool call the fake model decided to make (arguments kept as the raw JSON string)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Reply:
    """What the fake model answers: text or tool calls, plus the OpenAI finish_reason."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    cut: bool = False  # cut at max_tokens

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "length" if self.cut else "stop"

    def output_text(self) -> str:
        """Text used to count completion tokens (content or tool-call arguments)."""
        if self.tool_calls:
            return " ".join(f"{c.name} {c.arguments}" for c in self.tool_calls)
        return self.content or ""


def count_words(text: str) -> int:
    """Deterministic stand-in for a tokenizer."""
    return len(text.split())


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Rough word count over every message's text and tool-call arguments (min 1)."""
    total = 0
    for msg in messages:
        total += count_words(message_text(msg.get("content"), sep=" "))
        for call in msg.get("tool_calls") or []:
            total += count_words(str((call.get("function") or {}).get("arguments", "")))
    return max(1, total)


def _tool_name(tool: dict[str, Any]) -> str:
    return str((tool.get("function") or {}).get("name", tool.get("name", "")))


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user":
            return message_text(msg.get("content"), sep=" ")
    return ""


def _trailing_tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """Contents of the consecutive ``tool`` messages at the end of the conversation."""
    results: list[str] = []
    for msg in reversed(messages):
        if msg.get("role") != "tool":
            break
        results.append(message_text(msg.get("content"), sep=" "))
    return list(reversed(results))


def _raw_call_args(text: str, start: int, end: int) -> str:
    """CALLRAW args: everything up to the last ``)`` before the next directive (or the end)."""
    close = text.rfind(")", start, end)
    return text[start:close] if close >= 0 else text[start:end]


def _json_call_args(text: str, start: int, end: int) -> str:
    """CALL args: one JSON value after ``(``; re-serialised compactly.  Falls back to raw text."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return _raw_call_args(text, start, end)
    return json.dumps(value)


def parse_call_directives(text: str) -> list[ToolCall]:
    """All ``CALL:name(json)`` / ``CALLRAW:name(raw)`` directives in order of appearance."""
    matches = list(_DIRECTIVE_RE.finditer(text))
    calls = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        parse = _raw_call_args if match.group(1) == "CALLRAW" else _json_call_args
        calls.append(ToolCall(name=match.group(2), arguments=parse(text, match.end(), end)))
    return calls


def pick_word(text: str, exclude: set[str]) -> str:
    """The last capitalised word of the prompt (e.g. a city), else ``Paris``."""
    words = [w.strip("'-") for w in _WORD_RE.findall(text)]
    capitalised = [w for w in words if w and w[0].isupper() and w not in exclude and w != "I"]
    return capitalised[-1] if capitalised else FALLBACK_CITY


def _schema_type(prop: dict[str, Any]) -> str:
    kind = prop.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    return str(kind)


def _value_for(prop: dict[str, Any], word: str) -> Any:
    """A plausible value for one schema property."""
    if prop.get("enum"):
        return prop["enum"][0]
    defaults: dict[str, Any] = {"integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}
    return defaults.get(_schema_type(prop), word)


def build_arguments(tool: dict[str, Any], text: str, tool_names: set[str]) -> dict[str, Any]:
    """Arguments for every *required* property of the tool's schema, taken from the prompt."""
    params = (tool.get("function") or {}).get("parameters") or {}
    props: dict[str, Any] = params.get("properties") or {}
    word = pick_word(text, tool_names | {"CALL", "CALLRAW", "REPLY"})
    return {name: _value_for(props.get(name) or {}, word) for name in params.get("required") or []}


def infer_tool_call(text: str, tools: list[dict[str, Any]]) -> ToolCall | None:
    """Heuristic tool choice: a tool named in the prompt, else the first tool if "weather" is asked."""
    lowered = text.lower()
    names = {_tool_name(t) for t in tools}
    chosen = next((t for t in tools if _tool_name(t) and _tool_name(t).lower() in lowered), None)
    if chosen is None and "weather" in lowered:
        chosen = tools[0]
    if chosen is None:
        return None
    return ToolCall(name=_tool_name(chosen), arguments=json.dumps(build_arguments(chosen, text, names)))


def decide_reply(body: dict[str, Any]) -> Reply:
    """Deterministically script the answer from the request (see module docstring for the rules)."""
    messages: list[dict[str, Any]] = body.get("messages") or []
    tools: list[dict[str, Any]] = body.get("tools") or []
    if messages and messages[-1].get("role") == "tool":
        return Reply(content="tool results: " + "; ".join(_trailing_tool_results(messages)))
    text = _last_user_text(messages)
    last_is_user = bool(messages) and messages[-1].get("role") == "user"
    if tools and last_is_user and (calls := parse_call_directives(text)):
        return Reply(content=None, tool_calls=tuple(calls))
    if "REPLY:" in text:
        return Reply(content=text.split("REPLY:", 1)[1])
    if tools and last_is_user and (call := infer_tool_call(text, tools)):
        return Reply(content=None, tool_calls=(call,))
    return Reply(content="echo: " + text)


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class FaultPlan:
    """Which fault a request asks for and, optionally, for how many calls of its model."""

    fault: str | None
    times: int | None = None


def resolve_fault(model: str, headers: Any) -> FaultPlan:
    """Fault from ``X-Fake-Fault`` or a token in the model name; limit from header, ``-first-N`` or ``-once``."""
    fault = headers.get("X-Fake-Fault") or next((f for f in FAULTS if f in model), None)
    if not fault:
        return FaultPlan(None)
    times = header_number(headers, "X-Fake-Fail-Times")
    if times is None and (first_n := _FIRST_N_RE.search(model)):
        times = int(first_n.group(1) or 1)  # "-first-N", or "-once" == first 1
    return FaultPlan(fault=fault.strip().lower(), times=None if times is None else int(times))


def header_number(headers: Any, name: str) -> float | None:
    """A numeric header value, or None when absent or not a number (bad test input must not crash)."""
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def error_body(message: str, err_type: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI-style error JSON, which openai-python turns into a typed APIStatusError."""
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


# --------------------------------------------------------------------------- counters

#: A request's raw headers and query string, as aiohttp parsed them (decoded only when read).
RawMeta = tuple[tuple[tuple[bytes, bytes], ...], str]


def decode_meta(meta: RawMeta) -> dict[str, Any]:
    """``{"headers": {lower-case name: value}, "query": {name: value}}`` of a recorded request."""
    raw_headers, query = meta
    headers = {k.decode("utf-8", "surrogateescape").lower(): v.decode("utf-8", "surrogateescape")
               for k, v in raw_headers}
    return {"headers": headers, "query": dict(urllib.parse.parse_qsl(query, keep_blank_values=True))}



def in_flight_timeline(spans: list[tuple[float, float]]) -> dict[str, float]:
    """How busy the server was between the first request and the last answer (spans: (arrived, answered)): the
    mean calls in flight, and the time with none in flight (gaps between a client's waves of calls)."""
    if not spans:
        return {"span_s": 0.0, "mean_in_flight": 0.0, "idle_s": 0.0, "idle_gaps": 0}
    events = sorted([(arrived, 1) for arrived, _ in spans] + [(answered, -1) for _, answered in spans])
    start, end = events[0][0], events[-1][0]
    busy = sum(answered - arrived for arrived, answered in spans)
    in_flight, idle, gaps, last = 0, 0.0, 0, start
    for moment, step in events:
        if in_flight == 0 and moment > last:
            idle, gaps = idle + moment - last, gaps + 1
        in_flight += step
        last = moment
    span = end - start
    return {"span_s": span, "mean_in_flight": busy / span if span else 0.0, "idle_s": idle, "idle_gaps": gaps}


class FakeLLMStats:
    """Thread-safe counters: the server mutates them on its loop, tests read/reset from any thread."""

    def __init__(self, max_requests_kept: int = MAX_REQUESTS_KEPT) -> None:
        self._cond = threading.Condition()  # a Condition so waiters can block on changes
        self.calls = 0
        self.calls_per_model: dict[str, int] = {}
        self.in_flight = 0
        self.max_concurrent = 0
        self.requests: deque[dict[str, Any]] = deque(maxlen=max_requests_kept)
        self.request_meta: deque[RawMeta] = deque(maxlen=max_requests_kept)  # decoded when read
        self.request_times: deque[float] = deque(maxlen=max_requests_kept)  # time.time() each request arrived
        self.fault_hits: dict[str, int] = {}
        self._ids: Iterator[int] = itertools.count(1)
        self.in_flight_per_model: dict[str, int] = {}
        self.max_concurrent_per_model: dict[str, int] = {}
        #: (model, arrived, answered, HTTP status) per chat request, oldest first (time.time() of this process).
        self.answers: deque[tuple[str, float, float, int]] = deque(maxlen=max_requests_kept)
        #: Requests and tokens admitted per fixed window (rate limits; inactive unless configured).
        self.limits = WindowLimits(lock=self._cond)

    def record_call(self, model: str, body: dict[str, Any], meta: RawMeta = ((), "")) -> None:
        with self._cond:
            self.calls += 1
            self.calls_per_model[model] = self.calls_per_model.get(model, 0) + 1
            self.requests.append(body)
            self.request_meta.append(meta)
            self.request_times.append(time.time())
            self._cond.notify_all()

    def enter(self) -> None:
        with self._cond:
            self.in_flight += 1
            self.max_concurrent = max(self.max_concurrent, self.in_flight)
            self._cond.notify_all()

    def leave(self) -> None:
        with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def enter_model(self, model: str) -> None:
        with self._cond:
            count = self.in_flight_per_model[model] = self.in_flight_per_model.get(model, 0) + 1
            self.max_concurrent_per_model[model] = max(self.max_concurrent_per_model.get(model, 0), count)

    def leave_model(self, model: str, arrived: float, status: int) -> None:
        with self._cond:
            self.in_flight_per_model[model] -= 1
            self.answers.append((model, arrived, time.time(), status))
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[FakeLLMStats], bool], timeout: float) -> bool:
        """Block (in a worker thread) until ``predicate(self)`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def hit_fault(self, key: str) -> int:
        """Count one more faulting call for ``key`` and return the new count."""
        with self._cond:
            self.fault_hits[key] = self.fault_hits.get(key, 0) + 1
            return self.fault_hits[key]

    def next_id(self) -> int:
        with self._cond:
            return next(self._ids)

    def reset(self) -> None:
        """Zero everything except ``in_flight`` (requests may still be running)."""
        with self._cond:
            self.calls = 0
            self.calls_per_model = {}
            self.max_concurrent = self.in_flight
            self.requests.clear()
            self.request_meta.clear()
            self.request_times.clear()
            self.fault_hits = {}
            self._ids = itertools.count(1)
            self.max_concurrent_per_model = {m: n for m, n in self.in_flight_per_model.items() if n}
            self.answers.clear()
        self.limits.reset()

    def snapshot(self, include_requests: bool = False) -> dict[str, Any]:
        with self._cond:
            data: dict[str, Any] = {
                "calls": self.calls,
                "calls_per_model": dict(self.calls_per_model),
                "in_flight": self.in_flight,
                "max_concurrent": self.max_concurrent,
                "requests_kept": len(self.requests),
                "max_concurrent_per_model": dict(self.max_concurrent_per_model),
                "limits": self.limits.snapshot(),
                "timeline": in_flight_timeline([(arrived, answered) for _, arrived, answered, _ in self.answers]),
            }
            if include_requests:
                data["requests"] = list(self.requests)
                data["request_meta"] = [decode_meta(meta) for meta in self.request_meta]
            return data


# --------------------------------------------------------------------------- response bodies


def make_usage(prompt_tokens: int, completion_tokens: int, cost: float | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cost is not None:
        usage["cost"] = cost
    return usage


def _tool_call_json(call: ToolCall, call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def completion_body(cid: str, model: str, reply: Reply, call_ids: list[str], usage: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = [_tool_call_json(c, i) for c, i in zip(reply.tool_calls, call_ids, strict=True)]
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}],
        "usage": usage,
    }


def split_text(text: str) -> list[str]:
    """Word-sized pieces that concatenate back to ``text`` exactly."""
    return _PIECE_RE.findall(text)


def split_fragments(text: str, parts: int = 4) -> list[str]:
    """Cut a tool-call arguments string into up to ``parts`` fragments, like OpenAI streams them."""
    if not text:
        return []
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


def stream_deltas(reply: Reply, call_ids: list[str]) -> list[dict[str, Any]]:
    """The ``delta`` objects of a streamed answer, before the final finish_reason chunk."""
    if not reply.tool_calls:
        return [{"role": "assistant", "content": ""}] + [{"content": p} for p in split_text(reply.content or "")]
    deltas: list[dict[str, Any]] = []
    for index, (call, call_id) in enumerate(zip(reply.tool_calls, call_ids, strict=True)):
        head = {"index": index, "id": call_id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        first: dict[str, Any] = {"tool_calls": [head]}
        if index == 0:
            first = {"role": "assistant", "content": None, **first}
        deltas.append(first)
        for frag in split_fragments(call.arguments):
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": frag}}]})
    return deltas


def chunk_body(cid: str, model: str, created: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object with a single choice."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def stream_chunks(
    cid: str, model: str, reply: Reply, call_ids: list[str], usage: dict[str, Any], include_usage: bool
) -> list[dict[str, Any]]:
    """Every chunk of a streamed answer; with ``include_usage`` a last chunk carries usage and no choices."""
    created = int(time.time())
    chunks = [chunk_body(cid, model, created, d, None) for d in stream_deltas(reply, call_ids)]
    chunks.append(chunk_body(cid, model, created, {}, reply.finish_reason))
    if include_usage:
        for chunk in chunks:
            chunk["usage"] = None
        chunks.append(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )
    return chunks


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
    return b"data: " + payload + b"\n\n"


# --------------------------------------------------------------------------- server


def _raise_fd_limit() -> None:
    """Best effort: 500+ concurrent sockets need more than the common 1024 soft fd limit."""
    with contextlib.suppress(Exception):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, 65536), hard))


async def _wait_stats(
    stats: FakeLLMStats, predicate: Callable[[FakeLLMStats], bool], deadline_s: float, what: str
) -> None:
    """Await a counter condition without blocking the caller's loop (works across threads).

    The bound is a parameter rather than ``asyncio.timeout`` because the worker thread blocked on the
    condition cannot be cancelled; it must give up on its own.
    """
    if not await asyncio.to_thread(stats.wait_until, predicate, deadline_s):
        raise TimeoutError(f"fake LLM: timed out after {deadline_s}s waiting for {what}")


def _wake(sleeper: asyncio.Future[None]) -> None:
    if not sleeper.done():
        sleeper.set_result(None)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """web.json_response with orjson: a fraction of the CPU of json.dumps."""
    return web.Response(body=orjson.dumps(data), status=status, headers=headers, content_type="application/json")


def to_web(answer: LeanResponse) -> web.Response:
    """An answer the chat handlers composed, as aiohttp's response (for requests aiohttp serves)."""
    return web.Response(body=answer.body, status=answer.status, headers=answer.headers or None,
                        content_type=answer.content_type)


def _abort_connection(request: web.Request) -> None:
    """Close the socket mid-response so the client sees an incomplete body."""
    transport = request.transport
    if transport is not None:
        transport.close()


class FakeLLMServer:
    """In-process aiohttp server speaking enough of the OpenAI API for openai-python.

    Use ``await start()`` / ``await stop()`` (or ``async with``) inside a running loop, or
    :class:`ThreadedFakeLLM` / :func:`run_in_thread` from synchronous code.  ``port=0`` picks a free port.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        max_requests_kept: int = MAX_REQUESTS_KEPT,
        seed: int | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        window_s: float = 60.0,
        limit_models: set[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        self.stats = FakeLLMStats(max_requests_kept=max_requests_kept)
        self.stats.limits.configure(rpm, tpm, window_s, limit_models)
        self._rng = random.Random(seed)
        self._runner: web.AppRunner | None = None
        self._lean: asyncio.Server | None = None
        self._connections: set[LeanHTTPProtocol] = set()
        self._stopping: asyncio.Event | None = None
        self._sleepers: set[asyncio.Future[None]] = set()
        #: The Files and Batches API (fake_batches): files, batches, and how batches end (`batches.configure`).
        self.batches = FakeBatches(self._batch_answer)
        self._outage: str | None = None  # set_fault: every chat call after the `_fault_after`-th answers this
        self._fault_after = 0

    # ----- public API

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What to pass as ``AsyncOpenAI(base_url=...)``."""
        return f"{self.url}/v1"

    @property
    def calls(self) -> int:
        return self.stats.calls

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Copy of the received chat-completion request bodies (oldest first, bounded)."""
        return self.stats.snapshot(include_requests=True)["requests"]

    @property
    def request_meta(self) -> list[dict[str, Any]]:
        """Headers (lower-case names) and query of the received chat requests, in the order of ``requests``."""
        return self.stats.snapshot(include_requests=True)["request_meta"]

    @property
    def calls_per_model(self) -> dict[str, int]:
        return dict(self.stats.calls_per_model)

    @property
    def max_concurrent(self) -> int:
        return self.stats.max_concurrent

    def reset(self) -> None:
        self.stats.reset()
        self.batches.reset()

    def set_latency(self, ms: float, jitter_ms: float = 0.0) -> None:
        """Change the per-request latency (applies to requests that start afterwards)."""
        self.latency_ms = ms
        self.jitter_ms = jitter_ms

    def set_limits(
        self, rpm: int | None = None, tpm: int | None = None, window_s: float = 60.0, models: set[str] | None = None
    ) -> None:
        """Limit requests and tokens per fixed window of `window_s` (None: no limit), for `models` (None: every
        model, each on its own counters); clears the window counters."""
        self.stats.limits.configure(rpm, tpm, window_s, models)

    def set_fault(self, fault: str | None, after_calls: int = 0) -> None:
        """Answer every chat call with `fault` (one of FAULTS or ``fail-<status>``) once `after_calls` more calls
        have been answered normally (an outage that starts mid-run); None ends the outage."""
        self._outage, self._fault_after = fault, self.stats.calls + after_calls

    async def wait_for_in_flight(self, count: int = 1, deadline_s: float = 5.0) -> None:
        """Wait until ``count`` chat requests are being handled (e.g. before cancelling a client)."""
        await _wait_stats(self.stats, lambda s: s.in_flight >= count, deadline_s, f"{count} in-flight requests")

    async def wait_for_calls(self, count: int, deadline_s: float = 5.0) -> None:
        """Wait until ``count`` chat requests have been received since the last reset."""
        await _wait_stats(self.stats, lambda s: s.calls >= count, deadline_s, f"{count} calls")

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_post("/reset", self._handle_reset)
        app.router.add_get("/health", self._handle_health)
        self.batches.add_routes(app)
        return app

    async def start(self) -> None:
        """Bind and start serving; afterwards ``port``/``base_url`` are the real ones."""
        _raise_fd_limit()
        self._stopping = asyncio.Event()
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        # handler_cancellation: a client that gives up (timeout) frees its handler immediately.
        self._runner = web.AppRunner(
            self.build_app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        handover = self._runner.server  # aiohttp's protocol factory: what every request but the hot path gets
        assert handover is not None

        def protocol() -> LeanHTTPProtocol:
            return LeanHTTPProtocol(self._lean_route, self._lean_chat, handover, self._connections, MAX_BODY,
                                    header_prefix=b"x-fake-")

        self._lean = await asyncio.get_running_loop().create_server(protocol, sock=sock, backlog=4096)

    async def stop(self) -> None:
        """Stop quickly: wake every sleeping handler (latency/timeout modes), then close sockets."""
        if self._stopping is not None:
            self._stopping.set()
        for sleeper in list(self._sleepers):
            _wake(sleeper)
        if self._lean is not None:
            self._lean.close()
            for connection in list(self._connections):
                connection.close()
            await self._lean.wait_closed()
            self._lean = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeLLMServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----- helpers

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server stops first; returns True if it is stopping.

        A future woken by a timer (or by stop()) rather than a timeout around an Event wait: no cancellation
        and no exception per request."""
        assert self._stopping is not None
        if seconds <= 0 or self._stopping.is_set():
            return self._stopping.is_set()
        loop = asyncio.get_running_loop()
        sleeper: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _wake, sleeper)
        self._sleepers.add(sleeper)
        try:
            await sleeper
        finally:
            timer.cancel()
            self._sleepers.discard(sleeper)
        return self._stopping.is_set()

    def _latency_s(self, request: Any) -> float:
        override = header_number(request.headers, "X-Fake-Latency-Ms")
        if override is not None:
            return override / 1000
        jitter = self._rng.uniform(0, self.jitter_ms) if self.jitter_ms > 0 else 0.0
        return (self.latency_ms + jitter) / 1000

    def _cost(self, request: Any, model: str, usage: dict[str, Any]) -> float | None:
        if "X-Fake-Cost" not in request.headers and "priced" not in model:
            return None
        fixed = header_number(request.headers, "X-Fake-Cost")
        if fixed is not None:
            return fixed
        cost = usage["prompt_tokens"] * PROMPT_PRICE_USD + usage["completion_tokens"] * COMPLETION_PRICE_USD
        return round(cost, 10)

    def _should_fail(self, model: str, plan: FaultPlan) -> bool:
        if plan.fault is None:
            return False
        if plan.times is None:
            return True
        return self.stats.hit_fault(f"{model}|{plan.fault}") <= plan.times

    @staticmethod
    def _json_error(
        status: int, message: str, err_type: str, code: str | None = None, retry_after_s: float | None = None
    ) -> LeanResponse:
        # retry-after-ms keeps openai-python's retry back-off short in tests (X-Fake-Retry-After sets another).
        headers = None
        if retry_after_s is not None:
            headers = retry_after_headers(retry_after_s)
        elif status in (429, 500, 503):
            headers = {"retry-after-ms": "10"}
        return LeanResponse(status, orjson.dumps(error_body(message, err_type, code)), headers=headers or {})

    def _batch_answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """A batch request's chat completion, as a live call would get it (no latency, no faults)."""
        model = str(body.get("model") or "fake-gpt")
        reply = decide_reply(body)
        call_ids = [f"call_{self.stats.next_id()}" for _ in reply.tool_calls]
        usage = make_usage(count_prompt_tokens(body.get("messages") or []), max(1, count_words(reply.output_text())),
                           None)
        return completion_body(f"chatcmpl-fake-{self.stats.next_id()}", model, reply, call_ids, usage)

    # ----- handlers

    async def _handle_health(self, request: web.Request) -> web.Response:
        return json_response({"ok": True})

    async def _handle_models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake-llm"} for m in MODELS]
        return json_response({"object": "list", "data": data})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        include = request.query.get("include_requests", "") not in ("", "0", "false")
        return json_response(self.stats.snapshot(include_requests=include))

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return json_response({"ok": True})

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        answer = await self._counted_chat(request, self._parse_chat(await request.read()))
        return to_web(answer) if isinstance(answer, LeanResponse) else answer

    def _lean_route(self, request: LeanRequest) -> bool:
        """The lean layer's hot path: a non-streaming chat completion that is not the truncated fault (which drops
        the connection mid-body, also as a set_fault outage); everything else is served by aiohttp."""
        if request.method != "POST" or request.path != "/v1/chat/completions":
            return False
        body = request.parsed = self._parse_chat(request.body)
        if isinstance(body, LeanResponse):
            return True
        if body.get("stream"):
            return False
        if self._outage == "truncated":
            return False
        return resolve_fault(str(body.get("model") or "fake-gpt"), request.headers).fault != "truncated"

    def _lean_chat(
        self, request: LeanRequest, reply: Callable[[LeanResponse], None]
    ) -> Callable[[], None] | None:
        """The hot path without a task: admitted now, answered by a timer after the latency; a fault (which may
        sleep or count its hits), an outage and a model with a context window take the async path. Returns what
        stops it when the client goes away."""
        body = request.parsed
        if isinstance(body, LeanResponse):
            reply(body)
            return None
        loop = asyncio.get_running_loop()
        model = str(body.get("model") or "fake-gpt")
        if self._outage is not None or _CONTEXT_RE.search(model) or resolve_fault(model, request.headers).fault:
            task = loop.create_task(self._counted_chat(request, body))
            task.add_done_callback(lambda done: done.cancelled() or reply(done.result()))  # type: ignore[arg-type]
            return task.cancel
        self.stats.enter()
        arrived, seen = time.time(), []

        def finish(response: LeanResponse) -> None:
            self.stats.leave()
            if seen:
                self.stats.leave_model(seen[0], arrived, response.status)
            reply(response)

        admitted = self._admit(request, body, seen)
        if isinstance(admitted, LeanResponse):
            finish(admitted)
            return None
        assert self._stopping is not None
        if self._stopping.is_set():
            finish(self._json_error(503, "fake LLM is shutting down", "server_error"))
            return None
        _, composed, _ = admitted
        timer = loop.call_later(self._latency_s(request),
                                lambda: finish(self._completion(request, body, model, composed)))

        def gone() -> None:  # the client went away first (499, as aiohttp's cancelled handler records)
            timer.cancel()
            self.stats.leave()
            if seen:
                self.stats.leave_model(seen[0], arrived, 499)

        return gone

    async def _counted_chat(
        self, request: Any, body: dict[str, Any] | LeanResponse
    ) -> LeanResponse | web.StreamResponse:
        self.stats.enter()
        arrived, status, model = time.time(), 499, []  # 499: the client went away first
        try:
            response = await self._chat(request, body, model)
            status = response.status
            return response
        finally:
            self.stats.leave()
            if model:
                self.stats.leave_model(model[0], arrived, status)

    def _parse_chat(self, raw: bytes) -> dict[str, Any] | LeanResponse:
        """The request's JSON body, or the 400 answering it."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._json_error(400, "request body is not valid JSON", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self._json_error(400, "'messages' is required", "invalid_request_error")
        return body

    async def _chat(
        self, request: Any, body: dict[str, Any] | LeanResponse, seen: list[str]
    ) -> LeanResponse | web.StreamResponse:
        """Answer one chat request (aiohttp's web.Request or a LeanRequest: the same headers, raw_headers and
        query_string); its model name goes into `seen` once known (per-model counters)."""
        if isinstance(body, LeanResponse):
            return body
        admitted = self._admit(request, body, seen)
        if isinstance(admitted, LeanResponse):
            return admitted
        model, composed, outage = admitted
        if await self._sleep(self._latency_s(request)):
            return self._json_error(503, "fake LLM is shutting down", "server_error")
        if (window := _CONTEXT_RE.search(model)) and (used := count_prompt_tokens(body["messages"])) > int(window[1]):
            return self._json_error(
                400, f"This model's maximum context length is {window[1]} tokens. However, your messages resulted "
                f"in {used} tokens. Please reduce the length of the messages.", "invalid_request_error",
                "context_length_exceeded",
            )
        plan = FaultPlan(self._outage, None) if outage else resolve_fault(model, request.headers)
        if self._should_fail(model, plan):
            return await self._fault(request, body, model, plan.fault or "")
        return await self._answer(request, body, model, composed)

    def _admit(
        self, request: Any, body: dict[str, Any], seen: list[str]
    ) -> tuple[str, tuple[Reply, list[str], dict[str, Any]] | None, bool] | LeanResponse:
        """Count the call and apply the rate limits on arrival, as providers do: (model, the reply if the limits
        needed it composed, whether the call falls in a set_fault outage) or the 429."""
        model = str(body.get("model") or "fake-gpt")
        self.stats.record_call(model, body, (request.raw_headers, request.query_string))
        outage = self._outage is not None and self.stats.calls > self._fault_after
        seen.append(model)
        self.stats.enter_model(model)
        composed = None
        if self.stats.limits.applies_to(model):
            composed = self._compose(request, body, model)
            refusal = self.stats.limits.admit(model, composed[2]["total_tokens"])
            if refusal is not None:
                limits = self.stats.limits
                return self._json_error(
                    429, f"Rate limit reached for {model} (fake): {refusal.limit} {refusal.reason} per "
                    f"{limits.window_s:g} s window", "rate_limit_exceeded", "rate_limit_exceeded",
                    retry_after_s=refusal.retry_after_s,
                )
        return model, composed, outage

    async def _fault(
        self, request: Any, body: dict[str, Any], model: str, fault: str
    ) -> LeanResponse | web.StreamResponse:
        """Produce the requested failure mode."""
        retry_after = header_number(request.headers, "X-Fake-Retry-After")
        if fault == "fail-429":
            return self._json_error(
                429, "Rate limit reached (fake)", "rate_limit_exceeded", "rate_limit_exceeded", retry_after
            )
        if fault == "fail-500":
            return self._json_error(500, "Internal server error (fake)", "server_error", retry_after_s=retry_after)
        if fault == "timeout":
            await self._sleep(TIMEOUT_SLEEP_S)
            return self._json_error(503, "fake LLM is shutting down", "server_error")
        if fault == "malformed":
            return await self._malformed(request, body)
        if fault == "truncated":
            return await self._truncated(request, body, model)
        if status := _FAIL_STATUS_RE.fullmatch(fault):
            return self._json_error(int(status[1]), f"Fake error {status[1]}", "fake_error", retry_after_s=retry_after)
        return self._json_error(400, f"unknown fault {fault!r}", "invalid_request_error")

    async def _malformed(self, request: Any, body: dict[str, Any]) -> LeanResponse | web.StreamResponse:
        """HTTP 200 whose payload is not JSON (an SSE ``data:`` line that is not JSON when streaming)."""
        if not body.get("stream"):
            return LeanResponse(200, MALFORMED_BODY.encode())
        resp = await self._prepare_sse(request)
        await resp.write(f"data: {MALFORMED_BODY}\n\n".encode())
        await resp.write(sse("[DONE]"))
        await resp.write_eof()
        return resp

    async def _truncated(self, request: web.Request, body: dict[str, Any], model: str) -> web.StreamResponse:
        """Start a real answer, then drop the connection (no ``[DONE]`` / short body)."""
        reply, call_ids, usage = self._compose(request, body, model)
        cid = f"chatcmpl-fake-{self.stats.next_id()}"
        if body.get("stream"):
            resp = await self._prepare_sse(request)
            for chunk in stream_chunks(cid, model, reply, call_ids, usage, False)[:2]:
                await resp.write(sse(chunk))
        else:
            payload = orjson.dumps(completion_body(cid, model, reply, call_ids, usage))
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
        _abort_connection(request)
        return resp

    def _compose(
        self, request: Any, body: dict[str, Any], model: str
    ) -> tuple[Reply, list[str], dict[str, Any]]:
        """Decide the reply and compute usage (with optional cost); max_tokens cuts a longer text answer."""
        reply = decide_reply(body)
        call_ids = [f"call_{self.stats.next_id()}" for _ in reply.tool_calls]
        prompt = count_prompt_tokens(body["messages"])
        completion = max(1, count_words(reply.output_text()))
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(cap, int) and 0 < cap < completion and not reply.tool_calls:
            reply = Reply(content=" ".join((reply.content or "").split()[:cap]), cut=True)
            completion = cap
        usage = make_usage(prompt, completion, None)
        cost = self._cost(request, model, usage)
        return reply, call_ids, make_usage(prompt, completion, cost)

    async def _answer(
        self, request: Any, body: dict[str, Any], model: str,
        composed: tuple[Reply, list[str], dict[str, Any]] | None = None,
    ) -> LeanResponse | web.StreamResponse:
        if not body.get("stream"):
            return self._completion(request, body, model, composed)
        reply, call_ids, usage = composed or self._compose(request, body, model)
        cid = f"chatcmpl-fake-{self.stats.next_id()}"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = await self._prepare_sse(request)
        for chunk in stream_chunks(cid, model, reply, call_ids, usage, include_usage):
            await resp.write(sse(chunk))
        await resp.write(sse("[DONE]"))
        await resp.write_eof()
        return resp

    def _completion(
        self, request: Any, body: dict[str, Any], model: str,
        composed: tuple[Reply, list[str], dict[str, Any]] | None = None,
    ) -> LeanResponse:
        """A non-streaming answer."""
        reply, call_ids, usage = composed or self._compose(request, body, model)
        cid = f"chatcmpl-fake-{self.stats.next_id()}"
        return LeanResponse(200, orjson.dumps(completion_body(cid, model, reply, call_ids, usage)))

    @staticmethod
    async def _prepare_sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        return resp


# --------------------------------------------------------------------------- sync / thread helper


class ThreadedFakeLLM:
    """Runs a :class:`FakeLLMServer` on its own event loop in a daemon thread (for sync code / pytest).

    Exposes the same read/reset API as the server; counters are lock-protected so reading them
    from the test thread is safe.
    """

    def __init__(self, **server_kwargs: Any) -> None:
        self.server = FakeLLMServer(**server_kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> ThreadedFakeLLM:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fake-llm", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), loop).result(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> ThreadedFakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def stats(self) -> FakeLLMStats:
        return self.server.stats

    @property
    def batches(self) -> FakeBatches:
        return self.server.batches

    @property
    def calls(self) -> int:
        return self.server.calls

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.server.requests

    @property
    def request_meta(self) -> list[dict[str, Any]]:
        return self.server.request_meta

    @property
    def calls_per_model(self) -> dict[str, int]:
        return self.server.calls_per_model

    @property
    def max_concurrent(self) -> int:
        return self.server.max_concurrent

    def reset(self) -> None:
        self.server.reset()

    async def wait_for_in_flight(self, count: int = 1, deadline_s: float = 5.0) -> None:
        await self.server.wait_for_in_flight(count, deadline_s)

    async def wait_for_calls(self, count: int, deadline_s: float = 5.0) -> None:
        await self.server.wait_for_calls(count, deadline_s)

    def set_latency(self, ms: float, jitter_ms: float = 0.0) -> None:
        self.server.set_latency(ms, jitter_ms)

    def set_limits(
        self, rpm: int | None = None, tpm: int | None = None, window_s: float = 60.0, models: set[str] | None = None
    ) -> None:
        self.server.set_limits(rpm, tpm, window_s, models)

    def set_fault(self, fault: str | None, after_calls: int = 0) -> None:
        self.server.set_fault(fault, after_calls)


def run_in_thread(**server_kwargs: Any) -> ThreadedFakeLLM:
    """Start a fake LLM in a background thread and return the started handle (call ``.stop()``)."""
    return ThreadedFakeLLM(**server_kwargs).start()


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="OpenAI-compatible fake LLM server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--rpm", type=int, default=None, help="requests admitted per window and model (no limit)")
    parser.add_argument("--tpm", type=int, default=None, help="tokens admitted per window and model (no limit)")
    parser.add_argument("--window-s", type=float, default=60.0, help="length of the fixed rate-limit window (60)")
    parser.add_argument("--limit-model", action="append", default=None,
                        help="limit only this model (repeatable; default: every model, each on its own)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGINT/SIGTERM."""
    server = FakeLLMServer(
        host=args.host, port=args.port, latency_ms=args.latency_ms, jitter_ms=args.jitter_ms, rpm=args.rpm,
        tpm=args.tpm, window_s=args.window_s, limit_models=set(args.limit_model) if args.limit_model else None,
    )
    await server.start()
    tuning.freeze_gc_once()  # a long-lived process: its imported modules stay out of the collector's way
    limits = f", limits rpm={args.rpm} tpm={args.tpm} per {args.window_s:g} s" if server.stats.limits.active else ""
    print(
        f"fake LLM listening on {server.base_url} (latency {args.latency_ms} ms, jitter {args.jitter_ms} ms{limits})",
        flush=True,
    )
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    tuning.run(serve(parse_args(argv)))  # on uvloop where installed (TASKTREE_UVLOOP=0: asyncio's loop)


if __name__ == "__main__":
    main()
