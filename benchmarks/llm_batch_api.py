"""Batch mode at scale: one-LLM items over two workers through the provider's Batch API (the fake server's).

    python benchmarks/llm_batch_api.py                     # 10,000 items, batches done 30 s after creation
    python benchmarks/llm_batch_api.py --n 2000 --delay-s 5

The script starts a private redis-server, the fake OpenAI-compatible server in a thread of this process (its
Files and Batches API completes each batch --delay-s after creation with --error-share of the requests errored)
and two `celery -A worker worker` processes. The coordinator (this process) runs one Gather of --n
"DistBenchBatchCall" trees (benchmarks/bench_trees.py): an LLM call with `LLMModel(batch=True)` priced 1 / 2 USD
per 1M tokens. Every call goes in the fleet's pending batch; a batch goes at TASKTREE_LLM_BATCH_MAX_REQUESTS
(10,000) or after TASKTREE_LLM_BATCH_MAX_WAIT_S (--max-wait-s); errored requests go live (batch_fallback="live").

Figures (last line): items, batched (requests in the provider's batches), batches, fallback_live (chat calls
the provider answered live: the errored requests' fallbacks; goal: every errored request), cost_ratio (the run's
cost over the same tokens at live prices; goal <= 0.51), slots_held_while_waiting (the most batched calls the
workers' heartbeats reported waiting in place for their batch, each holding its unit's slot, sampled every 0.5 s
through the run: a parked call's unit ends once its call is in the batch, and its continuation is sent once the
batch is read; before parking every batched call waited so; goal 0),
lost (items without an answer; goal 0), wall_s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DISABLE_TASKTREE_LOGGING", "1")

from benchmarks import bench_trees as B  # noqa: E402
from benchmarks.dispatch_vs_celery import fleet_stopped_at_exit, start_workers  # noqa: E402
from tasktree_dist import Context  # noqa: E402
from tasktree_dist.distributed import CeleryExecutor  # noqa: E402
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM  # noqa: E402
from tasktree_dist.testing.fleet import WorkerProcess  # noqa: E402
from tasktree_dist.testing.redis_server import RedisServer  # noqa: E402


async def held_slots(settings: Any, samples: list[tuple[int, int]]) -> None:
    """Every 0.5 s through the run, from the workers' heartbeats: (batched calls waiting in place, holding their
    unit's slot; units running), each summed over the workers."""
    import orjson
    import redis.asyncio as redis

    from tasktree_dist.distributed import keys

    client = redis.Redis.from_url(settings.redis_url)
    try:
        while True:
            await asyncio.sleep(0.5)  # a sampling period
            processes = [p.decode() for p in await client.zrange(keys.PROCESSES, 0, -1)]
            infos = [orjson.loads(raw) for raw in await client.mget([keys.process_info(p) for p in processes]) if raw]
            workers = [info for info in infos if info.get("role") == "worker"]
            samples.append((sum(int(i.get("batch_waits_in_place") or 0) for i in workers),
                            sum(int(i.get("running") or 0) for i in workers)))
    finally:
        await client.aclose()


async def run(args: argparse.Namespace, settings: Any, app: Any, fake: Any
              ) -> tuple[float, Any, Context, list[tuple[int, int]]]:
    executor = CeleryExecutor(app, settings=settings, batch_size=args.batch_size)
    context = Context(executor=executor, enable_python_logging=False)
    samples: list[tuple[int, int]] = []
    sampler = asyncio.ensure_future(held_slots(settings, samples))
    started = time.perf_counter()
    try:
        async with context.using_blackboard(B.CallBatch([B.Call(i, fake.base_url) for i in range(args.n)])):
            result = await asyncio.wait_for(B.batch_gather(args.n)(context), args.delay_s * 4 + 600)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await executor.aclose()
    return time.perf_counter() - started, result, context, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="items (10,000)")
    parser.add_argument("--delay-s", type=float, default=30.0, help="a batch's completion after creation (30 s)")
    parser.add_argument("--error-share", type=float, default=0.01, help="share of errored requests (0.01)")
    parser.add_argument("--max-wait-s", type=float, default=10.0, help="TASKTREE_LLM_BATCH_MAX_WAIT_S (10)")
    parser.add_argument("--batch-size", type=int, default=256, help="units per Celery message (256)")
    parser.add_argument("--worker-concurrency", type=int, default=64, help="threads per worker (64)")
    parser.add_argument("--redis-max-connections", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    load = os.getloadavg()
    server = RedisServer()
    fake = ThreadedFakeLLM()
    workers: list[WorkerProcess] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with fleet_stopped_at_exit(workers, fake, server):
        server.start()
        fake.start()
        fake.batches.configure(delay_s=args.delay_s, error_share=args.error_share)
        settings, app = start_workers(server, args, workers, TASKTREE_LLM_BATCH_MAX_WAIT_S=str(args.max_wait_s),
                                      TASKTREE_LLM_BATCH_POLL_S="1")
        wall, result, context, samples = asyncio.run(run(args, settings, app, fake))
        batches = list(fake.batches.batches.values())
        live_calls = fake.calls

    # counted at the provider (the coordinator's trace keeps the first TASKTREE_TRACE_FANOUT_MAX children only)
    batched = sum(b["request_counts"]["total"] for b in batches)
    errored = sum(b["request_counts"]["failed"] for b in batches)
    fallback = live_calls  # every chat call the fake answered live is an errored request's fallback
    data = [d for d in result.data or [] if hasattr(d, "final_output")]
    failures = [d for d in result.data or [] if not hasattr(d, "final_output")]
    if failures:
        errors = {str(n.attributes["error"])[:300] for n in context.trace_root().walk() if n.attributes.get("error")}
        print(f"{len(failures)} items FAILed; result {result.status}; errors in the trace: {sorted(errors)[:5]}")
    lost = args.n - sum(1 for d in data if d.final_output.startswith("answer "))
    held = max((w for w, _ in samples), default=-1)  # -1: never sampled
    cost = sum(d.cost for d in data)
    live_cost = sum((d.usage.get("prompt", 0) * 1.0 + d.usage.get("completion", 0) * 2.0) / 1e6 for d in data)
    print(f"{args.n} items over 2 workers, batches done {args.delay_s:g} s after creation with "
          f"{100 * args.error_share:g} % errored; load average {load[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end, nproc {os.cpu_count()}")
    print(f"batches: {[b['request_counts'] for b in batches]}; errored requests {errored}, answered live "
          f"{live_calls}; {len(samples)} samples of the workers: batched calls waiting in place at most "
          f"{held}, units running at most {max((r for _, r in samples), default=0)}")
    print(f"items={args.n} batched={batched} batches={len(batches)} fallback_live={fallback} "
          f"cost_ratio={cost / live_cost if live_cost else 0:.3f} slots_held_while_waiting={held} lost={lost} "
          f"wall_s={wall:.1f}")
    return 0 if lost == 0 and fallback == errored and held == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
