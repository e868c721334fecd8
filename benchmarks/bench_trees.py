"""Trees and the raw Celery task that the distributed benchmarks run; workers import this module.

Start workers with TASKTREE_IMPORTS=benchmarks.bench_trees. The benchmark scripts import it as
`benchmarks.bench_trees` too, with the repository root first on sys.path. Registered type names are
`module:qualname`, so the coordinator and the workers must use the same module name.

- `bench.noop`: a plain Celery task (shared_task, so it is registered on whatever app loads this module: the
  worker's `worker.app` and the coordinator's app alike). It RPUSHes its index to a Redis list. The raw-group
  benchmark BLPOPs that list to count completions, because the app has no result backend.
- `bench.llm_call`: a plain Celery task (shared_task too) that makes the request the "DistBenchLLMCall" leaf makes
  (model "fake-gpt", one user message `REPLY:answer <i>`, api key "sk-bench") with the sync openai client, then
  RPUSHes `[i, answer, worker]` to a Redis list. It is the peer of the distributed LLM batch benchmark
  (`llm_batch_dist.py --peer celery`).
- "DistBenchNoop": one Function leaf that returns its blackboard's index. It is the Gather child of the
  dispatch benchmark.
- "DistBenchLLMCall": one LLM leaf against the fake server (`REPLY:answer <i>`), the same subtree as
  benchmarks/llm_batch_local.py. It is the Gather child of the distributed LLM batch benchmark.
- "DistBenchLimitedCall": one LLM leaf on model "fake-limited" with `words` filler words and max_tokens=4, so a
  call costs 2 + words + 4 tokens as the fake server counts them. It is the Gather child of the rate-limit
  benchmark, whose workers limit "fake-limited" through TASKTREE_LLM_LIMITS.
- "BenchWait": a Function, a WaitFor("go"), a Function: a run that parks on one wait (benchmarks/waits.py); the
  Functions count their runs and record when the one after the wait started.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery import shared_task

from tasktree_dist import LLMModel, Tree, register_type

# --------------------------------------------------------------------------- raw Celery no-op

_redis_client: Any = None
_redis_lock = threading.Lock()


def _redis() -> Any:
    """One sync Redis client per worker process (thread-safe connection pool), made on first use."""
    global _redis_client
    with _redis_lock:
        if _redis_client is None:
            from tasktree_dist.core.redis_client import connect

            _redis_client = connect(os.environ["TASKTREE_REDIS_URL"], asynchronous=False)
        return _redis_client


@shared_task(name="bench.noop", ignore_result=True)
def noop(i: int, reply_key: str) -> None:
    """Do nothing, then report completion on `reply_key`. This is one round trip, as a unit's completion is."""
    _redis().rpush(reply_key, i)


# --------------------------------------------------------------------------- raw Celery + sync openai (the peer)

_openai_clients: dict[str, Any] = {}
_openai_local = threading.local()
_caps: dict[int, threading.BoundedSemaphore] = {}
_openai_lock = threading.Lock()


def _openai_client(base_url: str, per_thread: bool) -> Any:
    """The sync client for `base_url`, made on first use and reused: one per worker process (thread-safe: its
    httpx pool is shared by the pool's threads, as a module-level `client = OpenAI()` would be), or one per pool
    thread (`per_thread`: a client and its connections each)."""
    if per_thread:
        clients = _openai_local.__dict__.setdefault("clients", {})
        if base_url not in clients:
            import openai

            clients[base_url] = openai.OpenAI(base_url=base_url, api_key="sk-bench")
        return clients[base_url]
    with _openai_lock:
        client = _openai_clients.get(base_url)
        if client is None:
            import openai

            client = _openai_clients[base_url] = openai.OpenAI(base_url=base_url, api_key="sk-bench")
        return client


def _cap(size: int) -> threading.BoundedSemaphore:
    with _openai_lock:
        if size not in _caps:
            _caps[size] = threading.BoundedSemaphore(size)
        return _caps[size]


@shared_task(name="bench.llm_call", bind=True, ignore_result=True)
def llm_call(self: Any, i: int, base_url: str, reply_key: str, cap: int = 0, per_thread: bool = False) -> None:
    """The "DistBenchLLMCall" request (the same JSON body: model, messages, `"stream": false`) through the sync
    openai client, then RPUSH `[i, answer, worker]` to `reply_key`. `cap` > 0 bounds the calls in flight in this
    worker process (a semaphore around create()), for a pool with more threads than the worker's share of the
    fleet's concurrency."""
    client = _openai_client(base_url, per_thread)
    messages = call_messages(Call(i, base_url))
    if cap > 0:
        with _cap(cap):
            response = client.chat.completions.create(model="fake-gpt", messages=messages, stream=False)
    else:
        response = client.chat.completions.create(model="fake-gpt", messages=messages, stream=False)
    answer = response.choices[0].message.content
    worker = str(self.request.hostname or "?").split("@")[0]
    _redis().rpush(reply_key, json.dumps([i, answer, worker]))


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


# --------------------------------------------------------------------------- LLM subtrees


@dataclass
class Call:
    i: int
    base_url: str
    words: int = 0  # filler words: the rate-limit benchmark's calls cost 2 + words prompt tokens


def call_messages(b: Call) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"REPLY:answer {b.i}" + " w" * b.words}]


def call_base_url(b: Call) -> str:
    return b.base_url


LLMCallTree = (
    Tree[Call]("DistBenchLLMCall")
    .LLM("fake-gpt", call_messages, api_key="sk-bench", base_url=call_base_url)
    .End()
)

LIMITED_MODEL = "fake-limited"
LIMITED_COMPLETION_TOKENS = 4

LimitedCallTree = (
    Tree[Call]("DistBenchLimitedCall")
    .LLM(LIMITED_MODEL, call_messages, api_key="sk-bench", base_url=call_base_url,
         max_tokens=LIMITED_COMPLETION_TOKENS)
    .End()
)


#: Batch mode (benchmarks/llm_batch_api.py): priced, so the batch price factor shows in the run's cost.
BATCH_MODEL = LLMModel("fake-gpt", batch=True, input_price_per_m=1.0, output_price_per_m=2.0)

BatchCallTree = Tree[Call]("DistBenchBatchCall").LLM(BATCH_MODEL, call_messages, api_key="sk-bench",
                                                     base_url=call_base_url).End()


@dataclass
class CallBatch:
    calls: list[Call] = field(default_factory=list)


def _call_params(batch: CallBatch) -> tuple[list[Tree[Call]], list[Call]]:
    return [LLMCallTree] * len(batch.calls), batch.calls


def _limited_params(batch: CallBatch) -> tuple[list[Tree[Call]], list[Call]]:
    return [LimitedCallTree] * len(batch.calls), batch.calls


def batch_gather(limit: int) -> Tree[CallBatch]:
    """The coordinator's Gather of "DistBenchBatchCall" trees (batch mode)."""
    return Tree[CallBatch](f"DistBenchBatchGather-c{limit}").Gather(
        lambda batch: ([BatchCallTree] * len(batch.calls), batch.calls), concurrency_limit=limit).End()


def llm_gather(limit: int, limited: bool = False) -> Tree[CallBatch]:
    """The coordinator's Gather of "DistBenchLLMCall" trees, or of "DistBenchLimitedCall" ones (`limited`)."""
    name, params = ("DistBenchLimitedGather", _limited_params) if limited else ("DistBenchLLMGather", _call_params)
    return Tree[CallBatch](f"{name}-c{limit}").Gather(params, concurrency_limit=limit).End()


#: The submitted-run benchmarks' tree (benchmarks/runs_recovery.py): built at import so every worker's coordinator
#: has it registered.
LLMGather200 = llm_gather(200)
NoopGather1 = noop_gather(1)


# --------------------------------------------------------------------------- waits (benchmarks/waits.py)


@register_type
@dataclass
class Parked:
    i: int = 0


def before_wait(p: Parked) -> None:
    """Counts its runs per index (HINCRBY waitsbench:before): more than 1 means the replay ran it again."""
    _redis().hincrby("waitsbench:before", str(p.i), 1)
    _redis().expire("waitsbench:before", 3600)


def after_wait(p: Parked) -> None:
    """Records when the node after the wait started (the resume latency's end) and counts its runs."""
    client = _redis()
    client.hsetnx("waitsbench:after_at", str(p.i), repr(time.time()))
    client.hincrby("waitsbench:after", str(p.i), 1)
    client.expire("waitsbench:after_at", 3600)
    client.expire("waitsbench:after", 3600)


WaitBench = (
    Tree[Parked]("BenchWait")
    .Sequence()
    ._().Function(before_wait)
    ._().WaitFor("go")
    ._().Function(after_wait)
    .End()
)
