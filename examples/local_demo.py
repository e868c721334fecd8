"""A local (single-process) run: a small document pipeline with a Parallel, a Retry, a Cacher and a Gather.

Run with `make demo`. It prints the result, the blackboard and the id of the trace saved under .traces/
(view it with `make trace-server`).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from tasktree_dist import Context, FileTraceStorageHandler, InMemoryCacheStore, Result, Tree


@dataclass
class Doc:
    text: str
    words: int = 0
    summary: str = ""


@dataclass
class Job:
    docs: list[str]
    summaries: list[str] = field(default_factory=list)
    total_words: int = 0
    attempts: int = 0


def count_words(d: Doc) -> int:
    d.words = len(d.text.split())
    return d.words


async def summarise(d: Doc) -> str:
    await asyncio.sleep(0.01)  # stands in for I/O (an LLM call in the real job)
    d.summary = " ".join(d.text.split()[:3]) + "..."
    return d.summary


doc_tree = (
    Tree[Doc]("SummariseDoc")
    .Sequence()
    ._().Function(count_words)
    ._().Function(summarise)
    .End()
)


def flaky_fetch(b: Job) -> Result:
    """Fails on the first attempt to show Retry at work."""
    b.attempts += 1
    return Result.OK("fetched") if b.attempts > 1 else Result.FAIL("transient error")


store = InMemoryCacheStore()

pipeline = (
    Tree[Job]("LocalDemo")
    .Sequence()
    ._().Log(lambda b: f"{len(b.docs)} documents")
    ._().Retry(max_tries=3, sleep_secs=0.01)
    ._()._().Function(flaky_fetch)
    ._().Cacher(key_func=lambda b: f"demo:{len(b.docs)}", store=store, expiration=60)
    ._()._().Gather(lambda b: ([doc_tree] * len(b.docs), [Doc(text) for text in b.docs]), concurrency_limit=4)
    ._().WriteBlackboard(lambda b, results: setattr(b, "summaries", results))
    ._().Function(lambda b: sum(len(t.split()) for t in b.docs))
    ._().WriteBlackboard("total_words")
    .End()
)


async def main() -> None:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rng = random.Random(7)
    job = Job(docs=[" ".join(rng.choices(words, k=8)) for _ in range(6)])
    context = Context()
    async with context.using_blackboard(job):
        result = await pipeline(context)
    trace_id = await FileTraceStorageHandler(".traces").save(context.trace_root())
    print("result:", result)
    print("summaries:", job.summaries)
    print("total words:", job.total_words, "| fetch attempts:", job.attempts)
    print("trace id:", trace_id)
    print("view it: make trace-server, then open http://127.0.0.1:8000/" + trace_id)


if __name__ == "__main__":
    asyncio.run(main())
