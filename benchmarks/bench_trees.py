"""Trees and the raw Celery task that the distributed benchmarks run; workers import this module.

Start workers with TASKTREE_IMPORTS=benchmarks.bench_trees. The benchmark scripts import it as
`benchmarks.bench_trees` too, with the repository root first on sys.path. Registered type names are
`module:qualname`, so the coordinator and the workers must use the same module name.

- `bench.noop`: a plain Celery task (shared_task, so it is registered on whatever app loads this module: the
  worker's `worker.app` and the coordinator's app alike). It RPUSHes its index to a Redis list. The raw-group
  benchmark BLPOPs that list to count completions, because the app has no result backend.
- "DistBenchNoop": one Function leaf that returns its blackboard's index. It is the Gather child of the
  dispatch benchmark.
- "DistBenchLLMCall": one LLM leaf against the fake server (`REPLY:answer <i>`), the same subtree as
  benchmarks/llm_batch_local.py. It is the Gather child of the distributed LLM batch benchmark.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

from celery import shared_task

from tasktree_dist import Tree

# --------------------------------------------------------------------------- raw Celery no-op

_redis_client: Any = None
_redis_lock = threading.Lock()


def _redis() -> Any:
    """One sync Redis client per worker process (thread-safe connection pool), made on first use."""
    global _redis_client
    with _redis_lock:
        if _redis_client is None:
            import redis

            _redis_client = redis.Redis.from_url(os.environ["TASKTREE_REDIS_URL"])
        return _redis_client


@shared_task(name="bench.noop", ignore_result=True)
def noop(i: int, reply_key: str) -> None:
    """Do nothing, then report completion on `reply_key`. This is one round trip, as a unit's completion is."""
    _redis().rpush(reply_key, i)


# --------------------------------------------------------------------------- tasktree no-op


@dataclass
class Item:
    i: int


def touch(b: Item) -> int:
    return b.i


NoopTree = Tree[Item]("DistBenchNoop").Function(touch).End()


@dataclass
class NoopBatch:
    items: list[Item] = field(default_factory=list)


def _noop_params(batch: NoopBatch) -> tuple[list[Tree[Item]], list[Item]]:
    return [NoopTree] * len(batch.items), batch.items


def noop_gather(limit: int) -> Tree[NoopBatch]:
    """The coordinator's tree (never shipped: only its Gather children travel, and those are registered)."""
    return Tree[NoopBatch](f"DistBenchNoopGather-c{limit}").Gather(_noop_params, concurrency_limit=limit).End()


# --------------------------------------------------------------------------- LLM subtree


@dataclass
class Call:
    i: int
    base_url: str


def call_messages(b: Call) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"REPLY:answer {b.i}"}]


def call_base_url(b: Call) -> str:
    return b.base_url


LLMCallTree = (
    Tree[Call]("DistBenchLLMCall")
    .LLM("fake-gpt", call_messages, api_key="sk-bench", base_url=call_base_url)
    .End()
)


@dataclass
class CallBatch:
    calls: list[Call] = field(default_factory=list)


def _call_params(batch: CallBatch) -> tuple[list[Tree[Call]], list[Call]]:
    return [LLMCallTree] * len(batch.calls), batch.calls


def llm_gather(limit: int) -> Tree[CallBatch]:
    return Tree[CallBatch](f"DistBenchLLMGather-c{limit}").Gather(_call_params, concurrency_limit=limit).End()


#: The submitted-run benchmarks' tree (benchmarks/runs_recovery.py): built at import so every worker's coordinator
#: has it registered.
LLMGather200 = llm_gather(200)
NoopGather1 = noop_gather(1)
