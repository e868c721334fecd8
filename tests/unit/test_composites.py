"""Composite nodes: Sequence, Selector, Parallel, Gather, RandomSelector, If/Else."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from tasktree_dist import Context, Function, Result, Status, TraceNode, Tree
from tests.helpers import make_run, node, step


@dataclass
class BB:
    value: int = 0
    flag: bool = True
    events: list[Any] = field(default_factory=list)
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0])


run = make_run(BB)


# -- Sequence -------------------------------------------------------------------------------------------------


async def test_sequence_all_ok_returns_last_data() -> None:
    bb = BB()
    tree = Tree().Sequence()._().Function(step("a"))._().Function(step("b"))._().Function(step("c")).End()
    assert (await run(tree, bb))[0] == Result.OK("c")
    assert bb.events == ["a", "b", "c"]


async def test_sequence_stops_at_first_fail_with_last_successful_data() -> None:
    bb = BB()
    tree = (
        Tree("CompSeqFail")
        .Sequence()
        ._().Function(step("a"))
        ._().Function(step("bad", Result.FAIL("why")))
        ._().Function(step("c"))
        .End()
    )
    result, context = await run(tree, bb)
    assert result == Result.FAIL("a")  # tinytasktree: FAIL(data of the last OK child)
    assert bb.events == ["a", "bad"]
    assert list(node(context, "Sequence")["children"]) == ["Function(a)", "Function(bad)"]

    first_fails = Tree().Sequence()._().Failure()._().Function(step("never")).End()
    assert (await run(first_fails, bb))[0] == Result.FAIL(None)
    assert "never" not in bb.events


async def test_empty_sequence_and_selector_are_ok_none() -> None:
    assert (await run(Tree().Sequence().End()))[0] == Result.OK(None)
    assert (await run(Tree().Selector().End()))[0] == Result.OK(None)


# -- Selector -------------------------------------------------------------------------------------------------


async def test_selector_returns_first_ok() -> None:
    bb = BB()
    tree = (
        Tree()
        .Selector()
        ._().Failure()
        ._().Function(step("f", Result.FAIL("f")))
        ._().Function(step("ok", Result.OK("winner")))
        ._().Function(step("never"))
        .End()
    )
    assert (await run(tree, bb))[0] == Result.OK("winner")
    assert bb.events == ["f", "ok"]


async def test_selector_fails_when_no_child_succeeds() -> None:
    bb = BB()
    tree = Tree().Selector()._().Failure()._().Function(step("f", Result.FAIL("last fail data"))).End()
    assert (await run(tree, bb))[0] == Result.FAIL(None)
    assert bb.events == ["f"]


# -- Parallel -------------------------------------------------------------------------------------------------


class Gate:
    """Counts concurrently running children; children wait at the gate until the test opens it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.max_running = 0
        self.done = 0
        self.full = asyncio.Event()
        self.open = asyncio.Event()

    async def enter(self) -> None:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        if self.running >= self.limit:
            self.full.set()
        await self.open.wait()
        self.running -= 1
        self.done += 1

    async def drive(self, run_coro: Any) -> Any:
        task = asyncio.ensure_future(run_coro)
        await asyncio.wait_for(self.full.wait(), 5)
        for _ in range(20):  # give any child that should not start a chance to start
            await asyncio.sleep(0)
        assert self.running == self.limit
        self.open.set()
        return await asyncio.wait_for(task, 5)


@pytest.mark.parametrize(("limit", "children"), [(1, 3), (2, 6), (4, 5)])
async def test_parallel_respects_concurrency_limit(limit: int, children: int) -> None:
    gate = Gate(limit)

    async def work() -> str:
        await gate.enter()
        return "ok"

    tree = Tree().Parallel(concurrency_limit=limit)
    for _ in range(children):
        tree._().Function(work)
    tree.End()
    result, context = await gate.drive(run(tree))
    assert result == Result.OK(None)
    assert gate.max_running == limit
    assert gate.done == children
    par = node(context, "Parallel")
    assert par["attributes"]["concurrency_limit"] == limit
    assert len(par["children"]) == children
    assert all(child["result"]["status"] == "OK" for child in par["children"].values())


async def test_parallel_default_concurrency_limit_is_three() -> None:
    gate = Gate(3)

    async def work() -> None:
        await gate.enter()

    tree = Tree().Parallel()
    for _ in range(5):
        tree._().Function(work)
    tree.End()
    result, _ = await gate.drive(run(tree))
    assert result == Result.OK(None)
    assert gate.max_running == 3


async def test_parallel_runs_children_concurrently() -> None:
    # Each child waits for the other: this only completes if both run at the same time.
    first, second = asyncio.Event(), asyncio.Event()

    async def a() -> str:
        first.set()
        await second.wait()
        return "a"

    async def b() -> str:
        second.set()
        await first.wait()
        return "b"

    tree = Tree().Parallel(concurrency_limit=2)._().Function(a)._().Function(b).End()
    result, _ = await asyncio.wait_for(run(tree), 5)
    assert result == Result.OK(None)


async def test_parallel_one_fail_fails_but_all_children_run() -> None:
    bb = BB()
    tree = (
        Tree("CompParFail")
        .Parallel()
        ._().Function(step("a"))
        ._().Function(step("bad", Result.FAIL("x")))
        ._().Function(step("c"))
        .End()
    )
    result, context = await run(tree, bb)
    assert result == Result.FAIL(None)
    assert sorted(bb.events) == ["a", "bad", "c"]
    assert node(context, "Parallel", "Function(bad)")["result"] == {"status": "FAIL", "data": "x"}


async def test_parallel_empty_is_ok() -> None:
    assert (await run(Tree().Parallel().End()))[0] == Result.OK(None)


# -- Gather ---------------------------------------------------------------------------------------------------


@dataclass
class Item:
    x: int
    seen: list[str] = field(default_factory=list)


async def test_gather_returns_data_in_tree_order_when_completion_order_differs() -> None:
    finished: list[int] = []
    second_done = asyncio.Event()

    async def work(b: Item) -> int:
        if b.x == 0:
            await second_done.wait()  # tree 0 finishes only after tree 1
        finished.append(b.x)
        if b.x == 1:
            second_done.set()
        b.seen.append("ran")
        return b.x * 10

    sub = Tree[Item]("CompGatherSub").Function(work).End()
    items = [Item(0), Item(1), Item(2)]
    tree = Tree[BB]("CompGather").Gather(lambda b: ([sub] * 3, items)).End()
    result, context = await asyncio.wait_for(run(tree), 5)
    assert result == Result.OK([0, 10, 20])
    assert finished.index(1) < finished.index(0)
    assert all(item.seen == ["ran"] for item in items)  # each tree ran on its own blackboard
    names = list(node(context, "Gather")["children"])
    assert names == ["0_Tree(CompGatherSub)", "1_Tree(CompGatherSub)", "2_Tree(CompGatherSub)"]
    assert node(context, "Gather", "1_Tree(CompGatherSub)")["kind"] == "Tree"
    assert list(node(context, "Gather", "1_Tree(CompGatherSub)")["children"]) == ["Function(work)"]


async def test_gather_each_tree_sees_its_own_blackboard() -> None:
    def read(b: Item, tracer: TraceNode, context: Context) -> int:
        assert context.current_blackboard(Item) is b
        return b.x

    sub_a = Tree[Item]("CompGatherA").Function(read).End()
    sub_b = Tree[Item]("CompGatherB").Function(lambda b: -b.x).End()
    parent_bb = BB(value=99)
    tree = Tree[BB]().Sequence()._().Gather(lambda b: ([sub_a, sub_b], [Item(3), Item(4)]))._().Function(
        lambda b: b.value
    ).End()
    result, context = await run(tree, parent_bb)
    assert result == Result.OK(99)
    assert node(context, "Sequence", "Gather")["result"]["status"] == "OK"
    assert context._last_result == Result.OK(99)


async def test_gather_fail_keeps_data_list() -> None:
    sub = Tree[Item]("CompGatherFail").Function(lambda b: Result.FAIL(b.x) if b.x == 2 else b.x).End()
    result, _ = await run(Tree().Gather(lambda b: ([sub, sub, sub], [Item(1), Item(2), Item(3)])).End())
    assert result == Result.FAIL([1, 2, 3])


async def test_gather_length_mismatch_fails() -> None:
    sub = Tree[Item]("CompGatherMismatch").Function(lambda b: b.x).End()
    result, context = await run(Tree("CompGatherMM").Gather(lambda b: ([sub, sub], [Item(1)])).End())
    assert result.status is Status.FAIL
    gather = node(context, "Gather")
    assert gather["children"] == {}
    assert "2 trees but 1 blackboards" in gather["attributes"]["error"]


async def test_gather_empty_is_ok_empty_list() -> None:
    assert (await run(Tree().Gather(lambda b: ([], [])).End()))[0] == Result.OK([])


async def test_gather_respects_concurrency_limit() -> None:
    gate = Gate(2)

    async def work(b: Item) -> int:
        await gate.enter()
        return b.x

    sub = Tree[Item]("CompGatherLimit").Function(work).End()
    tree = Tree().Gather(lambda b: ([sub] * 5, [Item(i) for i in range(5)]), concurrency_limit=2).End()
    result, _ = await gate.drive(run(tree))
    assert result == Result.OK([0, 1, 2, 3, 4])
    assert gate.max_running == 2


async def test_gather_default_concurrency_limit_is_three() -> None:
    gate = Gate(3)

    async def work(b: Item) -> int:
        await gate.enter()
        return b.x

    sub = Tree[Item]("CompGatherDefault").Function(work).End()
    result, _ = await gate.drive(run(Tree().Gather(lambda b: ([sub] * 6, [Item(i) for i in range(6)])).End()))
    assert result == Result.OK(list(range(6)))
    assert gate.max_running == 3


# -- RandomSelector -------------------------------------------------------------------------------------------


def first_tried(bb: BB) -> list[str]:
    return [e for e in bb.events if e in ("light", "heavy")][:1]


async def test_random_selector_weights_decide_the_order() -> None:
    random.seed(20240601)
    tree = (
        Tree("CompRandW")
        .RandomSelector(weights=[1e-9, 1e9])
        ._().Function(step("light", Result.FAIL("light")))
        ._().Function(step("heavy", Result.FAIL("heavy")))
        .End()
    )
    firsts = []
    for _ in range(200):
        bb = BB()
        result, context = await run(tree, bb)
        assert result == Result.FAIL(None)  # both failed
        assert sorted(bb.events) == ["heavy", "light"]
        firsts.append(bb.events[0])
    assert firsts.count("heavy") >= 198
    logs = node(context, "RandomSelector")["logs"]
    assert any(line.endswith("[info] : shuffled children order: [1, 0]") for line in logs)


async def test_random_selector_weights_factory() -> None:
    random.seed(7)
    tree = (
        Tree()
        .RandomSelector(weights=lambda b: b.weights)
        ._().Function(step("light", Result.FAIL(None)))
        ._().Function(step("heavy", Result.FAIL(None)))
        .End()
    )
    firsts = []
    for weights in ([1e-9, 1e9], [1e9, 1e-9]):
        for _ in range(100):
            bb = BB(weights=weights)
            await run(tree, bb)
            firsts.append((weights[0] > 1, bb.events[0]))
    assert sum(1 for heavy_first, f in firsts if (f == "light") == heavy_first) >= 198


async def test_random_selector_returns_first_ok_and_stops() -> None:
    random.seed(1)
    bb = BB()
    tree = (
        Tree()
        .RandomSelector(weights=[1e9, 1e-9])
        ._().Function(step("heavy", Result.OK("won")))
        ._().Function(step("light"))
        .End()
    )
    assert (await run(tree, bb))[0] == Result.OK("won")
    assert bb.events == ["heavy"]


async def test_random_selector_without_weights_uses_both_orders() -> None:
    random.seed(3)
    tree = Tree().RandomSelector()._().Function(step("light", Result.FAIL()))._().Function(
        step("heavy", Result.FAIL())
    ).End()
    firsts = set()
    for _ in range(50):
        bb = BB()
        await run(tree, bb)
        firsts.add(bb.events[0])
    assert firsts == {"light", "heavy"}


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0], [1.0, 0.0], [1.0, -1.0]])
async def test_random_selector_bad_factory_weights_fail(weights: list[float]) -> None:
    bb = BB(weights=weights)
    tree = (
        Tree("CompRandBad")
        .RandomSelector(weights=lambda b: b.weights)
        ._().Function(step("light"))
        ._().Function(step("heavy"))
        .End()
    )
    result, context = await run(tree, bb)
    assert result == Result.FAIL(None)
    assert bb.events == []
    assert "weights" in node(context, "RandomSelector")["attributes"]["error"]


async def test_random_selector_empty_is_ok() -> None:
    assert (await run(Tree().RandomSelector().End()))[0] == Result.OK(None)


# -- If / Else ------------------------------------------------------------------------------------------------


async def async_cond(b: BB) -> bool:
    return b.flag


def traced_cond(b: BB, tracer: TraceNode) -> bool:
    tracer.update_attributes(cond_checked=True)
    return b.flag


@pytest.mark.parametrize("cond", ["flag", lambda b: b.flag, async_cond, traced_cond, lambda: True])
async def test_if_true_runs_the_first_child(cond: Any) -> None:
    bb = BB(flag=True)
    tree = Tree().If(cond)._().Function(step("then"))._().Else()._()._().Function(step("else")).End()
    assert (await run(tree, bb))[0] == Result.OK("then")
    assert bb.events == ["then"]


@pytest.mark.parametrize("cond", ["flag", lambda b: b.flag, async_cond, traced_cond])
async def test_if_false_runs_else(cond: Any) -> None:
    bb = BB(flag=False)
    tree = Tree("CompIfElse").If(cond)._().Function(step("then"))._().Else()._()._().Function(step("else")).End()
    result, context = await run(tree, bb)
    assert result == Result.OK("else")
    assert bb.events == ["else"]
    if_node = next(iter(node(context)["children"].values()))
    assert if_node["kind"] == "If"
    assert list(if_node["children"]) == ["Else"]
    assert list(if_node["children"]["Else"]["children"]) == ["Function(else)"]
    assert any(line.endswith("condition: false") for line in if_node["logs"])


async def test_if_false_without_else_is_ok_none() -> None:
    bb = BB(flag=False)
    tree = Tree("CompIfNoElse").If("flag")._().Function(step("then", Result.FAIL("x"))).End()
    result, context = await run(tree, bb)
    assert result == Result.OK(None)
    assert bb.events == []
    assert node(context, "If(b.flag)")["children"] == {}


async def test_if_plain_second_child_acts_as_else() -> None:
    bb = BB(flag=False)
    tree = Tree().If("flag")._().Function(step("then"))._().Function(step("other", Result.FAIL("o"))).End()
    assert (await run(tree, bb))[0] == Result.FAIL("o")
    assert bb.events == ["other"]


async def test_if_names_come_from_the_condition() -> None:
    def is_ready(b: BB) -> bool:
        return True

    _, context = await run(Tree("CompIfName").If(is_ready)._().TODO().End())
    assert list(node(context)["children"]) == ["If(is_ready)"]


async def test_else_result_passes_through_status() -> None:
    bb = BB(flag=False)
    tree = Tree().If("flag")._().TODO()._().Else()._()._().Failure().End()
    assert (await run(tree, bb))[0] == Result.FAIL(None)


async def test_prebuilt_function_nodes_in_if() -> None:
    from tasktree_dist import Else, If

    cond = If("flag")
    cond.append_child(Function(step("then")))
    otherwise = Else()
    cond.append_child(otherwise)
    otherwise.append_child(Function(step("else")))
    bb = BB(flag=False)
    tree = Tree().Sequence(children=[cond]).End()
    assert (await run(tree, bb))[0] == Result.OK("else")


async def test_random_selector_in_a_recorded_run_draws_the_same_order_on_replay() -> None:
    """A coordinator replaying a run must take the branches the first one took: the draw is seeded by the run id
    and the node's position in the trace (in-process runs without a run id use the `random` module)."""
    from tasktree_dist import Context, Tree

    tree = Tree("DrawOrder").RandomSelector()
    for i in range(12):
        tree = tree._().Failure(name=f"f{i}")
    built = tree.End()

    async def draw(run_id: str | None) -> str:
        context = Context(run_id=run_id)
        async with context.using_blackboard(None):
            await built(context)
        [selector] = [n for n in context.trace_root().walk() if n.kind == "RandomSelector"]
        return selector.logs[0]

    assert await draw("run-a") == await draw("run-a")
    assert len({await draw(f"run-{i}") for i in range(5)}) > 1
