"""Specs in the fleet: a spec posted with plain HTTP (no Python client) runs on two workers that never imported a
module building it; blackboards are checked at submit against the tree's schema; `tasktree validate/schema --fleet`
read the fleet's palette."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import tests.spec_trees  # noqa: F401 - the functions specs name, registered in this process too
from tasktree_dist import RunClient, SpecError, SubmitError, register_function
from tasktree_dist.testing.fleet import REPO_ROOT
from tests.helpers import two_workers
from tests.ops_fleet import served, tasktree_command

pytestmark = pytest.mark.timeout(120)
TOKEN = "spec-token"

SPEC = {
    "tasktree": 1,
    "name": "http_words",
    "blackboard": {"type": "object", "properties": {"texts": {"type": "array", "items": {"type": "string"}},
                                                    "counts": {"type": "array"}},
                   "required": ["texts"]},
    "root": {"kind": "Sequence", "children": [
        {"kind": "Parallel", "children": [
            {"kind": "Remote", "queue": "spec1", "children": [{"kind": "Function", "func": "count_first"}]},
            {"kind": "Remote", "queue": "spec2", "children": [{"kind": "Function", "func": "count_first"}]},
        ]},
        {"kind": "Function", "func": "count_all"},
        {"kind": "WriteBlackboard", "attr_or_func": "counts"},
    ]},
}


@pytest.fixture(scope="module")
def spec_fleet(redis_url: str) -> Iterator[dict[str, Any]]:
    """Two workers that import only tests.spec_trees (functions, tools, stores; no tree of SPEC), stopped by PID."""
    with two_workers(redis_url, (6, 7), "tests.spec_trees", "spec", own_queues=True) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def server(spec_fleet: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tasktree serve --control-token` with no TASKTREE_IMPORTS: it knows no function."""
    env = {k: v for k, v in spec_fleet["env"].items() if k != "TASKTREE_IMPORTS"}
    with served(env, tmp_path_factory.mktemp("traces"), TOKEN) as url:
        yield url


def post(url: str, body: Any, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_a_spec_posted_over_http_runs_on_two_workers(spec_fleet: dict[str, Any], server: str) -> None:
    status, body = post(f"{server}/api/runs", {"tree": SPEC, "blackboard": {"texts": ["a b", "c d e"]},
                                               "labels": {"via": "http"}})
    assert status == 201, body
    run_id = body["id"]
    with RunClient(spec_fleet["app"]) as client:
        outcome = client.result(run_id, timeout=60)
        found = client.status(run_id)
        trace = client.trace(run_id, full=True)
    assert outcome.is_ok(), found
    assert outcome.data == [2, 3]
    assert found.tree == "http_words" and found.labels == {"via": "http"}
    workers = {node.get("attributes", {}).get("worker") for node in _walk(trace)} - {None, ""}
    assert len(workers) == 2, workers  # a Remote branch on each worker's own queue
    assert get(f"{server}/api/runs/{run_id}")["state"] == "succeeded"
    view = get(f"{server}/api/runs/{run_id}/tree")  # what the board draws
    assert view["document"] == SPEC and view["variables"] == {}
    assert view["layout"]["root"]["kind"] == "Sequence"
    assert [c["name"] for c in view["layout"]["root"]["children"]] == ["Parallel", "Function(count_all)",
                                                                        "WriteBlackboard(b.counts)"]


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    children = node.get("children") or []
    for child in children.values() if isinstance(children, dict) else children:
        yield from _walk(child)


def test_http_submit_refuses_bad_input_before_queueing(spec_fleet: dict[str, Any], server: str) -> None:
    status, body = post(f"{server}/api/runs", {"tree": SPEC, "blackboard": {"texts": "not a list"}})
    assert status == 400 and "texts: 'not a list' is not of type 'array'" in body["detail"]
    status, body = post(f"{server}/api/runs", {"tree": SPEC, "blackboard": {}})
    assert status == 400 and "'texts' is a required property" in body["detail"]
    unknown = json.loads(json.dumps(SPEC).replace("count_all", "count_everything"))
    status, body = post(f"{server}/api/runs", {"tree": unknown, "blackboard": {"texts": []}})
    assert status == 400 and body["problems"][0]["pointer"] == "/root/children/1/func"
    assert "function 'count_everything' is not registered" in body["problems"][0]["message"]
    status, body = post(f"{server}/api/runs", {"tree": SPEC, "blackboard": {"texts": []}}, token=None)
    assert status == 401
    status, body = post(f"{server}/api/runs", {"tree": "no_such_tree"})
    assert status == 400 and "no_such_tree" in body["detail"]
    with RunClient(spec_fleet["app"]) as client:
        assert all(run.tree != "http_words" or run.state.value == "succeeded" for run in client.list())


def test_a_code_tree_by_name_gets_its_blackboard_checked_and_typed(spec_fleet: dict[str, Any]) -> None:
    """The failures of issue 19: a dict blackboard for a dataclass tree, no blackboard, an unknown field."""
    with RunClient(spec_fleet["app"]) as client:
        with pytest.raises(SubmitError, match="'text' is a required property|None is not of type 'object'"):
            client.submit("spec_typed", None)
        with pytest.raises(SubmitError, match=r"text: 3 is not of type 'string'"):
            client.submit("spec_typed", {"text": 3})
        with pytest.raises(SubmitError, match=r"Additional properties are not allowed \('bogus' was unexpected\)"):
            client.submit("spec_typed", {"text": "x", "bogus": 1})
        run = client.submit("spec_typed", {"text": "three small words"})
        assert run.result(timeout=60).data == 3
        with pytest.raises(SpecError, match="unknown node kind"):
            client.submit({"tasktree": 1, "name": "x", "root": {"kind": "Nope"}})
        register_function("only_here", lambda b: 1)  # the fleet's coordinators would not find it
        with pytest.raises(SpecError, match="function 'only_here' is not registered"):
            client.submit({"tasktree": 1, "name": "x", "root": {"kind": "Function", "func": "only_here"}})


def test_validate_and_schema_read_the_fleet_palette(spec_fleet: dict[str, Any], tmp_path: Any) -> None:
    env = {k: v for k, v in spec_fleet["env"].items() if k != "TASKTREE_IMPORTS"}
    good, bad = tmp_path / "good.json", tmp_path / "bad.yaml"
    good.write_text(json.dumps(SPEC))
    bad.write_text("tasktree: 1\nname: bad\nroot:\n  kind: Function\n  func: count_everything\n")
    done = subprocess.run([*tasktree_command(), "validate", "--fleet", str(good)], env=env, capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*tasktree_command(), "validate", "--fleet", str(bad)], env=env, capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 2
    assert f"{bad}:5:9: function 'count_everything' is not registered" in done.stderr
    done = subprocess.run([*tasktree_command(), "schema", "--fleet"], env=env, capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    palette = json.loads(done.stdout)
    assert palette["functions"]["count_all"]["input"]["type"] == "object"
    assert palette["tools"]["word_count"]["input"]["required"] == ["text"]
    assert palette["trees"]["spec_typed"]["blackboard"]["required"] == ["text"]


def test_a_yaml_agent_runs_in_process_and_in_the_fleet(spec_fleet: dict[str, Any], fake_llm: Any,
                                                       tmp_path: Any) -> None:
    """`tasktree run agent.yaml --var ...` here, `tasktree submit agent.yaml --var ...` to the fleet: two tools, a
    tool agent, a pre-hook; the fleet run's event stream carries the agent's typed events."""
    from tests.spec_trees import AGENT

    agent = tmp_path / "agent.yaml"
    agent.write_text(AGENT)
    variables = ["--var", "topic=owls", "--var", f"base_url={fake_llm.base_url}"]
    done = subprocess.run([*tasktree_command(), "run", str(agent), *variables], env=spec_fleet["env"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    local = json.loads(done.stdout)
    assert local["tools"] == ["helper", "lookup", "word_count"] and local["facts"] == "owls hoot"

    env = {k: v for k, v in spec_fleet["env"].items() if k != "TASKTREE_IMPORTS"}  # the submitter imports nothing
    done = subprocess.run([*tasktree_command(), "submit", str(agent), *variables, "--wait", "--json",
                           "--timeout", "60"], env=env, capture_output=True, text=True, cwd=REPO_ROOT, timeout=90)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    with RunClient(spec_fleet["app"]) as client:
        outcome = client.result(status["id"], timeout=10)
        events = client.events_after(status["id"], "0", count=10_000)
    assert outcome.is_ok()
    assert {**outcome.data, "answer": ""} == {**local, "answer": ""}  # the answers differ in tool durations only
    assert '"result":"helped with owls"' in outcome.data["answer"]
    kinds = [event.type for event in events if event.data.get("agent") == "writer"]
    assert kinds.count("agent_turn_start") == 2 and kinds.count("agent_tool_end") == 3
    assert "agent_message" in kinds and kinds[-1] == "agent_turn_end"

    skipped = subprocess.run([*tasktree_command(), "submit", str(agent), "--var", "topic=skip", "--var",
                              f"base_url={fake_llm.base_url}", "--wait", "--json", "--timeout", "60"], env=env,
                             capture_output=True, text=True, cwd=REPO_ROOT, timeout=90)
    assert skipped.returncode == 0, skipped.stderr
    with RunClient(spec_fleet["app"]) as client:
        assert client.result(json.loads(skipped.stdout)["id"], timeout=10).data == {"skipped": True}


def test_the_example_specs_run_as_their_comments_say(fake_llm: Any) -> None:
    def tasktree(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*tasktree_command(), *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)

    done = tasktree("run", "examples/specs/words.yaml", "-i", "examples.spec_parts", "-b",
                    '{"text": "three small words"}', "--trace")
    assert done.returncode == 0 and json.loads(done.stdout) == 3, done.stderr
    assert "Function(count_words)  OK" in done.stderr  # --trace: the run's trace tree
    done = tasktree("run", "examples/specs/agent.yaml", "-i", "examples.spec_parts", "--var", "topic=owls",
                    "--var", f"base_url={fake_llm.base_url}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tools_used"] == ["encyclopedia", "fact_checker"]
    done = tasktree("validate", "-i", "examples.spec_parts", "examples/specs/agent.yaml")
    assert done.returncode == 2 and "$base_url has no value" in done.stderr


def test_a_spec_run_parks_on_its_waitfor_and_a_signal_resumes_it(spec_fleet: dict[str, Any]) -> None:
    from tasktree_dist import SignalError

    document = {"tasktree": 1, "name": "spec_approval", "blackboard": {"type": "object"}, "root": {
        "kind": "Sequence", "children": [
            {"kind": "WaitFor", "name": "approval", "prompt": "Publish?",
             "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}},
            {"kind": "WriteBlackboard", "attr_or_func": "decision"},
        ]}}
    with RunClient(spec_fleet["app"]) as client:
        run = client.submit(document, {})
        deadline = time.monotonic() + 60
        while client.status(run.id).state.value != "waiting":  # parked: no process holds it
            assert time.monotonic() < deadline, client.status(run.id)
            time.sleep(0.05)  # polling with a deadline
        with pytest.raises(SignalError, match="ok"):
            client.signal(run.id, "approval", {"ok": "yes"})  # checked against the spec's schema, nothing recorded
        assert client.signal(run.id, "approval", {"ok": True}) is True
        assert run.result(timeout=60).data == {"ok": True}
