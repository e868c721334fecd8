"""The worker side of fan-out slot gates (distributed.gates) against a stand-in for its script calls: who asks, who
gets a slot, a freed slot handed to the next unit waiting here, and a refused script FAILing the waiting units."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from redis.exceptions import ResponseError

from tasktree_dist.distributed.gates import GateError, SlotGates
from tasktree_dist.distributed.protocol import Unit


class Slots:
    """A gate's set in memory, answering CLAIM as the script does (a first ask finds a slot it already holds)."""

    def __init__(self, refuse: Exception | None = None) -> None:
        self.held: dict[str, set[str]] = {}
        self.asks: list[list[tuple[str, list[str], int]]] = []
        self.refuse = refuse

    async def claim(self, asks: Sequence[tuple[str, int, Sequence[str], int]], ttl: int) -> list[bool]:
        self.asks.append([(key, list(ids), again) for key, _, ids, again in asks])
        if self.refuse is not None:
            raise self.refuse
        out = []
        for key, limit, ids, again in asks:
            held = self.held.setdefault(key, set())
            for n, execution_id in enumerate(ids):
                if n >= again and execution_id in held:
                    out.append(True)
                elif len(held) < limit:
                    held.add(execution_id)
                    out.append(True)
                else:
                    out.append(False)
        return out

    async def release(self, gate: str, execution_id: str) -> None:
        self.held.get(gate, set()).discard(execution_id)


def unit(n: int, limit: int = 2) -> Unit:
    return Unit(run_id="r1", execution_id=f"r1:e{n}", tree="T", fingerprint="f", snapshot="s",
                reply_to="tasktree:reply:c1", queue="q", gate="g", gate_limit=limit)


async def test_units_beyond_the_limit_wait_and_a_freed_slot_goes_to_the_oldest_waiting_here() -> None:
    slots = Slots()
    gates = SlotGates(slots, ttl=60, period=0.01)  # type: ignore[arg-type]
    tasks = [asyncio.create_task(gates.take(unit(n))) for n in range(4)]
    await asyncio.wait(tasks[:2], timeout=5)
    assert [t.done() for t in tasks] == [True, True, False, False] and gates.waiting == 2
    assert slots.asks[0] == [("tasktree:{r1}:gate:g", ["r1:e0", "r1:e1", "r1:e2", "r1:e3"], 0)]  # one call
    assert gates.hand_on(unit(0)) == "r1:e2"  # the slot of e0 goes to e2 here, without asking Redis
    await asyncio.wait_for(tasks[2], 5)
    assert not tasks[3].done() and gates.hand_on(unit(3)) == ""  # e3 holds nothing: nothing to hand on
    slots.held["tasktree:{r1}:gate:g"] = {"r1:e1"}  # e2's hand-over and e0's release, as the completion records
    await asyncio.wait_for(tasks[3], 5)  # a poll takes the free slot
    assert gates.waiting == 0 and all(again == 1 for *_, again in slots.asks[-1])  # asked again, not first


async def test_a_unit_stopped_while_it_waits_gives_up_its_place() -> None:
    slots = Slots()
    gates = SlotGates(slots, ttl=60, period=0.01)  # type: ignore[arg-type]
    first = [asyncio.create_task(gates.take(unit(n, limit=1))) for n in range(3)]
    await asyncio.wait_for(first[0], 5)
    first[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await first[1]
    assert gates.hand_on(unit(0, limit=1)) == "r1:e2"  # the stopped one is skipped
    await asyncio.wait_for(first[2], 5)


async def test_a_refused_script_fails_the_waiting_units_naming_the_gate() -> None:
    gates = SlotGates(Slots(refuse=ResponseError("CROSSSLOT")), ttl=60, period=0.01)  # type: ignore[arg-type]
    with pytest.raises(GateError, match=r"gate tasktree:\{r1\}:gate:g failed: ResponseError: CROSSSLOT"):
        await asyncio.wait_for(gates.take(unit(0)), 5)
    assert gates.waiting == 0


def test_a_gate_name_cannot_reach_outside_its_run() -> None:
    with pytest.raises(ValueError, match="invalid gate"):
        unit(0).model_validate({**unit(0).model_dump(), "gate": "x}:other"})

