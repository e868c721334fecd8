"""core.errors.UnitParks (batch mode's BatchPending): no node turns it into a FAIL, and a fan-out lets every other
branch run before it ends the same way, so all the batched calls of a unit join their batches in one round."""

from __future__ import annotations

from typing import Any

import pytest

from tasktree_dist import Context, Tree
from tasktree_dist.core.errors import UnitParks

ran: list[int] = []


def step(b: dict[str, Any]) -> int:
    ran.append(b["i"])
    if b["i"] % 2 == 0:
        raise UnitParks()
    return b["i"]


Child = Tree("UnitParksChild").Function(step).End()
Guarded = Tree("UnitParksGuarded").Selector()._().Subtree(Child)._().Function(lambda b: "fallback").End()
Fanned = Tree("UnitParksGather").Gather(lambda b: ([Guarded] * 5, [{"i": i} for i in range(5)]),
                                        concurrency_limit=1).End()


async def test_a_parked_branch_is_no_fail_and_the_other_branches_run_first() -> None:
    ran.clear()
    context = Context()
    with pytest.raises(UnitParks):
        async with context.using_blackboard({}):
            await Fanned(context)
    assert ran == [0, 1, 2, 3, 4]  # one at a time: those after a parked one still ran
    fallbacks = [n for n in context.trace_root().walk() if n.kind == "Function" and n.result is not None
                 and n.result.data == "fallback"]
    assert not fallbacks  # the Selector never saw a FAIL to fall back from
