"""Trace JSON, cost/token totals, file trace storage (with path traversal rejection) and DISABLE_TASKTREE_LOGGING."""

from __future__ import annotations

import datetime as _dt
import datetime as dt
import json
import os
import pathlib
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from tasktree_dist import (
    Context,
    FileTraceStorageHandler,
    Result,
    TasktreeProgrammingError,
    TraceNode,
    TraceRoot,
    Tree,
)
from tasktree_dist.tracing.storage import InvalidTraceIdError
from tests.helpers import make_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_KEYS = {
    "name",
    "kind",
    "start_at",
    "end_at",
    "duration",
    "finished",
    "cost",
    "logs",
    "result",
    "attributes",
    "children",
}


@dataclass
class BB:
    messages: list[dict[str, str]] = field(default_factory=list)


run = make_run(BB)


def walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node["children"].values():
        out.extend(walk(child))
    return out


# -- trace JSON -----------------------------------------------------------------------------------------------


async def test_trace_json_shape() -> None:
    tree = Tree("TraceShape").Sequence()._().Function(lambda: {"k": [1, 2]})._().Log("hi").End()
    result, context = await run(tree)
    root = context.trace_root().json()
    assert root["name"] == "ROOT" and root["kind"] == "ROOT"
    assert list(root["children"]) == ["Tree(TraceShape)"]
    tree_node = root["children"]["Tree(TraceShape)"]
    assert tree_node["kind"] == "Tree"
    for n in walk(root):
        assert NODE_KEYS <= set(n), set(n) ^ NODE_KEYS
        spanned = _dt.datetime.fromisoformat(n["end_at"]) - _dt.datetime.fromisoformat(n["start_at"])
        assert isinstance(n["duration"], float)
        assert n["duration"] == pytest.approx(spanned.total_seconds() * 1000, abs=1)
        assert n["finished"] is True
        assert isinstance(n["logs"], list)
        assert isinstance(n["attributes"], dict)
        assert isinstance(n["children"], dict)
        assert set(n["result"]) == {"status", "data"}
        start, end = dt.datetime.fromisoformat(n["start_at"]), dt.datetime.fromisoformat(n["end_at"])
        assert start <= end
    assert "total_cost" in root
    assert root["result"] == {"status": "OK", "data": None}
    seq = tree_node["children"]["Sequence"]
    assert seq["kind"] == "Sequence"
    assert list(seq["children"]) == ["Function(lambda)", "Log(info)"]
    assert json.loads(seq["children"]["Function(lambda)"]["result"]["data"]) == {"k": [1, 2]}
    assert json.dumps(root)  # serialisable as is


async def test_trace_result_json_status_and_data() -> None:
    _, context = await run(Tree("TraceResult").Function(lambda: Result.FAIL("bad")).End())
    fn = context.trace_root().json()["children"]["Tree(TraceResult)"]["children"]["Function(lambda)"]
    assert fn["result"] == {"status": "FAIL", "data": "bad"}


def test_duration_is_in_milliseconds() -> None:
    node = TraceNode("n", "Function")
    node.started = 1_700_000_000.0
    node.ended = 1_700_000_000.25
    data = node.json()
    assert data["duration"] == pytest.approx(250.0)
    assert data["finished"] is True
    assert dt.datetime.fromisoformat(data["end_at"]) - dt.datetime.fromisoformat(data["start_at"]) == (
        dt.timedelta(milliseconds=250)
    )
    unfinished = TraceNode("u").json()
    assert unfinished["finished"] is False and unfinished["duration"] == 0.0


async def test_total_cost_and_tokens() -> None:
    def llm_a(b: BB, tracer: TraceNode) -> None:
        tracer.incr_cost(0.5)
        tracer.incr_tokens(10, 5)
        tracer.incr_tokens(1, 2)

    def llm_b(b: BB, tracer: TraceNode) -> None:
        tracer.incr_cost(0.25)
        tracer.update_attributes(tokens={"prompt": 3, "completion": 4})

    def llm_c(b: BB, tracer: TraceNode, context: Context) -> None:
        context.parent_tracer().incr_cost(1.0)  # the Parallel itself

    tree = Tree("TraceCost").Parallel()._().Function(llm_a)._().Function(llm_b)._().Function(llm_c).End()
    _, context = await run(tree)
    root = context.trace_root().json()
    assert root["total_cost"] == pytest.approx(1.75)
    assert root["total_tokens"] == {"prompt": 14, "completion": 11, "total": 25}
    par = root["children"]["Tree(TraceCost)"]["children"]["Parallel"]
    assert par["cost"] == pytest.approx(1.0)
    assert par["children"]["Function(llm_a)"]["cost"] == pytest.approx(0.5)
    assert context.trace_root().total_cost() == pytest.approx(1.75)
    assert context.trace_root().total_tokens() == {"prompt": 14, "completion": 11, "total": 25}
    a_tokens = context.trace_root().child_list()[0].child_list()[0].child_list()[0].attributes["tokens"]
    assert a_tokens == {"prompt": 11, "completion": 7, "total": 18}


async def test_chat_transcript_attributes() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

    def mark(b: BB, tracer: TraceNode, context: Context) -> None:
        tracer.update_attributes(chat_transcript=b.messages)
        context.parent_tracer(1).update_attributes(chat_transcript=b.messages[:1])

    _, context = await run(Tree("TraceChat").Sequence()._().Function(mark).End(), BB(messages=list(messages)))
    seq = context.trace_root().json()["children"]["Tree(TraceChat)"]["children"]["Sequence"]
    fn = seq["children"]["Function(mark)"]
    assert fn["attributes"]["has_chat"] is True
    assert fn["attributes"]["chat_messages_count"] == 2
    assert json.loads(fn["attributes"]["chat_transcript"]) == messages
    assert seq["attributes"]["has_chat"] is True and seq["attributes"]["chat_messages_count"] == 1

    plain = TraceNode("x")
    plain.update_attributes(chat_transcript="not a list", other=1)
    assert "has_chat" not in plain.attributes
    assert plain.attributes["other"] == 1


def test_error_records_type_and_message() -> None:
    node = TraceNode("n")
    node.error(ValueError("bad value"))
    assert node.attributes["error"] == "ValueError: bad value"
    assert node.logs[-1].endswith(" [error] : ValueError: bad value")
    node.error("plain text")
    assert node.logs[-1].endswith(" [error] : plain text")
    assert node.attributes["error"] == "ValueError: bad value"
    node.log("w", "warning")
    assert node.logs[-1].endswith(" [warning] : w")
    assert re.match(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \[warning\] : w$", node.logs[-1])


def test_trace_root_defaults() -> None:
    root = TraceRoot()
    assert root.name == "ROOT" and root.kind == "ROOT"
    data = root.json()
    assert data["total_cost"] == 0.0
    assert data["children"] == {}


async def test_rerun_on_same_context_starts_a_new_trace() -> None:
    tree = Tree("TraceRerun").Function(lambda: 1).End()
    context = Context()
    async with context.using_blackboard(BB()):
        await tree(context)
        first = context.trace_root()
        await tree(context)
    assert context.trace_root() is not first
    assert list(context.trace_root().json()["children"]) == ["Tree(TraceRerun)"]


# -- file storage ---------------------------------------------------------------------------------------------


ID_PATTERN = r"^\d{8}-\d{6}-\d{6}-{slug}-[0-9a-f]{8}$"


async def test_save_id_format_and_query_round_trip(tmp_path: pathlib.Path) -> None:
    storage = FileTraceStorageHandler(tmp_path)
    _, context = await run(Tree("My Trace Tree").Sequence()._().Function(lambda: "x")._().Log("l").End())
    trace_id = await storage.save(context.trace_root())
    assert re.match(ID_PATTERN.replace("{slug}", "my-trace-tree"), trace_id), trace_id
    created = dt.datetime.strptime(trace_id[:22], "%Y%m%d-%H%M%S-%f")
    assert abs((dt.datetime.now() - created).total_seconds()) < 60
    assert (tmp_path / f"{trace_id}.json").is_file()
    loaded = await storage.query(trace_id)
    assert loaded == {**context.trace_root().json(), "id": trace_id}
    assert storage.path_for(trace_id) == (tmp_path / f"{trace_id}.json").resolve()


@pytest.mark.parametrize(
    ("name", "slug"),
    [("", "tree"), ("Weird!! Name__", "weird--name"), ("x" * 40, "x" * 24), ("Ünïcode", "n-code")],
)
async def test_save_slug(tmp_path: pathlib.Path, name: str, slug: str) -> None:
    _, context = await run(Tree(name).TODO().End())
    trace_id = await FileTraceStorageHandler(tmp_path).save(context.trace_root())
    assert re.match(ID_PATTERN.replace("{slug}", re.escape(slug)), trace_id), trace_id


async def test_save_creates_the_directory(tmp_path: pathlib.Path) -> None:
    storage = FileTraceStorageHandler(tmp_path / "deep" / "traces")
    _, context = await run(Tree("TraceDir").TODO().End())
    trace_id = await storage.save(context.trace_root())
    assert (tmp_path / "deep" / "traces" / f"{trace_id}.json").is_file()


async def test_list_traces_newest_first_and_limit(tmp_path: pathlib.Path) -> None:
    storage = FileTraceStorageHandler(tmp_path)
    assert await FileTraceStorageHandler(tmp_path / "missing").list_traces() == []
    ids = []
    for name in ("first", "second", "third"):
        _, context = await run(Tree(f"List {name}").TODO().End())
        ids.append(await storage.save(context.trace_root()))
    (tmp_path / "not-a-trace.json").write_text("{}")
    listed = await storage.list_traces()
    assert [t["id"] for t in listed] == ids[::-1]
    assert listed[0]["name"] == f"{ids[2]}.json"
    assert dt.datetime.fromisoformat(listed[0]["created_at"]) >= dt.datetime.fromisoformat(listed[2]["created_at"])
    assert [t["id"] for t in await storage.list_traces(limit=2)] == ids[:0:-1]
    assert [t["id"] for t in await storage.list_traces(limit=1)] == [ids[2]]
    assert await storage.list_traces(limit=0) == []


BAD_IDS = [
    "../x",
    "..",
    ".",
    "a/b",
    "a\\b",
    "/etc/passwd",
    "%2e%2e",
    "%2e%2e%2fsecret",
    "",
    " ",
    "20260101-000000-000000-x-abcdef12\x00",
    "20260101-000000-000000-x-abcdef12/../../secret",
    "../20260101-000000-000000-x-abcdef12",
    " 20260101-000000-000000-x-abcdef12",
    "20260101-000000-000000-x-ABCDEF12",
    "secret",
]


@pytest.mark.parametrize("bad", BAD_IDS, ids=[repr(b) for b in BAD_IDS])
async def test_traversal_and_malformed_ids_are_rejected(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    (tmp_path / "secret.json").write_text('{"secret": true}')
    (tmp_path / "x.json").write_text('{"secret": true}')
    storage = FileTraceStorageHandler(traces)
    read: list[pathlib.Path] = []
    original = pathlib.Path.read_text

    def spy(self: pathlib.Path, *args: Any, **kwargs: Any) -> str:
        read.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", spy)
    with pytest.raises(InvalidTraceIdError, match="Invalid trace_id"):
        await storage.query(bad)
    with pytest.raises(TasktreeProgrammingError):
        storage.path_for(bad)
    assert read == []


async def test_absolute_path_id_is_rejected(tmp_path: pathlib.Path) -> None:
    secret = tmp_path / "secret"
    (tmp_path / "secret.json").write_text("{}")
    storage = FileTraceStorageHandler(tmp_path / "traces")
    with pytest.raises(InvalidTraceIdError):
        await storage.query(str(secret))
    with pytest.raises(InvalidTraceIdError):
        await storage.query(42)  # type: ignore[arg-type]


async def test_query_missing_valid_id_is_file_not_found(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        await FileTraceStorageHandler(tmp_path).query("20260101-000000-000000-nothing-abcdef12")


async def test_saved_file_is_plain_json(tmp_path: pathlib.Path) -> None:
    _, context = await run(Tree("TraceFile").TODO().End())
    trace_id = await FileTraceStorageHandler(tmp_path).save(context.trace_root())
    data = json.loads((tmp_path / f"{trace_id}.json").read_text())
    assert data["id"] == trace_id
    assert data["children"]["Tree(TraceFile)"]["children"]["TODO"]["kind"] == "TODO"
    assert os.listdir(tmp_path) == [f"{trace_id}.json"]  # no temp file left behind


# -- DISABLE_TASKTREE_LOGGING ---------------------------------------------------------------------------------


def test_disable_tasktree_logging_env() -> None:
    """Read at import time: DISABLE_TASKTREE_LOGGING=1 -> the library logger is disabled; unset -> it is not."""
    code = (
        "import logging, tasktree_dist; "
        "print(logging.getLogger('tasktree_dist').disabled, tasktree_dist.DISABLE_TASKTREE_LOGGING)"
    )
    cases = {None: False, "1": True}
    processes = {}
    for value in cases:  # started together: each one pays the import time
        env = {k: v for k, v in os.environ.items() if k != "DISABLE_TASKTREE_LOGGING"}
        if value is not None:
            env["DISABLE_TASKTREE_LOGGING"] = value
        processes[value] = subprocess.Popen(
            [sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for value, disabled in cases.items():
        out, err = processes[value].communicate(timeout=60)
        assert processes[value].returncode == 0, err
        assert out.split() == [str(disabled), str(disabled)], (value, out)


def test_the_package_flag_is_a_live_view_of_the_logging_switch() -> None:
    """`tasktree_dist.DISABLE_TASKTREE_LOGGING` follows set_logging_disabled() and assigning it switches logging
    (a copy made at import would go stale)."""
    import logging

    import tasktree_dist

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    library = logging.getLogger("tasktree_dist")
    library.addHandler(handler)
    before = tasktree_dist.DISABLE_TASKTREE_LOGGING
    try:
        tasktree_dist.set_logging_disabled(True)
        assert tasktree_dist.DISABLE_TASKTREE_LOGGING is True
        library.warning("hidden")
        tasktree_dist.set_logging_disabled(False)
        assert tasktree_dist.DISABLE_TASKTREE_LOGGING is False
        library.warning("shown")
        tasktree_dist.DISABLE_TASKTREE_LOGGING = True  # as tinytasktree's users patch the module
        library.warning("hidden again")
    finally:
        tasktree_dist.set_logging_disabled(before)
        library.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["shown"]
