"""Throughput of many LLM calls over two Celery workers: a Gather of N one-LLM subtrees against a fake server.

    python benchmarks/llm_batch_dist.py                     # 1000 calls, limit 200, 100 threads/worker, 200 ms
    python benchmarks/llm_batch_dist.py --n 2000 --concurrency 400 --worker-concurrency 200 --latency-ms 200

The script starts a private redis-server (the broker in db 0, tasktree state in db 1) and the fake
OpenAI-compatible server in its own process (`python -m tasktree_dist.testing.fake_llm`). It also starts two
`celery -A worker worker` processes, w1 and w2, with TASKTREE_IMPORTS=benchmarks.bench_trees and
TASKTREE_WORKER_CONCURRENCY=--worker-concurrency, which is their threads-pool size. It stops everything by
PID at the end.

Each Gather child is the "DistBenchLLMCall" tree of benchmarks/bench_trees.py. That tree is a single LLM leaf
(`REPLY:answer <i>`), the same subtree as benchmarks/llm_batch_local.py, so the two figures compare directly.
The whole tree runs on a worker as one unit.

A warm-up Gather of 2 x limit calls comes first and is not timed. It opens both workers' HTTP connections and
pays the one-off import costs. The fake server's counters are then reset, and one `await tree(context)` of the
N-call Gather is timed on the coordinator.

ideal = N x latency / limit, where limit is the Gather's concurrency_limit, the calls in flight across the
fleet. That would be every slot busy with server latency and zero overhead. The limit must be
<= 2 x --worker-concurrency. ideal / wall is the share of ideal throughput reached; the goal is >= 80 %.
Peak RSS is this coordinator process's ru_maxrss.

The script also prints where each unit's time goes: the delay from send to worker start, the LLM call as
the worker's client saw it, and the rest of the worker's run. It also prints the CPU seconds of every
process, read from /proc. See benchmarks/README.md for what these figures showed on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DISABLE_TASKTREE_LOGGING", "1")

from benchmarks import bench_trees as B  # noqa: E402
from benchmarks.dispatch_vs_celery import (  # noqa: E402
    CPUMeter,
    TimedExecutor,
    cpu_line,
    fleet_stopped_at_exit,
    spread,
    start_workers,
    unit_delays,
    walls,
)
from broker_config import TasktreeSettings  # noqa: E402
from tasktree_dist import Context  # noqa: E402
from tasktree_dist.testing.fleet import FakeLLMProcess, WorkerProcess  # noqa: E402
from tasktree_dist.testing.redis_server import RedisServer  # noqa: E402

RUN_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------- the fake LLM server


def fake_llm(port: int, path: str, method: str = "GET") -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST"
                                     else None)
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body.strip() else {}


# --------------------------------------------------------------------------- runs


async def run_gather(executor: TimedExecutor, limit: int, calls: list[B.Call]) -> tuple[float, Any, Context]:
    tree = B.llm_gather(limit)
    context = Context(executor=executor, enable_python_logging=False)
    started = time.perf_counter()
    async with context.using_blackboard(B.CallBatch(calls)):
        try:
            result = await asyncio.wait_for(tree(context), RUN_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(f"Gather of {len(calls)} LLM calls not done after {RUN_TIMEOUT_S} s: units were "
                               "lost; see the worker logs below") from None
    return time.perf_counter() - started, result, context


async def bench(args: argparse.Namespace, settings: TasktreeSettings, app: Any, base_url: str, port: int,
                meter: CPUMeter) -> dict[str, Any]:
    executor = TimedExecutor(app, settings=settings, batch_size=args.batch_size)
    try:
        warm = [B.Call(i, base_url) for i in range(2 * args.concurrency)]
        _, result, _ = await run_gather(executor, args.concurrency, warm)
        if not result.is_ok():
            raise RuntimeError(f"warm-up failed: {str(result)[:500]}")
        runs = []
        for _ in range(args.repeat):
            fake_llm(port, "/reset", "POST")
            calls = [B.Call(i, base_url) for i in range(args.n)]
            executor.reset()
            meter.start()
            wall, result, context = await run_gather(executor, args.concurrency, calls)
            cpu = meter.stop()
            stats = fake_llm(port, "/stats")
            answers = [getattr(data, "final_output", None) for data in (result.data or [])]
            children = [node for node in context.trace_root().walk() if node.kind == "Gather"][0].child_list()
            per_worker: dict[str, int] = {}
            for child in children:
                name = str(child.attributes.get("worker", "?")).split("@")[0]
                per_worker[name] = per_worker.get(name, 0) + 1
            dispatch, run = unit_delays(children)
            latency = [next((node.attributes.get("latency_ms", 0.0) for node in child.walk() if node.kind == "LLM"),
                            0.0) for child in children]
            runs.append({
                "wall": wall, "cpu": cpu, "stats": stats, "per_worker": per_worker,
                "ok": result.is_ok() and answers == [f"answer {i}" for i in range(args.n)],
                "messages": len(executor.sends),
                "last_send": (executor.sends[-1] - executor.sends[0]) if executor.sends else 0.0,
                "dispatch": spread(dispatch), "latency": spread(latency),
                "overhead": spread([r - lat for r, lat in zip(run, latency, strict=True)]),
            })
        return {"runs": runs}
    finally:
        await executor.aclose()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="LLM subtrees in the Gather (1000)")
    parser.add_argument("--concurrency", type=int, default=200,
                        help="the Gather's concurrency_limit = LLM calls in flight across the fleet (200)")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="the fake server's answer delay (200)")
    parser.add_argument("--worker-concurrency", type=int, default=100,
                        help="TASKTREE_WORKER_CONCURRENCY = threads of each of the 2 workers (100)")
    parser.add_argument("--batch-size", type=int, default=16, help="CeleryExecutor batch_size (16)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs; the best is reported (1)")
    parser.add_argument("--redis-max-connections", type=int, default=0,
                        help="max_connections in TASKTREE_REDIS_URL's query string, overriding the size of the "
                             "workers' redis.asyncio pool (0: the library's own)")
    args = parser.parse_args(argv)
    if args.concurrency > 2 * args.worker_concurrency:
        parser.error(f"--concurrency {args.concurrency} is more than 2 workers x --worker-concurrency "
                     f"{args.worker_concurrency}")

    load = os.getloadavg()[0]
    server = RedisServer()
    llm_process = FakeLLMProcess(args.latency_ms)
    workers: list[WorkerProcess] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops what was started
    with fleet_stopped_at_exit(workers, llm_process, server):
        server.start()
        llm_process.start()
        base_url, port = llm_process.base_url, llm_process.port
        settings, app = start_workers(server, args, workers)
        meter = CPUMeter({"coordinator": os.getpid(), "w1": workers[0].process.pid,  # type: ignore[union-attr]
                          "w2": workers[1].process.pid, "fake-llm": llm_process.pid,
                          "redis": server.process.pid})  # type: ignore[union-attr]
        out = asyncio.run(bench(args, settings, app, base_url, port, meter))

    runs = out["runs"]
    best = min(runs, key=lambda r: r["wall"])
    wall = best["wall"]
    ideal = args.n * args.latency_ms / 1000 / args.concurrency
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    size = max(1, min(args.batch_size, args.concurrency // 4))
    print(f"LLM batch over 2 workers: {args.n} LLM subtrees in a Gather, concurrency_limit {args.concurrency}, "
          f"worker concurrency {args.worker_concurrency} x 2, fake server latency {args.latency_ms:g} ms "
          f"(own process), batch_size {args.batch_size} (effective {size})")
    print(f"machine: nproc {os.cpu_count()}, Python {sys.version.split()[0]}, load average at start {load:.2f}")
    print(f"all answers correct: {best['ok']}")
    if len(runs) > 1:
        print(f"runs:        {walls(runs)} s (best reported)")
    print(f"wall time:   {wall:.3f} s")
    print(f"ideal time:  {ideal:.3f} s  (N x latency / concurrency_limit)")
    print(f"ideal/wall:  {100 * ideal / wall:.1f} %  (goal >= 80 %)")
    print(f"throughput:  {args.n / wall:.0f} calls/s (ideal {args.n / ideal:.0f})")
    print(f"fake server: {best['stats'].get('calls')} calls, max_concurrent {best['stats'].get('max_concurrent')}")
    print(f"units:       per worker {dict(sorted(best['per_worker'].items()))}; {best['messages']} messages, "
          f"the last sent {best['last_send']:.3f} s after the first")
    print(f"per unit:    send -> worker start {best['dispatch']}")
    print(f"             LLM call as the worker's client saw it {best['latency']}")
    print(f"             worker run minus that call {best['overhead']}")
    print(f"{cpu_line(best['cpu'])}")
    print(f"coordinator peak RSS: {peak_rss_mb:.1f} MB")
    return 0 if best["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
