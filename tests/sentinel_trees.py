"""Trees of the Sentinel failover test (imported by its workers): a Gather of many small units, each doubling its
index, so the run's result says whether every unit was applied exactly once."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from tasktree_dist import Tree


@dataclass
class Item:
    index: int = 0
    pause: float = 0.0
    #: A key on the (plain) Redis at $SENTINEL_TEST_GATE_URL this unit waits for: the test opens it after the failover
    gate: str = ""


async def double(b: Item) -> int:
    await asyncio.sleep(b.pause)  # the unit's work: keeps units running while the master fails over
    if b.gate:
        import redis.asyncio as redis

        async with redis.Redis.from_url(os.environ["SENTINEL_TEST_GATE_URL"]) as gate:
            # the key is set by another process: polled, no event can carry it here
            while not await gate.exists(b.gate):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling period, not synchronisation
    return 2 * b.index


ItemTree = Tree[Item]("SentinelItem").Sequence()._().Function(double).End()


@dataclass
class Items:
    count: int = 0
    pause: float = 0.0
    #: Units from this index on wait for `gate` (see Item.gate).
    gated_from: int = 0
    gate: str = ""
    values: list[int] = field(default_factory=list)


def item_children(b: Items) -> tuple[list[Tree[Item]], list[Item]]:
    items = [Item(index, b.pause, b.gate if b.gate and index >= b.gated_from else "") for index in range(b.count)]
    return [ItemTree] * b.count, items


def keep_values(b: Items, values: list[int]) -> None:
    b.values = values


ItemsTree = (
    Tree[Items]("SentinelItems")
    .Sequence()
    ._().Gather(item_children, concurrency_limit=200)
    ._().WriteBlackboard(keep_values)
    .End()
)
