"""A batch of LLM jobs: a Gather of N documents, each summarised by an LLM into JSON that ParseJSON reads back.

    python examples/llm_batch.py                      # 20 documents, 10 at a time, against a fake server in-process
    python examples/llm_batch.py --docs 200 --concurrency 50

    # a real OpenAI-compatible provider:
    LLM_BASE_URL=https://api.openai.com/v1 LLM_API_KEY=sk-... LLM_MODEL=gpt-4.1-mini python examples/llm_batch.py

Environment: LLM_BASE_URL (unset: start the fake server), LLM_API_KEY (unset: OPENAI_API_KEY), LLM_MODEL
(default gpt-4.1-mini; fake-priced with the fake server, which reports a cost per call), LLM_INPUT_PRICE_PER_M and
LLM_OUTPUT_PRICE_PER_M (USD per 1M tokens, used when the provider reports no cost).

Each document runs the "SummariseDoc" tree on its own blackboard:

    Sequence
      LLM          ask for {"summary": ..., "keywords": [...]}; the fake server is told what to answer with
                   a trailing `REPLY:<json>` (every other one wrapped in ```json fences, as models often do)
      WriteBlackboard   keep the token usage
      ParseJSON    strips the fences, parses (json_repair-tolerant) the record's final_output into doc.parsed
      Function     returns the row: id, summary, keywords, tokens

Both trees ("SummariseDoc" and "LLMBatch") are built once, at import time, so a worker process that imports this
module knows them by name; `build_job(n)` and `run(context, n, concurrency)` let other code (a distributed demo
with its own Context/executor) run the same batch. Prints a table, the totals and the id of the saved trace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from tasktree_dist import (
    Context,
    FileTraceStorageHandler,
    LLMModel,
    Result,
    Tree,
    close_llm_clients,
    register_type,
    rich_progress,
)

DEFAULT_DOCS = 20
DEFAULT_CONCURRENCY = 10

PROMPT = (
    "Summarise the document below in one sentence and pick up to 5 keywords. Answer with JSON only, "
    'exactly {"summary": "<one sentence>", "keywords": ["<word>", ...]}.\n\nDocument:\n'
)


# --------------------------------------------------------------------------- blackboards


@register_type  # travels inside Doc when a document is shipped to a worker
@dataclass
class LLMSettings:
    """Where and how to call the model; travels with each document (no secrets: the key comes from the env)."""

    model: str = "gpt-4.1-mini"
    base_url: str | None = None
    fake: bool = False  # True: the endpoint is the fake server, told what to answer
    input_price_per_m: float = 0.0
    output_price_per_m: float = 0.0


@dataclass
class Doc:
    doc_id: int
    text: str
    llm: LLMSettings = field(default_factory=LLMSettings)
    usage: dict[str, Any] = field(default_factory=dict)
    parsed: Any = None


@dataclass
class Batch:
    docs: list[Doc]
    rows: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- the document subtree


def fake_answer(doc: Doc) -> str:
    """What the fake model should answer for this document: a JSON summary computed here, fenced every other time."""
    sentences = doc.text.split(". ")
    summary = sentences[1].rstrip(".") + "." if len(sentences) > 1 else doc.text
    counts = Counter(w.strip(".,").lower() for w in doc.text.split())
    keywords = [w for w, _ in counts.most_common() if len(w) > 6 and w != "document"][:3]
    answer = json.dumps({"summary": summary, "keywords": keywords})
    return f"```json\n{answer}\n```" if doc.doc_id % 2 else answer


def make_messages(doc: Doc) -> list[dict[str, Any]]:
    content = PROMPT + doc.text
    if doc.llm.fake:
        content += "\nREPLY:" + fake_answer(doc)  # the fake server answers with what follows REPLY:
    return [{"role": "user", "content": content}]


def model_for(doc: Doc) -> LLMModel:
    return LLMModel(doc.llm.model, input_price_per_m=doc.llm.input_price_per_m,
                    output_price_per_m=doc.llm.output_price_per_m)


def api_key_for(doc: Doc) -> str | None:
    return os.getenv("LLM_API_KEY") or ("sk-fake" if doc.llm.fake else None)  # None: OPENAI_API_KEY


def keep_usage(doc: Doc, record: Any) -> None:
    doc.usage = dict(record.usage)


def make_row(doc: Doc) -> dict[str, Any]:
    parsed = doc.parsed if isinstance(doc.parsed, dict) else {}
    return {
        "doc": doc.doc_id,
        "summary": str(parsed.get("summary", "")),
        "keywords": [str(k) for k in parsed.get("keywords", [])][:5],
        "tokens": int(doc.usage.get("total", 0)),
    }


summarise_doc = (
    Tree[Doc]("SummariseDoc")
    .Sequence()
    ._().LLM(model_for, make_messages, api_key=api_key_for, base_url=lambda d: d.llm.base_url,
             temperature=0)
    ._().WriteBlackboard(keep_usage)
    ._().ParseJSON(dst="parsed")
    ._().Function(make_row)
    .End()
)


def _gather_params(batch: Batch) -> tuple[list[Tree[Doc]], list[Doc]]:
    return [summarise_doc] * len(batch.docs), batch.docs


def _keep_rows(batch: Batch, rows: list[Any]) -> None:
    batch.rows = [row for row in rows if isinstance(row, dict)]


def build_batch_tree(concurrency: int = DEFAULT_CONCURRENCY, name: str = "LLMBatch") -> Tree[Batch]:
    return (
        Tree[Batch](name)
        .Sequence()
        ._().Log(lambda b: f"{len(b.docs)} documents")
        ._().ForceOk()  # a failed document is a FAIL row, not a failed batch
        ._()._().Gather(_gather_params, concurrency_limit=concurrency)
        ._().WriteBlackboard(_keep_rows)
        .End()
    )


llm_batch = build_batch_tree(DEFAULT_CONCURRENCY)
_batch_trees: dict[int, Tree[Batch]] = {DEFAULT_CONCURRENCY: llm_batch}


def batch_tree(concurrency: int = DEFAULT_CONCURRENCY) -> Tree[Batch]:
    """The batch tree for a concurrency limit (the limit is part of the tree): "LLMBatch" for the default."""
    if concurrency not in _batch_trees:
        _batch_trees[concurrency] = build_batch_tree(concurrency, name=f"LLMBatch-c{concurrency}")
    return _batch_trees[concurrency]


# --------------------------------------------------------------------------- documents and jobs

TOPICS = {
    "astronomy": "Astronomers observed distant galaxies with powerful telescopes and measured redshift carefully",
    "cooking": "Professional kitchens balance seasoning, temperature and timing when preparing delicate sauces",
    "finance": "Central banks adjusted interest rates while markets watched inflation and employment figures",
    "biology": "Researchers sequenced bacterial genomes and compared mutations across laboratory populations",
    "software": "Engineers refactored asynchronous services, profiling latency and throughput under realistic load",
    "history": "Historians examined medieval manuscripts, tracing trade routes between coastal merchant cities",
}


def make_documents(n: int, settings: LLMSettings | None = None, seed: int = 7) -> list[Doc]:
    rng = random.Random(seed)
    names = sorted(TOPICS)
    docs = []
    for i in range(n):
        topic = names[i % len(names)]
        sentences = [TOPICS[topic] + "."]
        sentences += [rng.choice(list(TOPICS.values())).split(",")[0] + "." for _ in range(2)]
        docs.append(Doc(doc_id=i, text=f"Document {i} about {topic}. " + " ".join(sentences),
                        llm=settings or LLMSettings()))
    return docs


def settings_from_env(fake_base_url: str | None = None) -> LLMSettings:
    """LLM settings from LLM_* variables, or for the fake server at `fake_base_url`."""
    prices = (float(os.getenv("LLM_INPUT_PRICE_PER_M") or 0), float(os.getenv("LLM_OUTPUT_PRICE_PER_M") or 0))
    if fake_base_url is not None:
        return LLMSettings(os.getenv("LLM_MODEL") or "fake-priced", fake_base_url, True, *prices)
    return LLMSettings(os.getenv("LLM_MODEL") or "gpt-4.1-mini", os.getenv("LLM_BASE_URL") or None, False, *prices)


def build_job(n: int, concurrency: int = DEFAULT_CONCURRENCY,
              settings: LLMSettings | None = None) -> tuple[Tree[Batch], Batch]:
    """The batch tree and a blackboard of `n` documents (settings: from the environment when omitted)."""
    return batch_tree(concurrency), Batch(docs=make_documents(n, settings or settings_from_env()))


@dataclass
class BatchReport:
    result: Result
    batch: Batch
    wall_s: float
    ok: int
    failed: int
    tokens: dict[str, int]
    cost: float


async def run(context: Context, n: int = DEFAULT_DOCS, concurrency: int = DEFAULT_CONCURRENCY,
              settings: LLMSettings | None = None) -> BatchReport:
    """Run the batch of `n` documents on `context` (any executor) and sum up."""
    tree, batch = build_job(n, concurrency, settings)
    started = time.perf_counter()
    async with context.using_blackboard(batch):
        result = await tree(context)
    wall = time.perf_counter() - started
    root = context.trace_root()
    ok = sum(1 for row in batch.rows if row.get("summary"))
    return BatchReport(result, batch, wall, ok, n - ok, root.total_tokens(), root.total_cost())


# --------------------------------------------------------------------------- CLI


def print_report(report: BatchReport, show: int = 20) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    table = Table(title=f"LLMBatch: {len(report.batch.docs)} documents")
    table.add_column("doc", justify="right")
    table.add_column("status")
    table.add_column("summary", overflow="fold")
    table.add_column("keywords")
    table.add_column("tokens", justify="right")
    rows = {row["doc"]: row for row in report.batch.rows}
    for doc in report.batch.docs[:show]:
        row = rows.get(doc.doc_id)
        if row and row["summary"]:
            table.add_row(str(doc.doc_id), "OK", row["summary"], ", ".join(row["keywords"]), str(row["tokens"]))
        else:
            table.add_row(str(doc.doc_id), "[red]FAIL[/red]", "", "", str(doc.usage.get("total", "")))
    if len(report.batch.docs) > show:
        table.caption = f"... and {len(report.batch.docs) - show} more"
    console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS, help="number of documents (default 20)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="LLM calls at a time (10)")
    parser.add_argument("--trace-dir", default=".traces")
    parser.add_argument("--show", type=int, default=20, help="table rows to print")
    parser.add_argument("--fake-latency-ms", type=float, default=100.0, help="the fake server's answer delay")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    async with AsyncExitStack() as stack:
        if os.getenv("LLM_BASE_URL"):
            settings = settings_from_env()
            print(f"LLM: {settings.base_url}  model: {settings.model}")
        else:
            from tasktree_dist.testing.fake_llm import FakeLLMServer

            server = await stack.enter_async_context(FakeLLMServer(port=0, latency_ms=args.fake_latency_ms))
            settings = settings_from_env(server.base_url)
            print(f"LLM: fake OpenAI-compatible server at {server.base_url}  model: {settings.model} "
                  "(set LLM_BASE_URL to use a real one)")
        with rich_progress() as on_progress:
            context = Context(on_progress=on_progress)
            report = await run(context, args.docs, args.concurrency, settings)
        await close_llm_clients()

    print_report(report, args.show)
    tokens = report.tokens
    print(f"docs: {len(report.batch.docs)}  ok: {report.ok}  fail: {report.failed}  concurrency: {args.concurrency}")
    print(f"tokens: {tokens.get('total', 0)} (prompt {tokens.get('prompt', 0)}, "
          f"completion {tokens.get('completion', 0)})")
    print(f"cost: ${report.cost:.6f}")
    print(f"wall time: {report.wall_s:.3f} s")
    trace_id = await FileTraceStorageHandler(args.trace_dir).save(context.trace_root())
    print("trace id:", trace_id)
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
