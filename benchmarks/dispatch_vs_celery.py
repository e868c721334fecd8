"""Dispatch overhead: a raw Celery `group` of N no-op tasks vs a tasktree Gather of N one-Function trees.

    python benchmarks/dispatch_vs_celery.py                       # N=1000, best of 3, limits 1000 and 200
    python benchmarks/dispatch_vs_celery.py --n 2000 --repeat 5 --batch-size 32

The script starts a private redis-server (the broker in db 0, tasktree state in db 1) and two
`celery -A worker worker` processes, w1 and w2. They use the threads pool with the same concurrency and
TASKTREE_IMPORTS=benchmarks.bench_trees. Both runs use these same workers. The script stops everything by
PID at the end.

(a) raw Celery: `group(bench.noop.s(i, key) for i in range(N)).apply_async()`. Each task RPUSHes its index to a
    Redis list, because the app has no result backend. The coordinator BLPOPs until N items have arrived. The
    timed span runs from just before `apply_async()` to the Nth item.
(b) tasktree: `await tree(context)` of a Gather of N "DistBenchNoop" trees (Function returning the blackboard's
    index) through CeleryExecutor. The timed span covers everything the library does: encoding the N
    blackboards, storing their snapshots, sending batches of units, the workers' runs, and reading the N
    completions from the coordinator's Redis reply list. It also grafts the N trace fragments and applies
    the results.

(a') is (a) again with the coordinator's `task_send_sent_event` off, which is Celery's default. The app turns
     it on for Flower. The workers' own task events stay on in every run.

Each variant gets --warmup untimed runs and then --repeat timed runs. The best is reported. Ratio = b / a: a
value below 1.0 means the Gather is faster than the bare group. Both sides pay the app's configuration, with
task events on (`worker_send_task_events`, `task_send_sent_event`). That cost is per message, and a Gather
sends N / batch messages instead of N.

For each run the script also prints the CPU seconds of every process, read from /proc, and for each Gather
`fleet CPU per unit:` (coordinator, workers and redis-server, per unit) and `units/s:`. For (b) it prints the
per-unit delay from send to worker start, and the worker's run time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DISABLE_TASKTREE_LOGGING", "1")

from celery import group  # noqa: E402

from benchmarks import bench_trees as B  # noqa: E402
from broker_config import TasktreeSettings  # noqa: E402
from tasktree_dist import Context  # noqa: E402
from tasktree_dist.core import tuning  # noqa: E402
from tasktree_dist.distributed import CeleryExecutor, create_app  # noqa: E402
from tasktree_dist.testing.fleet import WorkerProcess, fleet_env, fleet_settings, wait_until_ready  # noqa: E402
from tasktree_dist.testing.redis_server import RedisServer  # noqa: E402

T = TypeVar("T")
TICKS = os.sysconf("SC_CLK_TCK")
RUN_TIMEOUT_S = 120.0
DEFAULT_BATCH = TasktreeSettings.model_fields["batch_size"].default


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (all its threads) so far, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class CPUMeter:
    """CPU seconds each process spent during a run: coordinator (this process), w1, w2, redis-server."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, float] = {}

    def start(self) -> None:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) - self.before[name] for name, pid in self.pids.items()}


def cpu_line(cpu: dict[str, float]) -> str:
    parts = ", ".join(f"{name} {seconds:.2f}" for name, seconds in cpu.items())
    return f"CPU s: {parts} (total {sum(cpu.values()):.2f})"


class TimedExecutor(CeleryExecutor):
    """CeleryExecutor that notes when each batch is sent. It only observes and does not change behaviour."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sends: list[float] = []

    def reset(self) -> None:
        self.sends.clear()

    def _publish(self, units: list[Any]) -> None:
        super()._publish(units)
        self.sends.append(time.perf_counter())


def unit_delays(children: list[Any]) -> tuple[list[float], list[float]]:
    """(send -> worker start, worker run) in ms per unit, from the trace (`queued_ms` counts from the send)."""
    dispatch = [child.attributes.get("queued_ms", 0.0) for child in children]
    run = [child.attributes.get("worker_run_ms", 0.0) for child in children]
    return dispatch, run


def spread(values: list[float]) -> str:
    ordered = sorted(values)
    if not ordered:
        return "-"
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"median {at(0.5):.0f}, p90 {at(0.9):.0f}, max {ordered[-1]:.0f} ms"


# --------------------------------------------------------------------------- (a) raw Celery group


def raw_group_once(app: Any, redis: Any, n: int, queue: str, meter: CPUMeter) -> dict[str, Any]:
    key = f"bench:noop:{uuid.uuid4().hex}"
    signatures = [app.signature("bench.noop", args=(i, key), queue=queue) for i in range(n)]
    meter.start()
    started = time.perf_counter()
    group(signatures, app=app).apply_async()
    dispatched = time.perf_counter()
    seen: set[int] = set()
    while len(seen) < n:
        item = redis.blpop([key], timeout=60)
        if item is None:
            raise TimeoutError(f"raw group: only {len(seen)} of {n} no-op tasks completed within 60 s")
        seen.add(int(item[1]))
        seen.update(int(raw) for raw in (redis.lpop(key, n) or []))
    done = time.perf_counter()
    cpu = meter.stop()
    redis.delete(key)
    if seen != set(range(n)):
        raise RuntimeError("raw group: wrong completions")
    return {"wall": done - started, "dispatch": dispatched - started, "cpu": cpu}


# --------------------------------------------------------------------------- (b) tasktree Gather


async def gather_once(executor: TimedExecutor, limit: int, n: int, meter: CPUMeter) -> dict[str, Any]:
    tree = B.noop_gather(limit)
    batch = B.NoopBatch([B.Item(i) for i in range(n)])
    context = Context(executor=executor, enable_python_logging=False)
    executor.reset()
    meter.start()
    started = time.perf_counter()
    async with context.using_blackboard(batch):
        try:
            result = await asyncio.wait_for(tree(context), RUN_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(f"Gather of {n} (limit {limit}) not done after {RUN_TIMEOUT_S} s: "
                               "units were lost; see the worker logs below") from None
    done = time.perf_counter()
    cpu = meter.stop()
    if not result.is_ok() or result.data != list(range(n)):
        errors = [node.attributes["error"] for node in context.trace_root().walk() if node.attributes.get("error")]
        raise RuntimeError(f"Gather failed: {str(result)[:300]}; {len(errors)} errors, first: {errors[:1]}")
    children = [node for node in context.trace_root().walk() if node.kind == "Gather"][0].child_list()
    dispatch, run = unit_delays(children)
    workers: dict[str, int] = {}
    for child in children:
        name = str(child.attributes.get("worker", "?")).split("@")[0]
        workers[name] = workers.get(name, 0) + 1
    return {
        "wall": done - started,
        "first_send": executor.sends[0] - started if executor.sends else 0.0,
        "last_send": executor.sends[-1] - started if executor.sends else 0.0,
        "messages": len(executor.sends),
        "dispatch": spread(dispatch),
        "run": spread(run),
        "workers": workers,
        "cpu": cpu,
    }


async def gather_rounds(executor: TimedExecutor, limits: list[int], n: int, repeat: int, warmup: int,
                        meter: CPUMeter) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    try:
        for limit in limits:
            for _ in range(warmup):
                await gather_once(executor, limit, n, meter)
            out[limit] = [await gather_once(executor, limit, n, meter) for _ in range(repeat)]
    finally:
        await executor.aclose()
    return out


# --------------------------------------------------------------------------- main


def add_loop_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="the coordinator's event loop: uvloop (tasktree_dist.core.tuning.run, as the workers; "
                             "asyncio's where uvloop is missing or TASKTREE_UVLOOP=0) or asyncio.run's (uvloop)")


def coordinator_loop(args: argparse.Namespace) -> Callable[[Coroutine[Any, Any, T]], T]:
    """How the coordinator runs its coroutine: tuning.run (uvloop, like the workers) or asyncio.run."""
    return tuning.run if args.loop == "uvloop" else asyncio.run


def loop_name(args: argparse.Namespace) -> str:
    return "uvloop" if args.loop == "uvloop" and tuning.uvloop_enabled() else "asyncio"


def walls(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{run['wall']:.3f}" for run in runs)


@contextlib.contextmanager
def fleet_stopped_at_exit(workers: list[WorkerProcess], *others: Any) -> Iterator[None]:
    """Stop the workers and `others` (a fake LLM process, the redis-server: anything with stop()) by PID when the
    block ends; print the workers' logs when it fails."""
    try:
        yield
    except BaseException:
        for worker in workers:
            print(f"--- log of worker {worker.name} (last 3000 characters)\n{worker.log()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for worker in workers:
            worker.stop()
        for other in others:
            other.stop()


def start_workers(
    server: RedisServer, args: argparse.Namespace, workers: list[WorkerProcess], count: int = 2, **extra_env: str
) -> tuple[Any, Any]:
    """Start `count` workers, w1 .. w<count>, on `server` (broker db 0, state db 1) with the benchmark's settings
    (and `extra_env`); append them to `workers` as they start, so the caller's `finally` stops whatever did start.
    Returns (settings, app)."""
    state_url = f"{server.url}/1"
    if args.redis_max_connections:
        state_url += f"?max_connections={args.redis_max_connections}"
    env = fleet_env(f"{server.url}/0", state_url, "benchmarks.bench_trees", DISABLE_TASKTREE_LOGGING="1",
                    TASKTREE_WORKER_CONCURRENCY=str(args.worker_concurrency), TASKTREE_BATCH_SIZE=str(args.batch_size),
                    **extra_env)
    settings = fleet_settings(env, worker_concurrency=args.worker_concurrency, batch_size=args.batch_size)
    app = create_app(settings)
    for name in (f"w{k}" for k in range(1, count + 1)):
        workers.append(WorkerProcess(name, env, concurrency=args.worker_concurrency).start())
    wait_until_ready(app, workers, timeout=60)
    return settings, app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="tasks / Gather trees per run (1000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant; the best is reported (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (1)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help=f"CeleryExecutor batch_size (TASKTREE_BATCH_SIZE's default, {DEFAULT_BATCH})")
    parser.add_argument("--limits", default="1000,200", help="Gather concurrency limits to try (1000,200)")
    parser.add_argument("--worker-concurrency", type=int, default=64,
                        help="threads per worker process, both workers, both variants (64, the default setting)")
    parser.add_argument("--redis-max-connections", type=int, default=0,
                        help="max_connections in TASKTREE_REDIS_URL's query string, overriding the size of the "
                             "workers' redis.asyncio pool (0: the library's own)")
    add_loop_option(parser)
    args = parser.parse_args(argv)
    limits = [int(x) for x in args.limits.split(",") if x.strip()]

    import redis as redis_sync

    load = os.getloadavg()[0]
    server = RedisServer()
    workers: list[WorkerProcess] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops what was started
    with fleet_stopped_at_exit(workers, server), contextlib.ExitStack() as closing:
        server.start()
        settings, app = start_workers(server, args, workers)
        redis_client = redis_sync.Redis.from_url(settings.redis_url)
        closing.callback(redis_client.close)
        pids = {"coordinator": os.getpid(), "w1": workers[0].process.pid, "w2": workers[1].process.pid,
                "redis": server.process.pid}
        meter = CPUMeter(pids)

        def raw_rounds() -> list[dict[str, Any]]:
            for _ in range(args.warmup):
                raw_group_once(app, redis_client, args.n, settings.queue, meter)
            return [raw_group_once(app, redis_client, args.n, settings.queue, meter) for _ in range(args.repeat)]

        print("(a) raw Celery group ...", file=sys.stderr, flush=True)
        raw = raw_rounds()
        # The same, with the coordinator's task-sent events off (Celery's default; the app turns them on for
        # Flower). The workers' events stay on: they are the workers' configuration, the same for every run.
        app.conf.task_send_sent_event = False
        raw_quiet = raw_rounds()
        app.conf.task_send_sent_event = True

        print("(b) tasktree Gather ...", file=sys.stderr, flush=True)
        executor = TimedExecutor(app, settings=settings, batch_size=args.batch_size)
        gathered = coordinator_loop(args)(gather_rounds(executor, limits, args.n, args.repeat, args.warmup, meter))

    best_raw = min(raw, key=lambda r: r["wall"])
    print(f"dispatch vs Celery: N={args.n}, 2 workers (threads pool, concurrency {args.worker_concurrency} each), "
          f"private redis-server, best of {args.repeat} after {args.warmup} warm-up, coordinator loop "
          f"{loop_name(args)}")
    print(f"machine: nproc {os.cpu_count()}, Python {sys.version.split()[0]}, load average at start {load:.2f}")
    print()
    print(f"(a) raw Celery group of {args.n} no-op tasks (completion = RPUSH, coordinator BLPOPs)")
    print(f"    best {best_raw['wall']:.3f} s   runs: {walls(raw)}")
    dispatched = f"{best_raw['dispatch']:.3f} s ({args.n} messages)"
    print(f"    apply_async() returned after {dispatched}; {cpu_line(best_raw['cpu'])}")
    best_quiet = min(raw_quiet, key=lambda r: r["wall"])
    print("(a') the same with the coordinator's task-sent events off (Celery's default)")
    print(f"    best {best_quiet['wall']:.3f} s   runs: {walls(raw_quiet)}")
    print(f"    apply_async() returned after {best_quiet['dispatch']:.3f} s; {cpu_line(best_quiet['cpu'])}")
    for limit in limits:
        runs = gathered[limit]
        best = min(runs, key=lambda r: r["wall"])
        size = max(1, min(args.batch_size, limit // 4))
        print(f"(b) tasktree Gather of {args.n} Function trees, concurrency_limit={limit}, "
              f"batch_size={args.batch_size} (effective {size})")
        print(f"    best {best['wall']:.3f} s   runs: {walls(runs)}")
        print(f"    {best['messages']} messages, first sent at {best['first_send'] * 1000:.0f} ms, last at "
              f"{best['last_send'] * 1000:.0f} ms; units per worker {dict(sorted(best['workers'].items()))}")
        print(f"    per unit: send -> worker start {best['dispatch']}; worker run {best['run']}")
        print(f"    {cpu_line(best['cpu'])}")
        print(f"    fleet CPU per unit: {1000 * sum(best['cpu'].values()) / args.n:.3f} ms (coordinator, workers, "
              f"redis-server; goal <= 0.25); units/s: {args.n / best['wall']:.0f}")
        print(f"    ratio b/a = {best['wall'] / best_raw['wall']:.2f}  (goal <= 1.0); "
              f"b/a' = {best['wall'] / best_quiet['wall']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
