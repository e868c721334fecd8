"""Progress events of fan-outs (Gather, Parallel) for long runs, and the rich progress display."""

from __future__ import annotations

import io
from dataclasses import dataclass

from rich.console import Console

from tasktree_dist import Context, ProgressEvent, Result, Status, Tree, rich_progress
from tests.helpers import make_run


@dataclass
class Doc:
    i: int


Child = (
    Tree[Doc]("ProgressChild")
    .Sequence()
    ._().Function(lambda b: Result.FAIL(b.i) if b.i % 3 == 2 else Result.OK(b.i))
    .End()
)
Batch = Tree[list[Doc]]("ProgressBatch").Gather(lambda docs: ([Child] * len(docs), docs), concurrency_limit=2).End()
Both = (
    Tree[list[Doc]]("ProgressParallel")
    .Parallel(concurrency_limit=2)
    ._().Function(lambda: Result.OK(1))
    ._().Function(lambda: Result.FAIL(2))
    .End()
)
run = make_run(list)


async def test_gather_reports_each_finished_tree_and_the_failures() -> None:
    events: list[ProgressEvent] = []
    result, _ = await run(Batch, [Doc(i) for i in range(6)], Context(on_progress=events.append))
    assert result.status is Status.FAIL  # trees 2 and 5 fail
    assert [e.done for e in events] == list(range(7)) and {e.total for e in events} == {6}
    assert events[-1].failed == 2 and events[-1].finished and not events[-2].finished
    assert {e.node for e in events} == {"ProgressBatch/Gather"} and len({e.run for e in events}) == 1


async def test_parallel_reports_its_children_and_each_run_separately() -> None:
    events: list[ProgressEvent] = []
    context = Context(on_progress=events.append)
    await run(Both, [], context)
    await run(Both, [], context)
    runs = sorted({e.run for e in events})
    assert len(runs) == 2
    for run_number in runs:
        mine = [e for e in events if e.run == run_number]
        assert [e.done for e in mine] == [0, 1, 2] and mine[-1].failed == 1 and mine[-1].node.endswith("/Parallel")


async def test_a_broken_progress_callback_does_not_break_the_run() -> None:
    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("display gone")

    result, _ = await run(Batch, [Doc(0), Doc(1)], Context(on_progress=broken))
    assert result.status is Status.OK


async def test_rich_progress_draws_a_bar_per_fan_out() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    with rich_progress(console=console) as on_progress:
        await run(Batch, [Doc(i) for i in range(6)], Context(on_progress=on_progress))
    text = out.getvalue()
    assert "ProgressBatch/Gather" in text and "6/6" in text and "2 failed" in text
