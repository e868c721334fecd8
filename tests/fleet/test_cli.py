"""The `tasktree` command as an operator and a script use it, against a real fleet: submit with a JSON blackboard
(decoded into the tree's type), watch, read results, list, cancel, retry, save a trace; exit codes and messages
that name what was wrong."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tasktree_dist import FileTraceStorageHandler
from tasktree_dist.cli import cli
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM
from tasktree_dist.testing.redis_server import free_port
from tests.ops_fleet import ops_fleet, tasktree

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    with ops_fleet(redis_url, "cli") as fleet:
        yield fleet


def ok(env: dict[str, str], *args: str, code: int = 0, **kwargs: Any) -> str:
    done = tasktree(env, *args, **kwargs)
    assert done.returncode == code, f"tasktree {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def batch(llm: ThreadedFakeLLM, n: int, **models: str) -> str:
    return json.dumps({"base_url": llm.base_url, "texts": [f"doc{i}" for i in range(n)], "models": models})


def test_submit_watch_result_list_and_save_the_trace(fleet: dict[str, Any], fake_llm: ThreadedFakeLLM,
                                                     tmp_path: Path) -> None:
    env = fleet["env"]
    run_id = ok(env, "submit", "RunBatch", "--import", "tests.run_trees", "-b", batch(fake_llm, 6),
                "--label", "team=ops").strip()
    events = [json.loads(line) for line in ok(env, "events", run_id, "--json").splitlines()]
    states = [e["data"]["state"] for e in events if e["type"] == "state"]
    assert states[0] == "queued" and states[-1] == "succeeded", states
    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == 6
    assert sum(e["type"] == "unit" for e in events) == 6

    status = json.loads(ok(env, "status", run_id, "--json"))  # RunStatus JSON
    assert status["state"] == "succeeded" and status["labels"] == {"team": "ops"} and status["tokens"] > 0
    assert status["progress"] == {"done": 6, "failed": 0, "total": 6}
    human = ok(env, "status", run_id)
    assert "succeeded" in human and "6/6 units" in human and "team=ops" in human
    # the result's data: the Gather's list of LLM records, as plain JSON
    records = json.loads(ok(env, "result", run_id))
    assert [r["final_output"] for r in records] == [f"summary of doc{i}" for i in range(6)]

    listed = json.loads(ok(env, "runs", "--json", "--state", "succeeded", "--tree", "RunBatch"))
    assert run_id in [r["id"] for r in listed["runs"]]
    assert run_id[:6] in ok(env, "runs")

    trace_id = ok(env, "trace", run_id, "--save", str(tmp_path)).strip()
    saved = asyncio.run(FileTraceStorageHandler(tmp_path).query(trace_id))  # the trace server's file format
    assert saved["id"] == trace_id and "Tree(RunBatch)" in saved["children"]
    assert json.loads(ok(env, "trace", run_id, "--json"))["children"].keys() == saved["children"].keys()
    assert "RunDocLLM" in ok(env, "trace", run_id)


def test_a_failed_run_exits_1_and_names_the_error(fleet: dict[str, Any], fake_llm: ThreadedFakeLLM,
                                                  tmp_path: Path) -> None:
    env = fleet["env"]
    board = tmp_path / "board.json"
    board.write_text(batch(fake_llm, 3, **{"1": "fail-500"}))
    done = tasktree(env, "submit", "RunBatch", "-i", "tests.run_trees", "-b", f"@{board}", "--wait", "--json")
    assert done.returncode == 1, done.stderr
    status = json.loads(done.stdout)
    assert status["state"] == "failed" and "500" in status["error"]["message"]
    assert "RunDocLLM" in status["error"]["node"] and status["error"]["worker"].startswith("cli")
    assert "RunBatch/Sequence/Gather" in done.stderr  # the progress bar of the fan-out
    result = tasktree(env, "result", status["id"])
    assert result.returncode == 1 and "failed: InternalServerError" in result.stderr


def test_cancel_retry_and_timeouts(fleet: dict[str, Any]) -> None:
    """Naps that last until woken (or 120 s): the run is surely still going when it is cancelled, however slow the
    machine, and the retry's naps are woken before it starts."""
    import redis

    env = fleet["env"]
    wake = f"naps:wake:{uuid.uuid4().hex}"
    board = json.dumps({"seconds": 120, "count": 4, "wake_key": wake})
    run_id = ok(env, "submit", "RunNaps", "-i", "tests.run_trees", "-b", board).strip()
    assert tasktree(env, "result", run_id, "--timeout", "0.5").returncode == 3  # still going
    assert "cancelled" in ok(env, "cancel", run_id)  # its units were running: they are stopped
    again = tasktree(env, "cancel", run_id)
    assert again.returncode == 1 and "already finished (cancelled)" in again.stderr
    assert json.loads(ok(env, "status", run_id, "--json"))["state"] == "cancelled"
    # retried at once: the stopped units run again (not refused as cancelled) and the run succeeds
    with redis.Redis.from_url(env["TASKTREE_REDIS_URL"]) as client:
        client.set(wake, "1", ex=600)
    assert "queued again" in ok(env, "retry", run_id, "--wait")
    status = json.loads(ok(env, "status", run_id, "--json"))
    assert status["state"] == "succeeded" and status["attempt"] == 1 and status["progress"]["failed"] == 0
    assert json.loads(ok(env, "result", run_id)) == ["rested"] * 4
    refused = tasktree(env, "retry", "--wait", run_id + "x")
    assert refused.returncode == 2 and "no run" in refused.stderr


def test_errors_name_what_was_wrong(fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's own code, in this process (click's runner): each mistake, its exit code and message."""
    for name in ("TASKTREE_BROKER_URL", "TASKTREE_REDIS_URL"):
        monkeypatch.setenv(name, fleet["env"][name])
    monkeypatch.setenv("TASKTREE_IMPORTS", "")
    runner = CliRunner()
    cases = [
        (("status", "nope"), 2, "no run 'nope'"),
        (("result", "nope"), 2, "no run 'nope'"),
        (("cancel", "nope"), 2, "no run 'nope'"),
        (("events", "nope", "--no-follow"), 2, "no run 'nope'"),
        (("submit", "RunBatch", "-i", "tests.run_trees", "-b", '{"texts": 5}'), 2, "does not fit Batch"),
        (("submit", "RunBatch", "-i", "tests.run_trees", "-b", "{nope"), 2, "--blackboard: not JSON"),
        (("submit", "RunBatch", "-i", "tests.run_trees", "-b", "@/nonexistent.json"), 2, "cannot read"),
        (("submit", "RunBatch", "-i", "no.such.module"), 2, "cannot import 'no.such.module'"),
        (("submit", "NoSuchTree", "-b", "{}"), 2, "tree 'NoSuchTree' is registered neither here nor on any live"),
        (("submit", "RunBatch", "-i", "tests.run_trees", "-l", "novalue"), 2, "--label 'novalue': use KEY=VALUE"),
        (("runs", "--cursor", "junk"), 2, "cursor 'junk' is not a cursor of a previous page"),
        (("runs", "--cursor", "nan"), 2, "cursor 'nan' is not a cursor"),
        (("runs", "--limit", "0"), 2, "Invalid value for '--limit'"),
        (("runs", "--state", "bogus"), 2, "Invalid value for '--state'"),
        (("status", "bad id"), 2, "no run 'bad id'"),
        (("--redis-url", f"redis://127.0.0.1:{free_port()}/0", "status", "x"), 4, "cannot reach Redis"),
    ]
    for args, code, message in cases:
        done = runner.invoke(cli, list(args))
        assert done.exit_code == code and message in done.stderr, (args, done.exit_code, done.stderr, done.exception)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 3, (args, done.stderr)
