"""Trees the runs tests submit; workers import this module (TASKTREE_IMPORTS=tests.run_trees).

The LLM endpoint travels in the blackboard (the fake server's URL is only known once the test session started it).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tasktree_dist import LLMRunRecord, Tree, register_type


@register_type
@dataclass
class Doc:
    text: str
    base_url: str
    model: str = "fake-gpt"
    answer: str = ""


def messages(d: Doc) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"REPLY:summary of {d.text}"}]


def keep_answer(d: Doc, record: LLMRunRecord) -> None:
    d.answer = record.final_output


DocLLM = (
    Tree[Doc]("RunDocLLM")
    .Sequence()
    ._().LLM(lambda d: d.model, messages, base_url=lambda d: d.base_url, api_key="test", max_retries=0)
    ._().WriteBlackboard(keep_answer)
    .End()
)


@dataclass
class Batch:
    base_url: str = ""
    texts: list[str] = field(default_factory=list)
    #: Per text index, a model name to use instead of fake-gpt (e.g. one that fails its first call).
    models: dict[str, str] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)


def batch_docs(b: Batch) -> tuple[list[Tree[Doc]], list[Doc]]:
    docs = [Doc(text, b.base_url, b.models.get(str(i), "fake-gpt")) for i, text in enumerate(b.texts)]
    return [DocLLM] * len(docs), docs


def keep_answers(b: Batch, records: list[LLMRunRecord]) -> None:
    b.answers = [record.final_output for record in records]


BatchTree = (
    Tree[Batch]("RunBatch")
    .Sequence()
    ._().Gather(batch_docs, concurrency_limit=20)
    ._().WriteBlackboard(keep_answers)
    .End()
)

#: The batch in batch mode (the provider's Batch API: the fake server's).
BatchModeDocLLM = (
    Tree[Doc]("RunBatchModeDocLLM")
    .Sequence()
    ._().LLM(lambda d: d.model, messages, base_url=lambda d: d.base_url, api_key="test", max_retries=0, batch=True)
    ._().WriteBlackboard(keep_answer)
    .End()
)
BatchModeTree = (
    Tree[Batch]("RunBatchMode")
    .Sequence()
    ._().Gather(lambda b: ([BatchModeDocLLM] * len(b.texts), batch_docs(b)[1]), concurrency_limit=50)
    ._().WriteBlackboard(keep_answers)
    .End()
)

#: The same batch under a Timeout, for "partial work is kept".
TimedBatch = (
    Tree[Batch]("RunTimedBatch")
    .Timeout(1.05)
    ._().Gather(batch_docs, concurrency_limit=5)
    .End()
)


@dataclass
class Nap:
    seconds: float = 0.0
    done: bool = False
    #: A Redis key that ends the nap early once it exists (tests wake their naps instead of timing them).
    wake_key: str = ""


async def nap(b: Nap) -> str:
    if not b.wake_key:
        await asyncio.sleep(b.seconds)
    else:
        import os

        from tasktree_dist.core.redis_client import connect

        client = connect(os.environ["TASKTREE_REDIS_URL"], asynchronous=True)
        try:
            deadline = asyncio.get_running_loop().time() + b.seconds
            # the key is set by another process: polled, no event can carry it here
            while not await client.exists(b.wake_key) and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # polling period, not synchronisation
        finally:
            await client.aclose()
    b.done = True
    return "rested"


NapTree = Tree[Nap]("RunNap").Sequence()._().Function(nap).End()


@dataclass
class Naps:
    seconds: float = 0.0
    count: int = 0
    wake_key: str = ""
    results: list[str] = field(default_factory=list)


def nap_children(b: Naps) -> tuple[list[Tree[Nap]], list[Nap]]:
    return [NapTree] * b.count, [Nap(b.seconds, wake_key=b.wake_key) for _ in range(b.count)]


def keep_results(b: Naps, results: list[str]) -> None:
    b.results = results


NapsTree = (
    Tree[Naps]("RunNaps")
    .Sequence()
    ._().Gather(nap_children, concurrency_limit=200)
    ._().WriteBlackboard(keep_results)
    .End()
)

#: More naps than its limit: the units beyond it wait on the workers for a slot (distributed.gates).
GatedNapsTree = (
    Tree[Naps]("RunGatedNaps")
    .Sequence()
    ._().Gather(nap_children, concurrency_limit=8)
    ._().WriteBlackboard(keep_results)
    .End()
)
