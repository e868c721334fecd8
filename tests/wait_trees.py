"""Trees the waits tests submit; workers import this module (TASKTREE_IMPORTS=tests.wait_trees).

Each Function that must never run twice counts its runs in Redis (`waitstest:ran:<key>:<step>`), so a test can
prove that a resumed run replays finished work instead of running it again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic

from tasktree_dist import Tree, register_type
from tasktree_dist.core.redis_client import connect

_redis: Any = None


def count(key: str, step: str) -> None:
    global _redis
    if _redis is None:
        _redis = connect(os.environ.get("TASKTREE_REDIS_URL", "redis://127.0.0.1:6379/0"), asynchronous=False)
    name = f"waitstest:ran:{key}:{step}"
    _redis.incr(name)
    _redis.expire(name, 3600)


class Review(pydantic.BaseModel):
    decision: Literal["approve", "reject"]
    note: str = ""


register_type(Review)


@register_type
@pydantic.dataclasses.dataclass
class Doc:
    key: str = ""
    draft: str = ""
    decision: str = ""
    note: str = ""
    published_at: float = 0.0


def write_draft(d: Doc) -> None:
    count(d.key, "draft")
    d.draft = f"draft of {d.key}"


def publish(d: Doc, tracer: Any, context: Any) -> None:
    count(d.key, "publish")
    review = context.last_result.data
    d.decision, d.note = review.decision, review.note
    d.published_at = time.time()


ReviewTree = (
    Tree[Doc]("WaitReview")
    .Sequence()
    ._().Function(write_draft)
    ._().WaitFor("review", schema=Review, prompt=lambda d: f"Publish {d.draft!r}?")
    ._().Function(publish)
    .End()
)


@register_type
@dataclass
class Timed:
    key: str = ""
    got: Any = None


def keep(t: Timed, tracer: Any, context: Any) -> None:
    t.got = context.last_result.data


TimeoutDefaultTree = (
    Tree[Timed]("WaitTimeoutDefault")
    .Sequence()
    ._().WaitFor("never", timeout_s=1.5, default="fallback")
    ._().Function(keep)
    .End()
)

TimeoutFailTree = (
    Tree[Timed]("WaitTimeoutFail")
    .Sequence()
    ._().WaitFor("never", schema={"type": "object"}, timeout_s=1.5)
    ._().Function(keep)
    .End()
)


@register_type
@dataclass
class Item:
    key: str = ""
    i: int = 0
    answer: str = ""


def prepare_item(item: Item) -> None:
    count(f"{item.key}:{item.i}", "prepare")


def keep_answer(item: Item, tracer: Any, context: Any) -> str:
    count(f"{item.key}:{item.i}", "finish")
    item.answer = context.last_result.data["answer"]
    return item.answer


ItemTree = (
    Tree[Item]("WaitItem")
    .Sequence()
    ._().Function(prepare_item)
    ._().WaitFor(lambda item: f"item:{item.i}", schema={"type": "object", "required": ["answer"],
                                                         "properties": {"answer": {"type": "string"}}})
    ._().Function(keep_answer)
    .End()
)


@register_type
@dataclass
class Many:
    key: str = ""
    n: int = 20
    answers: list[str] = field(default_factory=list)


def items(m: Many) -> tuple[list[Any], list[Item]]:
    return [ItemTree] * m.n, [Item(m.key, i) for i in range(m.n)]


GatherTree = (
    Tree[Many]("WaitGather")
    .Sequence()
    ._().Gather(items, concurrency_limit=20)
    .End()
)


@register_type
@dataclass
class Chat:
    key: str = ""
    turn: int = 0
    answers: list[str] = field(default_factory=list)


def ask(c: Chat) -> None:
    count(f"{c.key}:{c.turn}", "ask")


def take_answer(c: Chat, tracer: Any, context: Any) -> None:
    c.answers.append(context.last_result.data)
    c.turn += 1


LoopTree = (
    Tree[Chat]("WaitLoop")
    .While(lambda c: c.turn < 3)
    ._().Sequence()
    ._()._().Function(ask)
    ._()._().WaitFor("answer", schema={"type": "string"}, prompt=lambda c: f"turn {c.turn}")
    ._()._().Function(take_answer)
    .End()
)


@register_type
@dataclass
class Par:
    key: str = ""
    slow_done: bool = False


async def slow(p: Par) -> None:
    import asyncio

    await asyncio.sleep(2.0)  # a branch still working while the other waits
    count(p.key, "slow")
    p.slow_done = True


ParallelTree = (
    Tree[Par]("WaitParallel")
    .Parallel(concurrency_limit=2)
    ._().WaitFor("go")
    ._().Function(slow)
    .End()
)
