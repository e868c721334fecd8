"""The main job: the LLM batch example run across two Celery workers (`make demo`).

By default it starts everything it needs and stops it at the end, by PID: a private redis-server (broker and
state), the fake OpenAI-compatible LLM server, and two `celery -A worker worker` processes importing
examples.llm_batch. Then it runs the batch distributed, prints the results, how units split across the workers
and the id of the saved trace (open it with `make trace-server`).

    python examples/distributed_demo.py                  # 40 documents, 20 at a time, 200 ms fake LLM latency
    python examples/distributed_demo.py --docs 200 --concurrency 100
    python examples/distributed_demo.py --external       # use TASKTREE_* / LLM_* from the environment and its
                                                         # already-running workers (docker compose's demo service)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker_config import TasktreeSettings  # noqa: E402
from examples import llm_batch  # noqa: E402
from tasktree_dist import Context, FileTraceStorageHandler, close_llm_clients, rich_progress  # noqa: E402
from tasktree_dist.distributed import CeleryExecutor, create_app  # noqa: E402
from tasktree_dist.testing.fleet import (  # noqa: E402
    FakeLLMProcess,
    WorkerProcess,
    fleet_env,
    fleet_settings,
    wait_until_ready,
)
from tasktree_dist.testing.redis_server import RedisServer  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=20, help="documents in flight across the fleet")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=200.0, help="the fake LLM's answer delay")
    parser.add_argument("--external", action="store_true", help="use the environment's broker, Redis and workers")
    parser.add_argument("--trace-dir", default=".traces")
    return parser.parse_args()


def start_fleet(stack: ExitStack, args: argparse.Namespace) -> TasktreeSettings:
    print("starting: private redis-server, fake LLM server, "
          f"{args.workers} workers (celery -A worker worker, TASKTREE_IMPORTS=examples.llm_batch) ...", flush=True)
    redis = stack.enter_context(RedisServer())
    base_url = stack.enter_context(FakeLLMProcess(args.latency_ms)).base_url
    os.environ["LLM_BASE_URL"], os.environ["LLM_API_KEY"] = base_url, "sk-fake"
    env = fleet_env(f"{redis.url}/0", f"{redis.url}/1", "examples.llm_batch", LLM_BASE_URL=base_url,
                    LLM_API_KEY="sk-fake", TASKTREE_WORKER_CONCURRENCY=str(max(8, args.concurrency)))
    settings = fleet_settings(env)
    workers = [WorkerProcess(f"w{i + 1}", env, concurrency=max(8, args.concurrency)) for i in range(args.workers)]
    for worker in workers:
        stack.callback(worker.stop)
        worker.start()
    print("workers ready:", ", ".join(sorted(wait_until_ready(create_app(settings), workers, timeout=60))), flush=True)
    return settings


async def run_batch(settings: TasktreeSettings, args: argparse.Namespace, fake: bool) -> None:
    executor = CeleryExecutor(create_app(settings), settings=settings)
    llm = llm_batch.settings_from_env(os.environ["LLM_BASE_URL"] if fake else None)
    try:
        with rich_progress() as on_progress:  # a bar for the Gather, advancing as workers finish documents
            context = Context(executor=executor, on_progress=on_progress)
            report = await llm_batch.run(context, args.docs, args.concurrency, llm)
    finally:
        await executor.aclose()
        await close_llm_clients()
    llm_batch.print_report(report, show=10)
    units = [node for node in context.trace_root().walk() if "worker" in node.attributes]
    split = collections.Counter(node.attributes["worker"] for node in units)
    ideal = args.docs * args.latency_ms / 1000 / args.concurrency
    print(f"result: {report.result.status}  docs: {args.docs}  ok: {report.ok}  failed: {report.failed}")
    print(f"tokens: {report.tokens.get('total', 0)}  cost: ${report.cost:.6f}")
    note = f" (ideal {ideal:.2f} s at {args.concurrency} in flight)" if fake else ""
    print(f"wall time: {report.wall_s:.2f} s{note}")
    print("units per worker: " + ", ".join(f"{name}: {count}" for name, count in sorted(split.items())))
    trace_id = await FileTraceStorageHandler(args.trace_dir).save(context.trace_root())
    print("trace id:", trace_id)
    print(f"view it: make trace-server, then open http://127.0.0.1:8000/{trace_id}")
    if report.failed:
        raise SystemExit(1)


def main() -> None:
    args = parse_args()
    with ExitStack() as stack:
        if args.external:
            settings = TasktreeSettings()
            fake = "fake" in os.environ.get("LLM_BASE_URL", "") or bool(os.environ.get("LLM_FAKE"))
        else:
            settings, fake = start_fleet(stack, args), True
        asyncio.run(run_batch(settings, args, fake))
        print("stopping everything this demo started ...", flush=True)


if __name__ == "__main__":
    main()
