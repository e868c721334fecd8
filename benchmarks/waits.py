"""Parked runs: submit N runs that each park on one WaitFor, then signal them all at a steady rate.

    python benchmarks/waits.py                      # 10,000 runs, signals at 100/s
    python benchmarks/waits.py --n 1000 --rate 100

The script starts a private redis-server and two `celery -A worker worker` processes serving units and the runs
queue (TASKTREE_IMPORTS=benchmarks.bench_trees, tree "BenchWait": a Function, WaitFor("go"), a Function), and stops
them by PID at the end.

1. submit N runs (64 submits in flight) and wait until all are `waiting` (parked);
2. slots_held_while_parked: parked runs that still name a coordinator, plus runs still `running`, once all parked;
3. redis_bytes_per_parked_run: MEMORY USAGE of every key of a sample of parked runs (record, events, trace, the
   waits hash, spilled fields), the unit-records hash excepted, averaged;
4. signal every run at --rate per second (each signal on its own schedule: a slow one does not delay the next),
   then wait for every run to finish;
5. resume latency per run: from the signal accepted (`Run.asignal` returned) to the Function after the wait
   starting on a worker (one machine's clock); lost = runs that did not succeed; ran_twice = runs whose Function
   before or after the wait ran more than once.
Its last line: parked=<n> slots_held_while_parked=<n> resume_p50_ms=<n> resume_p95_ms=<n>
redis_bytes_per_parked_run=<n> lost=<n> ran_twice=<n>
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DISABLE_TASKTREE_LOGGING", "1")

from benchmarks import bench_trees as B  # noqa: E402
from tasktree_dist import RunClient  # noqa: E402
from tasktree_dist.distributed import create_app, keys  # noqa: E402
from tasktree_dist.testing.fleet import WorkerProcess, fleet_env, fleet_settings, wait_until_ready  # noqa: E402
from tasktree_dist.testing.redis_server import RedisServer  # noqa: E402

SAMPLE = 200


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds so far of these processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


async def count_states(client: RunClient, run_ids: list[str]) -> dict[str, int]:
    redis = client._store().redis
    counts: dict[str, int] = {}
    for start in range(0, len(run_ids), 1000):
        pipe = redis.pipeline(transaction=False)
        for run_id in run_ids[start:start + 1000]:
            pipe.hget(keys.run(run_id), "state")
        for state in await pipe.execute():
            name = state.decode() if state else "missing"
            counts[name] = counts.get(name, 0) + 1
    return counts


async def wait_states(client: RunClient, run_ids: list[str], done: set[str], within: float, what: str) -> dict:
    deadline = time.monotonic() + within
    while True:
        counts = await count_states(client, run_ids)
        if sum(counts.get(state, 0) for state in done) == len(run_ids) or time.monotonic() > deadline:
            print(f"{what}: {counts}", flush=True)
            return counts
        await asyncio.sleep(1.0)  # polling with a deadline


async def held_slots(client: RunClient, run_ids: list[str]) -> int:
    redis = client._store().redis
    held = 0
    for start in range(0, len(run_ids), 1000):
        pipe = redis.pipeline(transaction=False)
        for run_id in run_ids[start:start + 1000]:
            pipe.hmget(keys.run(run_id), "state", "owner")
        for state, owner in await pipe.execute():
            held += state == b"running" or (state == b"waiting" and bool(owner))
    return held


async def bytes_per_run(client: RunClient, run_ids: list[str]) -> float:
    """Average MEMORY USAGE of a sample of parked runs' keys (their unit records excepted), with a breakdown."""
    redis = client._store().redis
    sampled = run_ids[:: max(1, len(run_ids) // SAMPLE)][:SAMPLE]
    kinds: dict[str, int] = {}
    for run_id in sampled:
        names = {name async for name in redis.scan_iter(match=f"*{run_id}*", count=10_000)}
        names.discard(keys.units(run_id).encode())
        for name in names:
            kind = name.decode().split("}:", 1)[-1].split(":")[0]  # tasktree:{<run id>}:<kind>[:...]
            kinds[kind] = kinds.get(kind, 0) + (await redis.memory_usage(name) or 0)
    per_kind = {kind: round(total / max(1, len(sampled))) for kind, total in sorted(kinds.items())}
    print(f"redis bytes per parked run by key kind: {per_kind}", flush=True)
    return sum(kinds.values()) / max(1, len(sampled))


async def bench(args: argparse.Namespace, client: RunClient, pids: dict[str, list[int]]) -> str:
    started = time.perf_counter()
    gate = asyncio.Semaphore(64)

    async def submit(i: int) -> str:
        async with gate:
            return (await client.asubmit(B.WaitBench, B.Parked(i), run_id=f"wb-{i}-p")).id

    run_ids = await asyncio.gather(*(submit(i) for i in range(args.n)))
    print(f"submitted {args.n} runs in {time.perf_counter() - started:.1f} s", flush=True)
    counts = await wait_states(client, run_ids, {"waiting"}, args.n / 10 + 120, "parked")
    parked = counts.get("waiting", 0)
    print(f"all parked after {time.perf_counter() - started:.1f} s", flush=True)
    held = await held_slots(client, run_ids)
    per_run = await bytes_per_run(client, run_ids)
    info = await client._store().redis.info("memory")
    print(f"redis used_memory with {parked} parked runs: {info['used_memory'] / 1e6:.1f} MB", flush=True)

    accepted: dict[int, float] = {}
    cpu_before = {name: cpu_s(group) for name, group in pids.items()}
    t0 = time.perf_counter() + 0.5
    clock0 = time.time() + 0.5

    async def signal(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + i / args.rate - time.perf_counter()))  # the steady rate's schedule
        await client.asignal(run_ids[i], "go", True, signal_id=f"go{i}")
        accepted[i] = time.time()

    await asyncio.gather(*(signal(i) for i in range(args.n)))
    spent = time.time() - clock0
    print(f"signalled {args.n} runs in {spent:.1f} s ({args.n / spent:.0f}/s)", flush=True)
    counts = await wait_states(client, run_ids, {"succeeded", "failed", "cancelled"}, 300, "finished")
    print("CPU ms per signal + resume: " + ", ".join(
        f"{name} {(cpu_s(group) - cpu_before[name]) * 1000 / args.n:.1f}" for name, group in pids.items()),
        flush=True)
    lost = args.n - counts.get("succeeded", 0)
    redis = client._store().redis
    after_at = {int(k): float(v) for k, v in (await redis.hgetall("waitsbench:after_at")).items()}
    latencies = [(after_at[i] - accepted[i]) * 1000 for i in accepted if i in after_at]
    runs = [*(await redis.hgetall("waitsbench:before")).items(), *(await redis.hgetall("waitsbench:after")).items()]
    twice = {int(k) for k, v in runs if int(v) > 1}
    return (f"parked={parked} slots_held_while_parked={held} resume_p50_ms={percentile(latencies, 0.5):.0f} "
            f"resume_p95_ms={percentile(latencies, 0.95):.0f} redis_bytes_per_parked_run={per_run:.0f} "
            f"lost={lost} ran_twice={len(twice)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=100.0, help="signals per second")
    parser.add_argument("--slots", type=int, default=64, help="TASKTREE_COORDINATOR_SLOTS per worker process")
    args = parser.parse_args()
    print(f"machine: nproc {os.cpu_count()}, load average at start {os.getloadavg()[0]:.2f}", flush=True)
    workers: list[WorkerProcess] = []
    with RedisServer() as redis_server:
        env = fleet_env(f"{redis_server.url}/0", f"{redis_server.url}/1", "benchmarks.bench_trees",
                        DISABLE_TASKTREE_LOGGING="1", TASKTREE_COORDINATOR_SLOTS=str(args.slots))
        app = create_app(fleet_settings(env))
        try:
            workers += [WorkerProcess(f"w{i}", env, concurrency=32).start() for i in (1, 2)]
            wait_until_ready(app, workers, timeout=60)
            client = RunClient(app)
            pids = {"workers": [w.process.pid for w in workers if w.process is not None],
                    "redis": [redis_server.process.pid] if redis_server.process is not None else [],
                    "signalling client": [os.getpid()]}
            line = asyncio.run(bench(args, client, pids))
        finally:
            for worker in workers:
                worker.stop()
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
