"""Nothing fails silently, on real processes: a worker started without TASKTREE_IMPORTS ("bad") beside one that has
the trees ("good"), on a private redis-server, watched by a real Flower.

Units go where they can run (the bad worker hands every unit back untouched, never runs one); a unit nobody can
run FAILs naming the live workers and their trees; submit refuses a tree no live worker has; Flower shows a message
with FAILed units and the coordinator task of a failed run as FAILURE, acknowledged (never redelivered).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from tasktree_dist import Context, RunClient, RunState, Status, SubmitError, Tree
from tasktree_dist.distributed import CeleryExecutor, create_app
from tasktree_dist.testing.fleet import (
    REPO_ROOT,
    FlowerProcess,
    WorkerProcess,
    fleet_env,
    fleet_settings,
    running_workers,
)
from tasktree_dist.testing.redis_server import RedisServer, free_port, stop_process, wait_for_port
from tests import loud_trees as L
from tests import run_trees as R
from tests.helpers import eventually
from tests.ops_fleet import tasktree, tasktree_command

pytestmark = pytest.mark.timeout(120)

#: Seconds a unit nobody can run waits before it FAILs (TASKTREE_UNRUNNABLE_LIMIT; 60 by default).
UNRUNNABLE_LIMIT = "2"


@pytest.fixture(scope="module")
def loud_fleet() -> Iterator[dict[str, Any]]:
    with RedisServer() as server:
        good_env = fleet_env(f"{server.url}/0", f"{server.url}/1", "tests.run_trees,tests.loud_trees",
                             TASKTREE_UNRUNNABLE_LIMIT=UNRUNNABLE_LIMIT)
        bad_env = {**good_env, "TASKTREE_IMPORTS": ""}
        settings = fleet_settings(good_env, unrunnable_limit=float(UNRUNNABLE_LIMIT))
        app = create_app(settings)
        flower = FlowerProcess(good_env, free_port(), basic_auth=f"tasktree:{secrets.token_hex(8)}")
        good, bad = WorkerProcess("good", good_env, concurrency=16), WorkerProcess("bad", bad_env, concurrency=16)
        try:
            flower.start().wait_listening(timeout=30)
            with running_workers(app, [good, bad]):
                yield {"app": app, "settings": settings, "env": good_env, "good": good, "bad": bad,
                       "flower": flower, "redis": server.url}
        finally:
            flower.stop()


@pytest.fixture
async def client(loud_fleet: dict[str, Any]) -> Any:
    client = RunClient(loud_fleet["app"], settings=loud_fleet["settings"])
    try:
        yield client
    finally:
        await client.aclose()


def workers_log(fleet: dict[str, Any]) -> str:
    return "\n".join(f"--- {w.name}\n{w.log()[-3000:]}" for w in (fleet["good"], fleet["bad"]))


async def test_units_go_only_to_the_worker_that_has_their_tree(loud_fleet: dict[str, Any], client: RunClient) -> None:
    # a submitted run (its coordinate message may reach the bad worker too: handed back)
    run = await client.asubmit(R.NapsTree, R.Naps(count=40))
    result = await run.aresult(timeout=60)
    assert result.status is Status.OK, workers_log(loud_fleet)
    assert (await run.ablackboard()).results == ["rested"] * 40
    trace = await run.atrace()
    gather = trace["children"]["Tree(RunNaps)"]["children"]["Sequence"]["children"]["Gather"]["children"]
    assert len(gather) == 40
    assert {child["attributes"]["worker"].split("@")[0] for child in gather.values()} == {"good"}

    # an inline run, one unit per message: the idle bad worker is offered many of them and hands each back
    executor = CeleryExecutor(loud_fleet["app"], settings=loud_fleet["settings"].model_copy(update={"batch_size": 1}))
    try:
        context = Context(executor=executor)
        board = R.Naps(count=40)
        async with context.using_blackboard(board):
            result = await R.NapsTree(context)
        assert result.status is Status.OK, workers_log(loud_fleet)
        assert board.results == ["rested"] * 40
        children = [n for n in context.trace_root().walk() if n.name.endswith("_Tree(RunNap)")]
        assert len(children) == 40
        assert {str(n.attributes.get("worker")).split("@")[0] for n in children} == {"good"}
    finally:
        await executor.aclose()
    bad_log = loud_fleet["bad"].log()
    assert "handing back" in bad_log and "tree 'RunNap' is not registered in this process" in bad_log
    assert re.search(r"'units': [1-9]", bad_log) is None  # it ran nothing


async def test_a_worker_without_trees_says_so(loud_fleet: dict[str, Any]) -> None:
    assert "NO TREES REGISTERED" in loud_fleet["bad"].log()
    assert "NO TREES REGISTERED" not in loud_fleet["good"].log()
    shown = tasktree(loud_fleet["env"], "workers")
    assert shown.returncode == 0, shown.stderr
    bad_line = next(line for line in shown.stdout.splitlines() if "bad@" in line)
    assert "NONE" in bad_line
    good_line = next(line for line in shown.stdout.splitlines() if "good@" in line)
    assert "NONE" not in good_line


async def test_submit_refuses_a_tree_no_live_worker_has(client: RunClient) -> None:
    local_only = Tree[L.Items]("LoudLocalOnly").Function(lambda: "here only").End()
    with pytest.raises(SubmitError, match=r"no live worker serving 'tasktree.runs' has tree 'LoudLocalOnly'.*"
                       r"bad@\S+ \[queues [^;]*; no trees\]"):
        await client.asubmit(local_only, L.Items())


async def test_a_unit_nobody_can_run_fails_naming_the_live_workers(loud_fleet: dict[str, Any]) -> None:
    # live workers serve its queue but none has the tree: a deployment mistake, failed within seconds
    local_only = Tree[L.Items]("LoudUnrunnable").Function(lambda: "here only").End()
    # nobody serves its queue (workers restarting?): it waits TASKTREE_UNRUNNABLE_LIMIT, then fails the same way
    unserved = Tree[L.Items]("LoudUnserved").Remote(queue="nobody")._().Function(lambda: "here only").End()
    executor = CeleryExecutor(loud_fleet["app"], settings=loud_fleet["settings"])
    errors = {}
    try:
        for tree in (local_only, unserved):
            context = Context(executor=executor)
            async with context.using_blackboard(L.Items()):
                result = await tree(context)
            assert result.status is Status.FAIL
            found = [n.attributes["error"] for n in context.trace_root().walk() if "error" in n.attributes]
            assert found, context.trace_root()
            errors[tree.name] = found[0]
    finally:
        await executor.aclose()
    error = errors["LoudUnrunnable"]
    assert "no live worker serves queue 'tasktree' with tree 'LoudUnrunnable'" in error
    assert "bad@" in error and "good@" in error and "RunNap@" in error and "waited" not in error
    error = errors["LoudUnserved"]
    assert "no live worker serves queue 'nobody' with tree 'LoudUnserved'" in error and "good@" in error
    assert f"waited {UNRUNNABLE_LIMIT} s (TASKTREE_UNRUNNABLE_LIMIT)" in error


async def test_flower_shows_failed_messages_and_failed_runs_without_redelivery(
    loud_fleet: dict[str, Any], client: RunClient
) -> None:
    flower = loud_fleet["flower"]
    run = await client.asubmit(L.HalfBroken, L.Items(count=4))
    result = await run.aresult(timeout=60)
    assert result.status is Status.FAIL
    assert (await run.astatus()).state.value == "failed"
    user, password = flower.basic_auth.split(":", 1)
    async with httpx.AsyncClient(base_url=flower.url, auth=(user, password), timeout=10) as http:

        async def tasks(name: str) -> dict[str, Any]:
            response = await http.get("/api/tasks", params={"taskname": name})
            assert response.status_code == 200, response.text[:300]
            return {uuid: task for uuid, task in response.json().items() if run.id in str(task.get("kwargs"))
                    or run.id in str(task.get("args"))}

        async def failed_units() -> list[dict[str, Any]]:
            found = await tasks("tasktree.execute")
            return sorted((t for t in found.values() if t["state"] == "FAILURE"), key=lambda t: t["exception"])

        failures = await eventually(failed_units, "the failed unit messages in Flower", 30, 0.2,
                                    lambda: flower.log()[-2000:])
        text = " ".join(t["exception"] for t in failures)
        assert "UnitsFailedError" in text and "LoudItem[1]" in text and "LoudItem[3]" in text
        assert "first error: 1_Tree(LoudItem)/Function(check): ValueError: odd item 1" in text

        async def failed_coordinator() -> list[dict[str, Any]]:
            found = await tasks("tasktree.coordinate")
            return [t for t in found.values() if t["state"] == "FAILURE"]

        coordinators = await eventually(failed_coordinator, "the failed coordinate task in Flower", 30, 0.2,
                                        lambda: flower.log()[-2000:])
        assert "RunFailedError" in coordinators[0]["exception"] and run.id in coordinators[0]["exception"]
    # failed messages are acknowledged like any other: nothing left unacked for a redelivery
    broker = redis.Redis.from_url(loud_fleet["env"]["TASKTREE_BROKER_URL"])
    try:
        async def nothing_unacked() -> bool:
            return broker.hlen("unacked") == 0

        await eventually(nothing_unacked, "every message acknowledged", 20, 0.1)
    finally:
        broker.close()
    good_log = loud_fleet["good"].log()
    for task in failures:
        assert good_log.count(f"tasktree.execute[{task['uuid']}] received") == 1


@pytest.fixture(scope="module")
def server(loud_fleet: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tasktree serve` in its own process on a free loopback port; stopped by PID."""
    port = free_port()
    process = subprocess.Popen([*tasktree_command(), "serve", "--port", str(port), "--trace-dir",
                                str(tmp_path_factory.mktemp("traces"))], cwd=REPO_ROOT, env=loud_fleet["env"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 30, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


async def test_input_errors_are_one_line_never_a_traceback(loud_fleet: dict[str, Any], client: RunClient,
                                                          server: str) -> None:
    env = loud_fleet["env"]
    other = await client.asubmit(R.NapTree, R.Nap())
    await other.aresult(timeout=30)
    cases = [
        (("runs", "--cursor", "junk"), "cursor 'junk' is not a cursor of a previous page"),
        (("runs", "--limit", "-3"), "Invalid value for '--limit'"),
        (("status", "../etc"), "no run '../etc'"),
        (("submit", "RunNaps", "-b", '{"count": 1}', "--run-id", other.id),
         f"run id '{other.id}' is a run of tree 'RunNap', not of 'RunNaps'"),
    ]
    for args, message in cases:
        done = tasktree(env, *args)
        assert done.returncode == 2, (args, done.returncode, done.stdout, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    async with httpx.AsyncClient(base_url=server, timeout=10) as http:
        for path, code, message in [
            ("/api/runs?cursor=junk", 400, "cursor 'junk'"),
            ("/api/runs?cursor=inf", 400, "cursor 'inf'"),
            ("/api/runs?limit=x", 400, "limit must be an integer"),
            ("/api/runs?limit=0", 400, "limit must be an integer >= 1"),
            ("/api/runs?state=bogus", 400, "state must be one of"),
            ("/api/runs/bad%20id", 400, "invalid run id"),
            ("/api/runs/nope", 404, "no run 'nope'"),
            ("/api/workers", 404, "no API route /api/workers"),
            ("/api/runs/nope/bogus", 404, "not found: /api/runs/nope/bogus"),
        ]:
            response = await http.get(path)
            assert response.status_code == code, (path, response.status_code, response.text[:300])
            assert response.headers["content-type"].startswith("application/json"), path
            assert message in response.json()["detail"], (path, response.text[:300])
        assert (await http.get(f"/api/runs/{other.id}")).json()["tree"] == "RunNap"


READ_BLACKBOARD = """
import json, sys, warnings
from tasktree_dist import RunClient
from tasktree_dist.core.serde import EncodingError
from tasktree_dist.distributed import create_app

run = RunClient(create_app()).get(sys.argv[1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    plain = run.blackboard()
print(json.dumps({"blackboard": plain, "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
try:
    run.blackboard(typed=True)
except EncodingError as exc:
    print(json.dumps({"typed": str(exc)}))
"""


async def test_a_blackboard_reads_as_json_where_its_type_is_not_registered(
    loud_fleet: dict[str, Any], client: RunClient
) -> None:
    run = await client.asubmit(L.ParcelTree, L.Parcel(label="box", weights=[1.5, 2.0]))
    assert (await run.aresult(timeout=30)).status is Status.OK
    assert await run.ablackboard() == L.Parcel(label="box", weights=[1.5, 2.0], done=True)  # registered here
    # another process, which never imports tests.loud_trees
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", READ_BLACKBOARD, run.id], cwd=REPO_ROOT,
                                   env=loud_fleet["env"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    plain, typed = (json.loads(line) for line in done.stdout.splitlines())
    assert plain["blackboard"] == {"label": "box", "weights": [1.5, 2.0], "done": True}
    assert len(plain["warnings"]) == 1
    assert plain["warnings"][0].startswith("UnregisteredTypeWarning: ")
    assert "type(s) tests.loud_trees:Parcel of its blackboard are not registered" in plain["warnings"][0]
    assert "'LoudParcel'" in plain["warnings"][0]
    assert typed == {"typed": "type 'tests.loud_trees:Parcel' is not registered (register_type) and will not be "
                              "decoded"}


async def test_flower_keeps_its_history_across_a_restart(loud_fleet: dict[str, Any], client: RunClient,
                                                         tmp_path: Path) -> None:
    """Compose runs Flower with --persistent=True --db=<volume>: the failed messages are still listed after a
    restart (here: the same options on a real Flower, stopped with SIGTERM as `docker compose restart` does)."""
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["flower"]["command"]
    options = tuple(o if not o.startswith("--db=") else f"--db={tmp_path / 'flower.db'}"
                    for o in compose if o.startswith(("--persistent", "--db=", "--state_save_interval")))
    assert "--persistent=True" in options and any(o.startswith("--db=") for o in options)
    auth = f"tasktree:{secrets.token_hex(8)}"
    port = free_port()

    async def failed_tasks(flower: FlowerProcess, run_id: str) -> list[str]:
        user, password = auth.split(":", 1)
        async with httpx.AsyncClient(base_url=flower.url, auth=(user, password), timeout=10) as http:
            response = await http.get("/api/tasks", params={"taskname": "tasktree.execute", "state": "FAILURE"})
        return [uuid for uuid, task in response.json().items() if run_id in str(task.get("kwargs"))] \
            if response.status_code == 200 else []

    async def workers_seen(flower: FlowerProcess) -> bool:
        user, password = auth.split(":", 1)
        async with httpx.AsyncClient(base_url=flower.url, auth=(user, password), timeout=10) as http:
            response = await http.get("/api/workers", params={"status": 1})
        return response.status_code == 200 and any(name.startswith("good@") and up
                                                   for name, up in response.json().items())

    first = FlowerProcess(loud_fleet["env"], port, basic_auth=auth, options=options)
    try:
        first.start().wait_listening(timeout=30)
        await eventually(lambda: workers_seen(first), "worker heartbeats in Flower (its event stream is on)", 30,
                         0.2, lambda: first.log()[-2000:])
        run = await client.asubmit(L.HalfBroken, L.Items(count=2))
        assert (await run.aresult(timeout=60)).status is Status.FAIL
        seen = await eventually(lambda: failed_tasks(first, run.id), "the failed message in Flower", 30, 0.2,
                                lambda: first.log()[-2000:])
    finally:
        first.stop()
    second = FlowerProcess(loud_fleet["env"], port, basic_auth=auth, options=options)
    try:
        second.start().wait_listening(timeout=30)
        again = await eventually(lambda: failed_tasks(second, run.id), "the failed message after a restart", 20,
                                 0.2, lambda: second.log()[-2000:])
    finally:
        second.stop()
    assert again == seen


async def test_a_queued_run_nobody_can_coordinate_fails_naming_the_live_workers(client: RunClient) -> None:
    """As if the only worker with its tree died after the submit: the record alone, queued (submit refuses it)."""
    run_id = f"orphan-{secrets.token_hex(4)}"
    fields = {"tree": "LoudGone", "fingerprint": "0" * 16, "mode": "submitted", "labels": "{}", "blackboard": "null",
              "queue": "tasktree.runs"}
    assert await client._store().create(run_id, RunState.QUEUED, fields)

    async def failed() -> Any:
        status = await client.astatus(run_id)
        return status if status.state is RunState.FAILED else None

    status = await eventually(failed, "the run failed by a supervisor", 30, 0.1)
    assert status.error is not None
    message = status.error.message
    assert message.startswith(f"nobody can coordinate run {run_id}: no live worker serves queue 'tasktree.runs' "
                              "with tree 'LoudGone' at fingerprint 0000000000000000")
    assert "good@" in message and "bad@" in message
