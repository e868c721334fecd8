"""Submitted runs: the time from `submit` to the first unit starting on a worker, and the extra wall time a
1000-item LLM batch pays when a worker, or the run's coordinator, is killed (SIGKILL) part-way.

    python benchmarks/runs_recovery.py                      # TTL 3 s, 1000 calls, limit 200, 200 ms
    python benchmarks/runs_recovery.py --ttl 10 --n 2000

The script starts a private redis-server, the fake LLM server (own process) and three `celery -A worker worker`
processes serving units and the runs queue (TASKTREE_IMPORTS=benchmarks.bench_trees, TASKTREE_LEASE_TTL=--ttl,
worker concurrency 200 each, so two of them still hold the whole concurrency limit after one is killed: the extra
time is detection and redoing lost units, not lost capacity). Everything is stopped by PID at the end.

1. submit -> first unit start: --latency-runs runs of a one-unit Gather submitted with RunClient; for each, the
   time from just before `submit` to the earliest unit start recorded on the worker (clocks are one machine's).
2. uninterrupted: the batch submitted and awaited (the baseline wall time).
3. worker kill: the same batch; once a third of its units finished, a worker that is NOT the coordinator and
   holds units is killed; the run completes on the others.
4. coordinator kill: the same batch; once a third finished, the run's coordinator is killed; another claims the
   run after its heartbeat expires and resumes it by replay.
extra = wall - baseline wall, printed as a multiple of the TTL; the goal is extra <= 1.1 x TTL + 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DISABLE_TASKTREE_LOGGING", "1")

from benchmarks import bench_trees as B  # noqa: E402
from tasktree_dist import RunClient  # noqa: E402
from tasktree_dist.distributed import create_app, keys  # noqa: E402
from tasktree_dist.testing.fleet import (  # noqa: E402
    FakeLLMProcess,
    WorkerProcess,
    fleet_env,
    fleet_settings,
    wait_until_ready,
)
from tasktree_dist.testing.redis_server import RedisServer  # noqa: E402


async def first_unit_start(client: RunClient, run_id: str) -> float:
    """The earliest `started` of the run's recorded unit fragments (epoch seconds)."""
    redis = client._store().redis
    records = await redis.hvals(keys.units(run_id))
    return min(orjson.loads(raw)["trace"]["started"] for raw in records)


async def latency(client: RunClient, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        started = time.time()
        run = await client.asubmit(B.NoopGather1, B.NoopBatch([B.Item(i)]))
        result = await run.aresult(timeout=60)
        assert result.is_ok(), result
        out.append((await first_unit_start(client, run.id)) - started)
    return out


async def batch(client: RunClient, args: argparse.Namespace, base_url: str,
                kill: str | None = None, workers: list[WorkerProcess] | None = None) -> tuple[float, str]:
    calls = [B.Call(i, base_url) for i in range(args.n)]
    started = time.perf_counter()
    run = await client.asubmit(B.LLMGather200, B.CallBatch(calls))
    victim = ""
    if kill is not None and workers is not None:
        finished = 0
        async for event in client.aevents(run.id):
            finished += event.type == "unit"
            if finished >= args.n // 3:
                break
        coordinator = (await run.astatus()).coordinator or ""
        for worker in workers:
            is_coordinator = coordinator.startswith(worker.name.split("@")[0] + "@")
            if worker.process is not None and is_coordinator == (kill == "coordinator"):
                os.kill(worker.process.pid, signal.SIGKILL)
                worker.process.wait(10)
                victim = worker.name
                break
    result = await run.aresult(timeout=600)
    wall = time.perf_counter() - started
    answers = [getattr(data, "final_output", None) for data in (result.data or [])]
    if not result.is_ok() or answers != [f"answer {i}" for i in range(args.n)]:
        raise RuntimeError(f"run {run.id}: wrong or missing answers ({str(result)[:300]})")
    return wall, victim


async def bench(args: argparse.Namespace, client: RunClient, base_url: str, workers: list[WorkerProcess]) -> None:
    warm = await latency(client, 3)  # the first submits pay imports and connections
    delays = await latency(client, args.latency_runs)
    print(f"submit -> first unit start: median {statistics.median(delays) * 1000:.1f} ms, "
          f"p90 {sorted(delays)[int(len(delays) * 0.9) - 1] * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms "
          f"({len(delays)} runs; warm-up {', '.join(f'{d * 1000:.0f}' for d in warm)} ms)")
    await batch(client, args, base_url)  # warm-up of the batch path
    base, _ = await batch(client, args, base_url)
    ideal = args.n * args.latency_ms / 1000 / 200
    print(f"uninterrupted batch: {base:.2f} s (ideal {ideal:.2f} s)")
    for kill in ("worker", "coordinator"):
        wall, victim = await batch(client, args, base_url, kill, workers)
        extra = wall - base
        goal = 1.1 * args.ttl + 1
        print(f"{kill} kill ({victim}): {wall:.2f} s, extra {extra:.2f} s = {extra / args.ttl:.2f} x TTL "
              f"(goal <= 1.1 x TTL + 1 s = {goal:.1f} s: {'met' if extra <= goal else 'MISSED'})")
        replacement = WorkerProcess(f"{victim.split('@')[0]}b", workers[0].env, concurrency=200).start()
        workers.append(replacement)
        wait_until_ready(client.app, [replacement], timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--ttl", type=float, default=3.0, help="TASKTREE_LEASE_TTL (heartbeat TTL) in seconds")
    parser.add_argument("--latency-runs", type=int, default=20)
    args = parser.parse_args()
    print(f"machine: nproc {os.cpu_count()}, load average at start {os.getloadavg()[0]:.2f}")
    workers: list[WorkerProcess] = []
    with RedisServer() as redis_server, FakeLLMProcess(args.latency_ms) as llm:
        env = fleet_env(f"{redis_server.url}/0", f"{redis_server.url}/1", "benchmarks.bench_trees",
                        DISABLE_TASKTREE_LOGGING="1", TASKTREE_LEASE_TTL=str(args.ttl),
                        TASKTREE_WORKER_CONCURRENCY="200")
        settings = fleet_settings(env, lease_ttl=args.ttl)
        app = create_app(settings)
        try:
            workers += [WorkerProcess(f"w{i}", env, concurrency=200).start() for i in (1, 2, 3)]
            wait_until_ready(app, workers, timeout=60)
            client = RunClient(app)
            asyncio.run(bench(args, client, llm.base_url, workers))
        finally:
            for worker in workers:
                worker.stop()
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
