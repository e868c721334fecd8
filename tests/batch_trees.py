"""Trees the batch-parking fleet tests submit (tests/fleet/test_batch_parking.py); workers import this module
(TASKTREE_IMPORTS=tests.batch_trees). BATCH_FAKE_URL names the fake LLM server the test started before them.

The tool and the step after the LLM count their runs in Redis (`batchpark:ran:<key>:<step>`): a parked call's unit
ends before them, so each must run exactly once, in the unit that continues the node.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from tasktree_dist import LLMModel, Tool, Tree, register_type

FAKE_URL = os.environ.get("BATCH_FAKE_URL", "http://127.0.0.1:9/v1")
PRICES = {"input_price_per_m": 1.0, "output_price_per_m": 2.0}
MODELS = {
    "live": LLMModel("park-batch", batch=True, **PRICES),
    "fail": LLMModel("park-batch", batch=True, batch_fallback="fail", **PRICES),
}
_redis: Any = None


def _client() -> Any:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ.get("TASKTREE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    return _redis


def count(key: str, step: str) -> None:
    name = f"batchpark:ran:{key}:{step}"
    _client().incr(name)
    _client().expire(name, 3600)


@register_type
@dataclass
class Item:
    key: str = ""
    i: int = 0
    tool: bool = False
    fallback: str = "live"
    output: str = ""
    noted: str = ""


class Note(Tool[Item]):
    NAME = "note"
    DESCRIPTION = "Note a text down."
    SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}

    async def execute(self, blackboard: Item, arguments: dict[str, Any], context: Any, tracer: Any) -> Any:
        count(f"{blackboard.key}:{blackboard.i}", "tool")
        blackboard.noted = arguments["text"]
        return "noted"


def messages(b: Item) -> list[dict[str, Any]]:
    text = f'CALL:note({{"text": "item {b.i}"}})' if b.tool else f"REPLY:answer {b.i}"
    return [{"role": "user", "content": text}]


def after(b: Item, tracer: Any, context: Any) -> str:
    count(f"{b.key}:{b.i}", "after")
    b.output = context.last_result.data.final_output
    return b.output


ItemTree = (
    Tree[Item]("BatchParkItem")
    .Sequence()
    ._().LLM(lambda b: MODELS[b.fallback], messages, api_key="sk-park", base_url=FAKE_URL, max_tokens=8,
             tools=lambda b: [Note()] if b.tool else None)
    ._().Function(after)
    .End()
)


@register_type
@dataclass
class Items:
    key: str = ""
    n: int = 0
    tool: bool = False
    fallback: str = "live"
    outputs: list[str] = field(default_factory=list)
    noted: list[str] = field(default_factory=list)
    held_until: float = 0.0


def _items(b: Items) -> tuple[list[Tree[Item]], list[Item]]:
    items = [Item(b.key, i, b.tool and i % 2 == 0, b.fallback) for i in range(b.n)]  # tools: every other item
    return [ItemTree] * b.n, items


def collect(b: Items, tracer: Any, context: Any) -> None:
    records = context.last_result.data
    b.outputs = [r if isinstance(r, str) else "" for r in records]


def hold(b: Items) -> None:
    """Runs until the test lets it go (`batchpark:go:<key>` set; at most a minute): the run stays live, its
    coordinator holding it, while the batch is out."""
    deadline = time.monotonic() + 60
    while not _client().exists(f"batchpark:go:{b.key}") and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a test's switch with a deadline
    count(b.key, "held")


GatherTree = (
    Tree[Items]("BatchParkGather")
    .Sequence()
    ._().Gather(_items, concurrency_limit=4)
    ._().Function(collect)
    .End()
)

#: A batched Gather next to a branch that keeps the run live until the test says so (a coordinator to kill). The
#: first branch is one unit: its Gather runs on a worker, where every item's call parks in the same round.
HeldTree = (
    Tree[Items]("BatchParkHeld")
    .Parallel()
    ._().Sequence()
    ._()._().Gather(_items, concurrency_limit=4)
    ._()._().Function(collect)
    ._().Function(hold)
    .End()
)
