"""Flower watches the fleet: a run's units appear as `tasktree.execute` tasks naming tree and address, a failed
unit's address is in its task's result, and both workers are listed (a real `celery -A worker flower` process on a
free port, read through its HTTP API with basic auth)."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from tasktree_dist import Context, Result, Status
from tasktree_dist.distributed import CeleryExecutor
from tasktree_dist.testing.fleet import FlowerProcess
from tasktree_dist.testing.redis_server import free_port
from tests import dist_trees as T
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def flower(fleet: dict[str, Any]) -> Iterator[FlowerProcess]:
    """Flower on the fleet's broker, started before any unit is sent (it only sees events sent after it connects)."""
    # Flower 2.2 serves its API only with authentication (or FLOWER_UNAUTHENTICATED_API): use basic auth.
    process = FlowerProcess(fleet["env"], free_port(), basic_auth=f"tasktree:{secrets.token_hex(8)}")
    try:
        process.start().wait_listening(timeout=30)
        yield process
    finally:
        process.stop()


async def poll(check: Callable[[], Awaitable[Any]], what: str, flower: FlowerProcess, within: float = 20.0) -> Any:
    """Call `check` until it returns something truthy; fail naming `what`, the last value and Flower's log."""
    return await eventually(check, f"Flower: {what}", within, 0.2, lambda: flower.log()[-2000:])


async def test_flower_lists_the_units_of_a_run_and_both_workers(fleet: dict[str, Any], flower: FlowerProcess) -> None:
    user, password = flower.basic_auth.split(":", 1)
    worker_names = {name.split("@")[0]: name for name in fleet["names"]}
    assert set(worker_names) >= {"w1", "w2"}
    async with httpx.AsyncClient(base_url=flower.url, auth=(user, password), timeout=10) as http:
        assert (await http.get("/api/workers", auth=None)).status_code == 401  # the API is not open to anyone

        async def get(path: str, **params: Any) -> Any:
            response = await http.get(path, params=params)
            assert response.status_code == 200, f"GET {path} {params}: {response.status_code} {response.text[:500]}"
            return response.json()

        # Worker heartbeats reach Flower through the event stream: once both show up, task events will too.
        async def alive() -> set[str]:
            status = await get("/api/workers", status=1)
            return {name for name, up in status.items() if up} >= {worker_names["w1"], worker_names["w2"]}

        await poll(alive, "heartbeats of w1 and w2", flower)

        executor = CeleryExecutor(fleet["app"], settings=fleet["settings"])
        runs: dict[str, str] = {}
        try:
            for tree in (T.GatherMany, T.Basic):
                context = Context(executor=executor)
                async with context.using_blackboard(T.Board()):
                    result = await tree(context)
                assert result.status is Status.OK, result
                runs[tree.name] = context.run_id or ""
            assert result == Result.OK("Item:x:1.5")
        finally:
            await executor.aclose()
        assert all(runs.values())

        expected = {
            "DistGatherMany": {f"DistDoc[{i}]" for i in range(16)},  # each Gather child tree by its index
            "DistBasic": {f"DistBasic/Sequence/Function({name})" for name in ("incr", "add_item", "read_last")},
        }

        async def units_seen() -> dict[str, list[dict[str, Any]]]:
            tasks = await get("/api/tasks", taskname="tasktree.execute")
            by_run: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
            for task in tasks.values():
                for name, run_id in runs.items():
                    if f"'run_id': '{run_id}'" in (task.get("kwargs") or ""):
                        by_run[name].append(task)
            for name, found in by_run.items():
                kwargs = " ".join(task.get("kwargs") or "" for task in found)
                if not all(address in kwargs for address in expected[name]):
                    return {}
                if any(task.get("state") != "SUCCESS" for task in found):
                    return {}
            return by_run

        by_run = await poll(units_seen, f"tasktree.execute tasks of runs {runs}", flower)
        for task in by_run["DistGatherMany"]:
            assert task["name"] == "tasktree.execute"
            assert "'tree': 'DistDoc'" in task["kwargs"] and "DistDoc[" in task["kwargs"]
            assert "DistDoc" in task["args"] and task["worker"].split("@")[0] in {"w1", "w2"}
        for task in by_run["DistBasic"]:
            assert "'tree': 'DistBasic'" in task["kwargs"] and "DistBasic/Sequence/Function(" in task["kwargs"]
            assert task["worker"].split("@")[0] in {"w1", "w2"}
        assert len(by_run["DistBasic"]) == 3  # one message per shipped Function leaf

        # Listed by inspection (refresh=1 asks the workers now) with their queues.
        async def listed() -> dict[str, Any]:
            workers = await get("/api/workers", refresh=1)
            return workers if {worker_names["w1"], worker_names["w2"]} <= set(workers) else {}

        workers = await poll(listed, "w1 and w2 in /api/workers?refresh=1", flower)
        for short, queue in (("w1", "w1"), ("w2", "w2")):
            queues = {q["name"] for q in workers[worker_names[short]].get("active_queues") or []}
            assert queues == {"tasktree", "tasktree.runs", queue}


async def test_a_failed_unit_is_findable_by_its_address_in_the_task_result(
    fleet: dict[str, Any], flower: FlowerProcess
) -> None:
    """A `tasktree.execute` message with a FAILed unit is a FAILURE in Flower, its exception naming the address and
    the first error: a search for the run id (kwargs) and the failure state finds it and the worker that ran it."""
    user, password = flower.basic_auth.split(":", 1)
    executor = CeleryExecutor(fleet["app"], settings=fleet["settings"])
    try:
        context = Context(executor=executor)
        async with context.using_blackboard(T.Board()):
            result = await T.FailingTree(context)
    finally:
        await executor.aclose()
    assert result.status is Status.FAIL
    address = "DistFailing/Sequence/Function(divide)"
    async with httpx.AsyncClient(base_url=flower.url, auth=(user, password), timeout=10) as http:

        async def found() -> list[dict[str, Any]]:
            response = await http.get("/api/tasks", params={"taskname": "tasktree.execute", "search": context.run_id})
            assert response.status_code == 200, response.text[:500]
            return [task for task in response.json().values()
                    if task.get("state") == "FAILURE" and address in (task.get("exception") or "")]

        tasks = await poll(found, f"the failed task of {address} with its address in the exception", flower)
    task = tasks[0]
    assert f"1 of 1 units FAILed: {address}; first error:" in task["exception"]
    assert "ZeroDivisionError" in task["exception"]
    assert "'tree': 'DistFailing'" in task["kwargs"] and address in task["kwargs"]
    assert task["worker"].split("@")[0] in {"w1", "w2"}
