"""Context (blackboard stack, tracers, path, last result) and the global spawned-task hooks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tasktree_dist import (
    Context,
    InMemoryCacheStore,
    Result,
    TasktreeProgrammingError,
    TraceNode,
    Tree,
    register_global_hook_after_spawned_task_finish,
    unregister_global_hook_after_spawned_task_finish,
)
from tests.helpers import make_run, node


@dataclass
class BB:
    name: str = "bb"
    events: list[Any] = field(default_factory=list)


@dataclass
class Other:
    x: int = 0


run = make_run(BB)


# -- blackboards ----------------------------------------------------------------------------------------------


async def test_using_blackboard_nests_and_restores() -> None:
    context = Context()
    outer, inner = BB("outer"), BB("inner")
    with pytest.raises(TasktreeProgrammingError, match="No blackboard"):
        context.current_blackboard(BB)
    async with context.using_blackboard(outer):
        assert context.current_blackboard(BB) is outer
        async with context.using_blackboard(inner):
            assert context.current_blackboard(BB) is inner
            result = await Tree().Function(lambda b: b.name).End()(context)
            assert result == Result.OK("inner")
        assert context.current_blackboard(BB) is outer
        assert (await Tree().Function(lambda b: b.name).End()(context)) == Result.OK("outer")
    with pytest.raises(TasktreeProgrammingError, match="No blackboard"):
        context.current_blackboard(BB)


async def test_using_blackboard_pops_on_error() -> None:
    context = Context()
    with pytest.raises(RuntimeError):
        async with context.using_blackboard(BB()):
            raise RuntimeError("x")
    with pytest.raises(TasktreeProgrammingError):
        context.current_blackboard(BB)


async def test_current_blackboard_inside_a_node() -> None:
    seen: list[Any] = []

    def f(b: BB, tracer: TraceNode, context: Context) -> None:
        seen.append(context.current_blackboard(BB))

    bb = BB()
    await run(Tree().Function(f).End(), bb)
    assert seen == [bb]


# -- tracers and path -----------------------------------------------------------------------------------------


async def test_current_and_parent_tracers_and_path() -> None:
    seen: dict[str, Any] = {}

    def f(b: BB, tracer: TraceNode, context: Context) -> None:
        seen["current"] = context.current_tracer()
        seen["tracer"] = tracer
        seen["parents"] = [context.parent_tracer(d).name for d in (1, 2, 3, 4, 10)]
        seen["default"] = context.parent_tracer().name
        seen["path"] = context.current_path()
        with pytest.raises(TasktreeProgrammingError, match="depth"):
            context.parent_tracer(0)
        with pytest.raises(TasktreeProgrammingError):
            context.parent_tracer(-1)
        context.parent_tracer(2).update_attributes(marked_from_leaf=True)

    result, context = await run(Tree("CtxPath").Sequence()._().Function(f).End())
    assert result.is_ok()
    assert seen["current"] is seen["tracer"]
    assert seen["tracer"].name == "Function(f)"
    assert seen["parents"] == ["Sequence", "Tree(CtxPath)", "ROOT", "ROOT", "ROOT"]
    assert seen["default"] == "Sequence"
    assert seen["path"] == ["ROOT", "Tree(CtxPath)", "Sequence", "Function(f)"]
    assert node(context)["attributes"]["marked_from_leaf"] is True
    # outside a run
    assert context.current_path() == []
    assert context.current_tracer() is context.trace_root()
    assert context.trace_root().name == "ROOT"


async def test_current_path_in_parallel_branches_and_gather() -> None:
    paths: list[list[str]] = []

    def record(b: Any, tracer: TraceNode, context: Context) -> None:
        paths.append(list(context.current_path()))

    sub = Tree("CtxPathSub").Function(record).End()
    tree = (
        Tree("CtxPathPar")
        .Parallel()
        ._().Function(record)
        ._().Gather(lambda b: ([sub, sub], [Other(1), Other(2)]))
        .End()
    )
    await run(tree)
    assert sorted(paths) == sorted(
        [
            ["ROOT", "Tree(CtxPathPar)", "Parallel", "Function(record)"],
            ["ROOT", "Tree(CtxPathPar)", "Parallel", "Gather", "0_Tree(CtxPathSub)", "Function(record)"],
            ["ROOT", "Tree(CtxPathPar)", "Parallel", "Gather", "1_Tree(CtxPathSub)", "Function(record)"],
        ]
    )


# -- last result ----------------------------------------------------------------------------------------------


async def test_last_result_is_the_previous_siblings_result() -> None:
    seen: list[Any] = []

    def read(b: BB, tracer: TraceNode, context: Context) -> str:
        seen.append(context._last_result)
        return "read"

    tree = (
        Tree()
        .Sequence()
        ._().Function(lambda: Result.OK("first"))
        ._().Function(read)
        ._().ForceOk()
        ._()._().Function(lambda: Result.FAIL("failed"))
        ._().Function(read)
        .End()
    )
    result, context = await run(tree)
    assert seen == [Result.OK("first"), Result.OK("failed")]  # the ForceOk's result
    assert context._last_result == result == Result.OK("read")
    assert context.last_result == result


async def test_last_result_is_per_branch_in_parallel() -> None:
    seen: dict[str, Any] = {}

    def reader(tag: str) -> Any:
        def read(b: BB, tracer: TraceNode, context: Context) -> str:
            seen[tag] = context._last_result
            return f"read-{tag}"

        read.__name__ = f"read_{tag}"
        return read

    tree = (
        Tree()
        .Sequence()
        ._().Function(lambda: "before")
        ._().Parallel()
        ._()._().Sequence()
        ._()._()._().Function(lambda: "a")
        ._()._()._().Function(reader("a"))
        ._()._().Sequence()
        ._()._()._().Function(lambda: "b")
        ._()._()._().Function(reader("b"))
        ._()._().Function(reader("first"))
        ._().Function(reader("after"))
        .End()
    )
    await run(tree)
    assert seen["a"] == Result.OK("a")
    assert seen["b"] == Result.OK("b")
    assert seen["first"] == Result.OK("before")  # a branch starts with the parent's last result
    assert seen["after"] == Result.OK(None)  # the Parallel's own result


async def test_context_fork_is_independent() -> None:
    context = Context()
    root = context.trace_root()
    async with context.using_blackboard(BB("main")):
        fork = context.fork()
        fork._blackboards.append(BB("fork"))
        assert context.current_blackboard(BB).name == "main"
        assert fork.current_blackboard(BB).name == "fork"
        assert fork.trace_root() is root


# -- hooks ----------------------------------------------------------------------------------------------------


@pytest.fixture
def hook_calls() -> Iterator[list[tuple[Context, TraceNode, Result]]]:
    calls: list[tuple[Context, TraceNode, Result]] = []

    def hook(context: Context, tracer: TraceNode, result: Result) -> None:
        calls.append((context, tracer, result))

    register_global_hook_after_spawned_task_finish(hook)
    try:
        yield calls
    finally:
        unregister_global_hook_after_spawned_task_finish(hook)


async def test_hook_called_once_per_parallel_child(hook_calls: list[Any]) -> None:
    tree = (
        Tree("HookPar")
        .Parallel()
        ._().Function(lambda: "a")
        ._().Function(lambda: Result.FAIL("b"))
        ._().Sequence()
        ._()._().Function(lambda: "c")
        .End()
    )
    main_context = Context()
    result, _ = await run(tree, context=main_context)
    assert result == Result.FAIL(None)
    assert len(hook_calls) == 3
    by_name = {tracer.name: (context, r) for context, tracer, r in hook_calls}
    assert set(by_name) == {"Function(lambda)", "Function(lambda)_1", "Sequence"}
    assert by_name["Function(lambda)"][1] == Result.OK("a")
    assert by_name["Function(lambda)_1"][1] == Result.FAIL("b")
    assert by_name["Sequence"][1] == Result.OK("c")
    assert all(context is not main_context for context, _ in by_name.values())  # each branch's own context
    assert all(tracer.parent.name == "Parallel" for _, tracer, _ in hook_calls)


async def test_hook_not_called_for_sequential_nodes(hook_calls: list[Any]) -> None:
    await run(Tree().Sequence()._().Function(lambda: 1)._().Retry(2)._()._().Failure().End())
    assert hook_calls == []


async def test_hook_called_once_per_gather_tree(hook_calls: list[Any]) -> None:
    sub = Tree[Other]("HookSub").Function(lambda b: b.x).End()
    items = [Other(1), Other(2)]
    result, _ = await run(Tree().Gather(lambda b: ([sub, sub], items)).End())
    assert result == Result.OK([1, 2])
    assert sorted(tracer.name for _, tracer, _ in hook_calls) == ["0_Tree(HookSub)", "1_Tree(HookSub)"]
    for context, tracer, r in hook_calls:
        index = int(tracer.name[0])
        assert context.current_blackboard(Other) is items[index]
        assert r == Result.OK(items[index].x)


async def test_hook_called_for_terminable_main(hook_calls: list[Any]) -> None:
    store = InMemoryCacheStore()
    result, _ = await run(Tree().Terminable(lambda b: "hook:stop", store=store)._().Function(lambda: "main").End())
    assert result == Result.OK("main")
    assert len(hook_calls) == 1
    _, tracer, r = hook_calls[0]
    assert tracer.name == "Terminable"
    assert r == Result.OK("main")


async def test_hook_called_for_cancelled_terminable_main(hook_calls: list[Any]) -> None:
    store = InMemoryCacheStore()
    started = asyncio.Event()

    async def long_job() -> None:
        started.set()
        await asyncio.Event().wait()

    tree = Tree().Terminable(lambda b: "hook:cancel", store=store, monitor_interval_ms=5)._().Function(long_job).End()
    task = asyncio.ensure_future(run(tree))
    await started.wait()
    await store.set("hook:cancel", "1")
    assert (await asyncio.wait_for(task, 5))[0] == Result.FAIL(None)
    assert [(t.name, r) for _, t, r in hook_calls] == [("Terminable", Result.FAIL(None))]


async def test_async_hook_and_raising_hook(hook_calls: list[Any]) -> None:
    async_calls: list[str] = []

    async def async_hook(context: Context, tracer: TraceNode, result: Result) -> None:
        await asyncio.sleep(0)
        async_calls.append(tracer.name)

    def broken_hook(context: Context, tracer: TraceNode, result: Result) -> None:
        raise RuntimeError("hook broke")

    register_global_hook_after_spawned_task_finish(async_hook)
    register_global_hook_after_spawned_task_finish(broken_hook)
    try:
        tree = Tree("HookBroken").Parallel()._().Function(lambda: "a")._().Function(lambda: "b").End()
        result, context = await run(tree)
    finally:
        unregister_global_hook_after_spawned_task_finish(async_hook)
        unregister_global_hook_after_spawned_task_finish(broken_hook)
    assert result == Result.OK(None)
    assert sorted(async_calls) == ["Function(lambda)", "Function(lambda)_1"]
    assert len(hook_calls) == 2  # hooks registered before and after the broken one all run
    for name in ("Function(lambda)", "Function(lambda)_1"):
        branch = node(context, "Parallel", name)
        assert branch["result"]["status"] == "OK"
        assert any(line.endswith("[error] : RuntimeError: hook broke") for line in branch["logs"])


async def test_unregistered_hook_is_not_called() -> None:
    calls: list[Any] = []

    def hook(context: Context, tracer: TraceNode, result: Result) -> None:
        calls.append(tracer.name)

    register_global_hook_after_spawned_task_finish(hook)
    unregister_global_hook_after_spawned_task_finish(hook)
    unregister_global_hook_after_spawned_task_finish(hook)  # a second unregister is harmless
    await run(Tree().Parallel()._().TODO().End())
    assert calls == []


async def test_forward_pushes_a_given_blackboard_for_the_child_as_tinytasktree_custom_nodes_expect() -> None:
    context = Context()
    async with context.using_blackboard("outer"):
        async with context._forward("Child"):
            assert context.current_blackboard() == "outer"
        async with context._forward("Child", "inner"):
            assert context.current_blackboard() == "inner"
        assert context.current_blackboard() == "outer"


async def test_hooks_list_on_the_package_is_the_one_the_engine_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """tinytasktree's tests edit `tinytasktree._GLOBAL_HOOK_AFTER_SPAWNED_TASK_FINISH` in place or rebind it."""
    import tasktree_dist

    calls: list[str] = []
    hooks = tasktree_dist._GLOBAL_HOOK_AFTER_SPAWNED_TASK_FINISH
    hooks.append(lambda context, tracer, result: calls.append(f"appended:{tracer.name}"))
    try:
        await run(Tree().Parallel()._().TODO().End())
    finally:
        hooks.pop()
    assert calls == ["appended:TODO"]

    monkeypatch.setattr(
        tasktree_dist, "_GLOBAL_HOOK_AFTER_SPAWNED_TASK_FINISH", [lambda c, t, r: calls.append("rebound")]
    )
    await run(Tree().Parallel()._().TODO().End())
    assert calls == ["appended:TODO", "rebound"]
    monkeypatch.undo()
    assert tasktree_dist._GLOBAL_HOOK_AFTER_SPAWNED_TASK_FINISH is hooks
