"""Runs: submit the LLM batch to the fleet and return at once, watch it live, cancel one, retry it, list them.

It starts what it needs (a private redis-server, the fake LLM server, two `celery -A worker worker` processes
importing examples.llm_batch) and stops it at the end, by PID. Then, as an application would:

1. submits a batch of documents and follows its events (a progress bar from the run's event stream);
2. submits another, cancels it part-way from "another application" (a RunClient of its own), then retries it:
   the documents that finished before the cancel are kept, only the others call the LLM again;
3. lists the runs.

    python examples/runs_demo.py            # 40 and 60 documents
    python examples/runs_demo.py --docs 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import llm_batch  # noqa: E402
from examples.distributed_demo import start_fleet  # noqa: E402
from tasktree_dist import RunClient, RunState  # noqa: E402
from tasktree_dist.distributed import create_app  # noqa: E402


def fake_llm_calls(base_url: str) -> int:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=5) as answer:
        return int(json.load(answer)["calls"])


async def follow(client: RunClient, run_id: str) -> None:
    """Print the run's state changes and draw its progress from the event stream until it finishes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as bars:
        bar = None
        async for event in client.aevents(run_id):
            if event.type == "state":
                bars.console.print(f"  run {run_id[:8]}: {event.data['state']}")
            elif event.type == "progress":
                if bar is None:
                    bar = bars.add_task(event.data["node"], total=event.data["total"])
                bars.update(bar, completed=event.data["done"])


async def demo(client: RunClient, docs: int, base_url: str) -> None:
    settings = llm_batch.settings_from_env(base_url)

    print(f"\n1. submit a batch of {docs} documents, watch it live")
    run = await client.asubmit(llm_batch.llm_batch, llm_batch.Batch(docs=llm_batch.make_documents(docs, settings)),
                               labels={"demo": "runs", "step": "1"})
    print(f"  submitted {run.id} (submit returned at once; a coordinator in the fleet runs it)")
    await follow(client, run.id)
    status = await run.astatus()
    board = await run.ablackboard()
    print(f"  {status.state}: {len(board.rows)} rows, {status.tokens} tokens, ${status.cost_usd:.6f}, "
          f"{status.duration_s:.2f} s")

    total = docs * 3
    print(f"\n2. submit {total} documents, cancel part-way from another client, then retry")
    run = await client.asubmit(llm_batch.llm_batch,
                               llm_batch.Batch(docs=llm_batch.make_documents(total, settings, seed=11)),
                               labels={"demo": "runs", "step": "2"})
    finished = 0
    async for event in client.aevents(run.id):  # a unit event per finished document
        finished += event.type == "unit"
        if finished >= total // 4:
            break
    other = RunClient(client.app)
    print(f"  cancel: {await other.acancel(run.id)}")
    await other.aclose()
    await run.aresult(timeout=60)  # returns once the coordinator recorded what it kept
    status = await run.astatus()
    kept = status.progress.done - status.progress.failed
    print(f"  {status.state}: {kept} of {total} documents finished before the cancel; they are kept")
    calls = fake_llm_calls(base_url)
    await run.aretry()
    result = await run.aresult(timeout=120)
    status = await run.astatus()
    made = fake_llm_calls(base_url) - calls
    print(f"  retried: {status.state} ({result.status}), attempt {status.attempt}: {made} LLM calls for {total} "
          f"documents, {total - made} finished documents reused from the cancelled attempt")

    print("\n3. the runs")
    for item in await client.alist(limit=10):
        print(f"  {item.id}  {item.state:<10} {item.tree:<10} {item.progress.done:>3}/{item.progress.total:<3} "
              f"labels={item.labels}")
    succeeded = await client.alist(state=RunState.SUCCEEDED)
    print(f"  succeeded: {len(succeeded)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    args = parser.parse_args()
    fleet_args = argparse.Namespace(workers=2, concurrency=llm_batch.DEFAULT_CONCURRENCY, latency_ms=args.latency_ms)
    with ExitStack() as stack:
        settings = start_fleet(stack, fleet_args)
        import os

        client = RunClient(create_app(settings))
        asyncio.run(demo(client, args.docs, os.environ["LLM_BASE_URL"]))
        print("\nstopping everything this demo started ...", flush=True)


if __name__ == "__main__":
    main()
