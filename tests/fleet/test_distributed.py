"""Distributed execution on real processes: a private redis-server and two `celery -A worker worker` workers."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tasktree_dist import Context, FileTraceStorageHandler, Result, Status, TraceNode, Tree
from tasktree_dist.distributed import CeleryExecutor
from tasktree_dist.distributed.protocol import Unit
from tasktree_dist.distributed.snapshots import snapshot_key
from tests import dist_trees as T
from tests.helpers import run_with_executor as run

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def executor(fleet: dict[str, Any]) -> AsyncIterator[CeleryExecutor]:
    executor = CeleryExecutor(fleet["app"], settings=fleet["settings"])
    try:
        yield executor
    finally:
        await executor.aclose()


def nodes(context: Context, kind: str) -> list[TraceNode]:
    return [node for node in context.trace_root().walk() if node.kind == kind]


async def test_remote_leaves_run_on_workers_and_update_the_blackboard_in_place(executor: CeleryExecutor) -> None:
    board = T.Board()
    items = board.items
    result, context = await run(T.Basic, board, executor)
    assert result == Result.OK("Item:x:1.5")  # read_last saw the previous unit's typed Item via _last_result
    assert board.n == 1 and board.scalar == "Item:x:1.5"
    assert board.items is items and board.items == [T.Item("x", 1.5)]  # same list object, typed element
    assert board.where and not board.where.endswith(f":{os.getpid()}")  # ran in a worker process
    functions = nodes(context, "Function")
    assert len(functions) == 3
    for node in functions:
        assert node.attributes["worker"].split("@")[0] in {"w1", "w2"}
        assert node.attributes["pid"] != os.getpid()
        assert node.attributes["celery_task_id"] and node.attributes["queue"] == "tasktree"
        assert isinstance(node.attributes["queued_ms"], float)
    assert nodes(context, "WriteBlackboard")[0].attributes.get("worker") is None  # trivial leaves stay here


async def test_typed_result_round_trip(executor: CeleryExecutor) -> None:
    result, _ = await run(T.ReturnsItem, T.Board(), executor)
    assert result.status is Status.OK and result.data == T.Item("x", 1.5) and isinstance(result.data, T.Item)


async def test_parallel_branches_merge_in_branch_order(executor: CeleryExecutor) -> None:
    board = T.Board()
    log, tags = board.log, board.tags
    result, context = await run(T.ParallelMerge, board, executor)
    assert result.status is Status.OK
    assert board.log == ["p", "q"] and board.log is log  # appends concatenated in branch order, in place
    assert set(board.tags) == {"p", "q"} and board.tags is tags  # dict keys merged
    assert (board.a, board.b) == (1, 2)  # disjoint fields merged


async def test_parallel_conflicting_scalar_writes_fail_naming_field_and_branches(executor: CeleryExecutor) -> None:
    board = T.Board()
    result, context = await run(T.ParallelConflict, board, executor)
    assert result.status is Status.FAIL
    error = nodes(context, "Parallel")[0].attributes["error"]
    assert "'scalar'" in error and "Function(lambda)" in error and "Function(lambda)_1" in error
    assert board.scalar == ""  # nothing applied


async def test_gather_children_run_on_both_workers_and_trace_names_them(
    executor: CeleryExecutor, tmp_path: Any
) -> None:
    result, context = await run(T.GatherMany, T.Board(), executor)
    assert result.status is Status.OK
    assert result.data == [f"DOC {i}" for i in range(16)]
    gather = nodes(context, "Gather")[0]
    children = gather.child_list()
    assert [child.name for child in children] == [f"{i}_Tree(DistDoc)" for i in range(16)]
    workers = {child.attributes["worker"].split("@")[0] for child in children}
    assert workers == {"w1", "w2"}
    storage = FileTraceStorageHandler(tmp_path)
    saved = await storage.query(await storage.save(context.trace_root()))
    gather_json = saved["children"]["Tree(DistGatherMany)"]["children"]["Gather"]
    assert gather_json["children"]["0_Tree(DistDoc)"]["attributes"]["worker"].split("@")[0] in {"w1", "w2"}


async def test_gather_child_blackboards_are_updated_in_place(executor: CeleryExecutor) -> None:
    docs = [T.Doc(f"d{i}") for i in range(5)]
    tree = Tree[T.Board]("DistGatherInPlace").Gather(lambda b: ([T.DocTree] * 5, docs), concurrency_limit=5).End()
    result, _ = await run(tree, T.Board(), executor)
    assert result.status is Status.OK
    assert [doc.upper for doc in docs] == [f"D{i}" for i in range(5)]


async def test_unknown_tree_fails_within_seconds_naming_tree_address_and_worker(executor: CeleryExecutor) -> None:
    tree = Tree[T.Board]("CoordinatorOnly").Sequence()._().Function(T.incr).End()
    started = time.monotonic()
    result, context = await run(tree, T.Board(), executor)
    assert result.status is Status.FAIL and time.monotonic() - started < 10
    error = nodes(context, "Function")[0].attributes["error"]
    assert "'CoordinatorOnly'" in error and "CoordinatorOnly/Sequence/Function(incr)" in error
    assert "no live worker serves queue 'tasktree'" in error and "w1@" in error and "w2@" in error  # the live ones


async def test_fingerprint_mismatch_fails_naming_the_versions(executor: CeleryExecutor) -> None:
    tree = Tree[T.Board]("DistVersioned").Sequence()._().Function(T.incr, name="v2").End()
    result, context = await run(tree, T.Board(), executor)
    assert result.status is Status.FAIL
    error = nodes(context, "Function")[0].attributes["error"]
    assert "fingerprint" in error and tree.fingerprint in error and "DistVersioned" in error


async def test_unknown_node_address_fails(executor: CeleryExecutor) -> None:
    from types import SimpleNamespace

    from tasktree_dist.distributed.dispatch import Prepared
    from tasktree_dist.runs.model import RunState
    from tasktree_dist.runs.store import RunStore

    dispatcher = executor._dispatcher()
    run_id = f"r{time.time_ns()}"
    store = RunStore(dispatcher.redis, 600, 1000)
    await store.create(run_id, RunState.RUNNING, {"tree": "DistBasic", "reply": dispatcher.reply_key})
    unit = Unit(
        run_id=run_id, execution_id=f"{run_id}:bogus", tree="DistBasic", fingerprint=T.Basic.fingerprint,
        address="DistBasic/Sequence/Function(nope)", snapshot=snapshot_key(run_id, b"null"),
        reply_to=dispatcher.reply_key,
        queue="tasktree",
    )
    done: list[Any] = []
    scope = SimpleNamespace(replaying=False, run_id=run_id, stop_reason=None, units_out=0, activity=0, parking=None)
    await dispatcher.run_units(scope, 1, lambda _: Prepared(unit, b"null"), 1, lambda _, c: done.append(c))
    [completion] = done
    assert completion.status == "FAIL"
    assert "DistBasic/Sequence/Function(nope)" in completion.error and "on worker w" in completion.error


async def test_unencodable_blackboard_fails_at_dispatch_naming_field_and_type(executor: CeleryExecutor) -> None:
    result, context = await run(T.Basic, T.Board(blob=object()), executor)
    assert result.status is Status.FAIL
    error = nodes(context, "Function")[0].attributes["error"]
    assert "blackboard.blob" in error and "builtins.object" in error


async def test_timeout_around_remote_work_returns_on_time(executor: CeleryExecutor) -> None:
    started = time.monotonic()
    result, _ = await run(T.SlowTree, T.Board(), executor)
    assert result == Result.OK("fallback")
    assert time.monotonic() - started < 15  # the remote unit sleeps 30 s: the Timeout did not wait for it


async def test_redis_cache_written_by_one_worker_is_a_hit_on_the_other(executor: CeleryExecutor) -> None:
    key = f"k{time.time_ns()}"
    first_board, second_board = T.Board(scalar=key), T.Board(scalar=key)
    first, first_ctx = await run(T.CachedOnW1, first_board, executor)
    second, second_ctx = await run(T.CachedOnW2, second_board, executor)
    assert first.status is Status.OK and second == first  # the value computed on w1...
    assert first_board.calls == 1 and second_board.calls == 0  # ...is a hit on w2 (the child never ran)
    [w1_unit] = [n for n in first_ctx.trace_root().walk() if "worker" in n.attributes]
    [w2_unit] = [n for n in second_ctx.trace_root().walk() if "worker" in n.attributes]
    assert w1_unit.attributes["worker"].startswith("w1@") and w2_unit.attributes["worker"].startswith("w2@")
    assert w1_unit.attributes["queue"] == "w1" and w2_unit.attributes["queue"] == "w2"
    cacher = [n for n in second_ctx.trace_root().walk() if n.kind == "Cacher"][0]
    assert cacher.attributes["cache_status"] == "hit"


async def test_local_subtree_stays_in_the_coordinator(executor: CeleryExecutor) -> None:
    board = T.Board()
    result, context = await run(T.LocalTree, board, executor)
    assert result == Result.OK(1) and board.where.endswith(f":{os.getpid()}")
    assert all("worker" not in node.attributes for node in context.trace_root().walk())


async def test_progress_counts_remote_gather_trees_as_their_completions_arrive(executor: CeleryExecutor) -> None:
    from tasktree_dist import ProgressEvent

    events: list[ProgressEvent] = []
    context = Context(executor=executor, on_progress=events.append)
    async with context.using_blackboard(T.Board()):
        result = await T.GatherMany(context)
    assert result.status is Status.OK
    assert [e.done for e in events] == list(range(17)) and {e.total for e in events} == {16}
    assert events[-1].failed == 0 and events[-1].node == "DistGatherMany/Gather"


@pytest.mark.parametrize("down", ["broker", "redis"])
async def test_an_unreachable_broker_or_redis_fails_the_node_quickly_naming_it(redis_url: str, down: str) -> None:
    from broker_config import TasktreeSettings
    from tasktree_dist.distributed import create_app
    from tasktree_dist.testing.redis_server import free_port
    from tests.helpers import redis_db

    port = free_port()  # nothing listens there
    dead = f"redis://:secret@127.0.0.1:{port}/0"
    live_broker = redis_db(redis_url, 10)  # nothing consumes it: the test ends at dispatch either way
    settings = TasktreeSettings(
        broker_url=dead if down == "broker" else live_broker,
        redis_url=redis_db(redis_url, 9) if down == "broker" else dead,
    )
    executor = CeleryExecutor(create_app(settings), settings=settings)
    started = time.monotonic()
    try:
        result, context = await run(T.Basic, T.Board(), executor)
    finally:
        await executor.aclose()  # also when Redis is the one that is down
    assert result.status is Status.FAIL and time.monotonic() - started < 10
    error = next(node.attributes["error"] for node in context.trace_root().walk() if "error" in node.attributes)
    setting = "TASKTREE_BROKER_URL" if down == "broker" else "TASKTREE_REDIS_URL"
    assert f"127.0.0.1:{port}" in error and setting in error and "secret" not in error


async def test_an_unreadable_completion_is_skipped_and_the_reader_keeps_resolving(executor: CeleryExecutor) -> None:
    import asyncio

    from tasktree_dist.distributed.dispatch import InFlight
    from tasktree_dist.distributed.protocol import Completion

    dispatcher = executor._dispatcher()
    future = asyncio.get_running_loop().create_future()
    unit = Unit(run_id="x", execution_id="x:1", tree="T", fingerprint="f", snapshot="s",
                reply_to=dispatcher.reply_key, queue="q")
    dispatcher.inflight["x:1"] = InFlight(unit, b"null", future)
    await dispatcher.redis.rpush(dispatcher.reply_key, b"not json", b'{"execution_id": 3}')
    answer = Completion(execution_id="x:1", status="OK", data=7).model_dump_json()
    await dispatcher.redis.rpush(dispatcher.reply_key, answer)
    dispatcher.ensure_tasks()
    completion = await asyncio.wait_for(future, 10)
    assert completion.status == "OK" and completion.data == 7


async def test_snapshots_live_as_long_as_the_units_that_need_them(fleet: dict[str, Any]) -> None:
    """A fan-out running far longer than the snapshot TTL: each unit's snapshot is stored when it is sent."""
    settings = fleet["settings"].model_copy(update={"snapshot_ttl": 1})
    executor = CeleryExecutor(fleet["app"], settings=settings)
    try:
        result, _ = await run(T.SlowFan, T.Fan(count=30, seconds=0.15), executor)
    finally:
        await executor.aclose()
    assert result == Result.OK([f"D{i}" for i in range(30)])


async def test_a_wide_gather_goes_out_in_bounded_messages(fleet: dict[str, Any]) -> None:
    from tasktree_dist.distributed.dispatch import MESSAGE_MAX_UNITS

    settings = fleet["settings"].model_copy(update={"batch_size": 100_000})
    executor = CeleryExecutor(fleet["app"], settings=settings)
    sizes: list[int] = []
    publish = executor._publish
    executor._publish = lambda units: (sizes.append(len(units)), publish(units))[1]  # type: ignore[method-assign]
    try:
        result, _ = await run(T.WideFan, T.Fan(count=9000), executor)
    finally:
        await executor.aclose()
    assert result.status is Status.OK and len(result.data) == 9000 and result.data[8999] == "d8999"
    assert max(sizes) <= MESSAGE_MAX_UNITS and sum(sizes) == 9000


def test_placement_is_a_property_of_the_built_tree_not_of_its_id() -> None:
    import gc

    from tasktree_dist.distributed.executor import LOCAL, REMOTE

    executor = CeleryExecutor.__new__(CeleryExecutor)
    executor.queue = "tasktree"
    for i in range(40):  # freed trees' ids come back (a cache keyed by id() would answer for the wrong node)
        local = i % 2 == 0
        tree = Tree[T.Board](f"PlacementProbe{i % 3}")
        tree = (tree.Local()._().Function(T.incr) if local else tree.Sequence()._().Function(T.incr)).End()
        function = next(node for node in tree.nodes.values() if node.KIND == "Function")
        assert executor.placement(function)[0] == (LOCAL if local else REMOTE)
        del tree, function
        gc.collect()


def test_registering_a_tree_again_replaces_the_old_one() -> None:
    import gc
    import weakref

    from tasktree_dist.core.registry import registered_trees

    before = len(registered_trees())
    refs = []
    for _ in range(50):
        tree = Tree[T.Board]("RebuiltEachTime").Sequence()._().Function(T.incr).End()
        refs.append(weakref.ref(tree))
    latest = tree  # held, as a module holds the trees it builds
    gc.collect()
    assert len(registered_trees()) == before + 1 and registered_trees()["RebuiltEachTime"] is latest
    assert sum(ref() is not None for ref in refs) == 1  # only the latest is kept
    for i in range(50):  # trees built per request under fresh names go when their holders drop them
        Tree[T.Board](f"PerRequest{i}").Sequence()._().Function(T.incr).End()
    gc.collect()
    assert not [name for name in registered_trees() if name.startswith("PerRequest")]
