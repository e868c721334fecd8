"""Trees of the "nothing fails silently" tests (tests/fleet/test_fail_loud.py); the capable worker imports this
module (TASKTREE_IMPORTS=tests.run_trees,tests.loud_trees), the other worker imports nothing."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from tasktree_dist import Tree, register_type


@register_type
@dataclass
class Item:
    n: int = 0
    out: str = ""


def check(item: Item) -> str:
    if item.n % 2:
        raise ValueError(f"odd item {item.n}")
    item.out = f"even {item.n}"
    return item.out


ItemTree = Tree[Item]("LoudItem").Function(check).End()


@register_type
@dataclass
class Items:
    count: int = 4
    results: list[str] = field(default_factory=list)


def items(b: Items) -> tuple[list[Tree[Item]], list[Item]]:
    return [ItemTree] * b.count, [Item(n=i) for i in range(b.count)]


#: A Gather whose odd children FAIL: its messages and its run are failures Flower must show.
HalfBroken = Tree[Items]("LoudHalfBroken").Gather(items, concurrency_limit=50).End()


@register_type
@dataclass
class Parcel:
    """A type only this module registers: a process that does not import it reads its runs' blackboards as JSON."""

    label: str = ""
    weights: list[float] = field(default_factory=list)
    done: bool = False


def seal(p: Parcel) -> str:
    p.done = True
    return p.label


ParcelTree = Tree[Parcel]("LoudParcel").Function(seal).End()


@register_type
@dataclass
class Nap:
    seconds: float = 0.0


def block(n: Nap) -> str:
    """Blocks its worker's event loop (time.sleep in an async worker) where TASKTREE_TEST_BLOCK_LOOP=1."""
    if os.environ.get("TASKTREE_TEST_BLOCK_LOOP") == "1":
        time.sleep(n.seconds)
    return "woke"


async def block_loop(n: Nap) -> str:
    return block(n)


BlockerTree = Tree[Nap]("LoudBlocker").Function(block_loop).End()
