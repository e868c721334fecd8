"""Trees the distributed tests run; workers import this module (TASKTREE_IMPORTS=tests.dist_trees)."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field

from tasktree_dist import Context, RedisStore, Tree, register_type


def here() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@register_type
@dataclass
class Item:
    name: str
    score: float = 0.0


@dataclass
class Board:
    n: int = 0
    log: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)
    where: str = ""
    a: int = 0
    b: int = 0
    scalar: str = ""
    blob: object = None
    calls: int = 0


def incr(b: Board) -> int:
    b.n += 1
    b.where = here()
    return b.n


def add_item(b: Board) -> Item:
    item = Item("x", 1.5)
    b.items.append(item)
    return item


def read_last(b: Board, tracer: object, context: Context) -> str:
    last = context._last_result
    return f"{type(last.data).__name__}:{last.data.name}:{last.data.score}" if last else "none"


Basic = (
    Tree[Board]("DistBasic")
    .Sequence()
    ._().Function(incr)
    ._().Function(add_item)
    ._().Function(read_last)
    ._().WriteBlackboard("scalar")
    .End()
)


def branch(tag: str, value: int, field_name: str):
    def run(b: Board) -> str:
        b.log.append(tag)
        b.tags[tag] = here()
        setattr(b, field_name, value)
        return tag

    run.__name__ = f"branch_{tag}"
    return run


ParallelMerge = (
    Tree[Board]("DistParallelMerge")
    .Parallel(concurrency_limit=4)
    ._().Function(branch("p", 1, "a"))
    ._().Function(branch("q", 2, "b"))
    .End()
)

ParallelConflict = (
    Tree[Board]("DistParallelConflict")
    .Parallel()
    ._().Function(lambda b: setattr(b, "scalar", "left"))
    ._().Function(lambda b: setattr(b, "scalar", "right"))
    .End()
)


@dataclass
class Doc:
    text: str
    upper: str = ""
    where: str = ""


async def shout(d: Doc) -> str:
    await asyncio.sleep(0.01)
    d.upper = d.text.upper()
    d.where = here()
    return d.upper


DocTree = Tree[Doc]("DistDoc").Sequence()._().Function(shout).End()


def docs(b: Board):
    return [DocTree] * 8, [Doc(f"doc {i}") for i in range(8)]


GatherDocs = Tree[Board]("DistGather").Gather(docs, concurrency_limit=8).End()


SlowTree = (
    Tree[Board]("DistSlow")
    .Timeout(0.5)
    ._().Function(lambda: asyncio.sleep(30), name="sleepy")
    ._().Function(lambda: "fallback", name="fallback")
    .End()
)

FailingTree = Tree[Board]("DistFailing").Sequence()._().Function(lambda: 1 / 0, name="divide").End()

REDIS_STORE = RedisStore(os.environ.get("TASKTREE_REDIS_URL", "redis://127.0.0.1:6379/1"))


def expensive(b: Board) -> str:
    b.calls += 1
    return f"computed by {here()}"


CachedTree = (
    Tree[Board]("DistCached")
    .Remote()
    ._().Cacher(key_func=lambda b: f"test:cache:{b.scalar}", store=REDIS_STORE, expiration=60)
    ._()._().Function(expensive)
    .End()
)

LocalTree = (
    Tree[Board]("DistLocal")
    .Local()
    ._().Function(incr)
    .End()
)


def version() -> int:
    return int(os.environ.get("DIST_TREE_VERSION", "1"))


Versioned = Tree[Board]("DistVersioned").Sequence()._().Function(incr, name=f"v{version()}").End()


def cached_on(queue: str) -> Tree[Board]:
    return (
        Tree[Board](f"DistCachedOn_{queue}")
        .Remote(queue=queue)
        ._().Cacher(key_func=lambda b: f"test:xcache:{b.scalar}", store=REDIS_STORE, expiration=60)
        ._()._().Function(expensive)
        .End()
    )


CachedOnW1 = cached_on("w1")
CachedOnW2 = cached_on("w2")

ReturnsItem = Tree[Board]("DistReturnsItem").Sequence()._().Function(add_item).End()


def many_docs(b: Board):
    return [DocTree] * 16, [Doc(f"doc {i}") for i in range(16)]


GatherMany = Tree[Board]("DistGatherMany").Gather(many_docs, concurrency_limit=16).End()


async def hang_on_a_doomed_worker(b: Board) -> str:
    """Never returns on a worker started with TASKTREE_TEST_DOOMED=1 (the lease test kills it); returns elsewhere."""
    if os.environ.get("TASKTREE_TEST_DOOMED"):
        await asyncio.Event().wait()
    b.where = here()
    return "survived"


Doomed = Tree[Board]("DistDoomed").Remote(queue="doomed")._().Function(hang_on_a_doomed_worker).End()


def noop(d: Doc) -> str:
    return d.text


NoopDoc = Tree[Doc]("DistNoopDoc").Function(noop).End()


@dataclass
class Fan:
    count: int = 0
    seconds: float = 0.0
    results: list[str] = field(default_factory=list)


async def slow_upper(d: Doc) -> str:
    await asyncio.sleep(float(d.where or 0))
    return d.text.upper()


SlowDoc = Tree[Doc]("DistSlowDoc").Function(slow_upper).End()


def slow_docs(b: Fan):
    return [SlowDoc] * b.count, [Doc(f"d{i}", where=str(b.seconds)) for i in range(b.count)]


def noop_docs(b: Fan):
    return [NoopDoc] * b.count, [Doc(f"d{i}") for i in range(b.count)]


#: A fan-out that runs longer than a short snapshot TTL (3 at a time).
SlowFan = Tree[Fan]("DistSlowFan").Gather(slow_docs, concurrency_limit=3).End()
#: Thousands of trivial units at once (messages must stay bounded whatever the batch size).
WideFan = Tree[Fan]("DistWideFan").Gather(noop_docs, concurrency_limit=10_000).End()


#: Lua: one more unit running; keeps the most ever running at once.
_RUNNING_UP = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 600)
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n, 'EX', 600) end
return n
"""
GATED_RUNNING, GATED_MOST, GATED_GO = "test:gated:running", "test:gated:most", "test:gated:go"


async def held_until_go(d: Doc) -> str:
    """Counts itself running in Redis (and the most ever running at once), then holds until the test sets the go
    key: every unit delivered before that is running or waiting at the same moment."""
    import time

    import redis.asyncio as redis

    client = redis.Redis.from_url(os.environ["TASKTREE_REDIS_URL"])
    try:
        await client.eval(_RUNNING_UP, 2, GATED_RUNNING, GATED_MOST)
        deadline = time.monotonic() + 60
        while not await client.exists(GATED_GO):
            if time.monotonic() > deadline:
                raise TimeoutError("the test never said go")
            await asyncio.sleep(0.02)  # polling the test's go key, with a deadline
        await client.decr(GATED_RUNNING)
    finally:
        await client.aclose()
    return d.text.upper()


HeldDoc = Tree[Doc]("DistHeldDoc").Function(held_until_go).End()

#: More units than its limit: units beyond the limit wait on the workers for a slot (distributed.gates).
GatedFan = Tree[Fan]("DistGatedFan").Gather(
    lambda b: ([HeldDoc] * b.count, [Doc(f"d{i}") for i in range(b.count)]), concurrency_limit=4).End()
