"""Throughput of many LLM calls over K Celery workers: a Gather of N one-LLM subtrees against a fake server.

    python benchmarks/llm_batch_dist.py                     # 1000 calls, limit 200, 100 threads/worker x 2, 200 ms
    python benchmarks/llm_batch_dist.py --peer celery       # each round also as a Celery group + sync openai
    python benchmarks/llm_batch_dist.py --transport openai  # every call through openai-python's create()
    python benchmarks/llm_batch_dist.py --transport openai --peer ray --repeat 3   # side by side with Ray actors
    python benchmarks/llm_batch_dist.py --workers 4 --worker-concurrency 50 --peer celery
    python benchmarks/llm_batch_dist.py --n 2000 --concurrency 400 --worker-concurrency 200 --latency-ms 200
    python benchmarks/llm_batch_dist.py --runs 40 --redis cluster  # 40 concurrent runs, state on a 3-master cluster

The script starts a private redis-server (the broker in db 0, tasktree state in db 1) and the fake
OpenAI-compatible server in its own process (`python -m tasktree_dist.testing.fake_llm`). It also starts
--workers (K, default 2) `celery -A worker worker` processes, w1 .. wK, with TASKTREE_IMPORTS=benchmarks.bench_trees
and TASKTREE_WORKER_CONCURRENCY=--worker-concurrency, which is their threads-pool size. It stops everything by
PID at the end.

Each Gather child is the "DistBenchLLMCall" tree of benchmarks/bench_trees.py. That tree is a single LLM leaf
(`REPLY:answer <i>`), the same subtree as benchmarks/llm_batch_local.py, so the two figures compare directly.
The whole tree runs on a worker as one unit.

A warm-up Gather of 2 x limit calls comes first and is not timed. It opens the workers' HTTP connections and
pays the one-off import costs. The fake server's counters are then reset, and one `await tree(context)` of the
N-call Gather is timed on the coordinator.

ideal = N x latency / limit, where limit is the Gather's concurrency_limit, the calls in flight across the
fleet, whatever K is. That would be every slot busy with server latency and zero overhead. The limit must be
<= K x --worker-concurrency. ideal / wall is the share of ideal throughput reached; the goal is >= 80 %.
Peak RSS is this coordinator process's ru_maxrss, read before the peer runs.

The script also prints where each unit's time goes: the delay from send to worker start, the LLM call as
the worker's client saw it, and the rest of the worker's run. It also prints the CPU seconds of every
process, read from /proc, and per unit: the fleet's CPU (every process but the fake server: coordinator,
workers, redis-server) and the coordinator's, in ms per LLM call. Throughput per worker is calls/s / K.

Where the slots' time goes (issue 22: the refill of a freed slot): `server timeline:` is the fake server's view,
the mean calls in flight over the round as a share of the limit and the time none was in flight (gaps between
waves); `slot time per unit:` splits limit x (first send to last completion read) into the mean per unit of the
worker's run and the slot idle (a freed slot before its next unit starts; the first wave's sending and the last
wave's tail included), and gives the two legs a unit spends off a slot: send -> worker start (with the fan-out's
lookahead, TASKTREE_DISPATCH_LOOKAHEAD, it includes the wait for a slot on the worker) and worker end -> the
coordinator reading the completion.

`redis bytes per unit:` is the Redis memory (MEMORY USAGE, every field counted) of the run's unit records after
the run, per unit: what the run keeps for TASKTREE_RUN_RETENTION; the same line counts the run's events stream,
trace and record apart. --transport sets the workers' TASKTREE_LLM_TRANSPORT: `openai` sends every call through
openai-python's `create()`, as the peers do (the default, `direct`, is the library's lean client).

With --peer, every round is ours then the peer's (after both warm-ups), so both sides see the same moments of a
shared machine; the script prints every round side by side. `redis commands per unit:` counts what the
redis-server ran during our round (INFO commandstats: a script call and the commands it runs), per unit. The
coordinator runs uvloop (tasktree_dist.core.tuning.run, as the workers; --loop asyncio for asyncio.run).

--peer ray: the same batch on K Ray async actors, one AsyncOpenAI each (benchmarks/ray_peer.py: max_concurrency
= --concurrency / K, call i to actor i mod K, a local Ray cluster started and stopped by this process). Ray is
not a project dependency: `pip install -e '.[bench]'`. Its processes' CPU (the actors, gcs_server, raylet...) is
read from /proc like the fleet's; what they use while idle during our rounds is printed too.

--peer celery: the same batch again, after each of our rounds, as a plain Celery group of N `bench.llm_call` tasks
(bench_trees.py). Each task makes the LLM leaf's request (model "fake-gpt", the same user message, the same api
key, `"stream": false`) with the sync openai client, `openai.OpenAI(base_url=<fake server>, api_key=...)
.chat.completions.create(...)`, and RPUSHes `[i, answer, worker]` to a Redis list, because the app has no result
backend; the coordinator BLPOPs until all N have arrived and checks every answer is `answer <i>`. The wall runs
from just before `apply_async()` to the N-th answer. It runs on the same K worker processes (threads pool),
against the same fake server and latency, with its own untimed warm-up group of 2 x limit calls.

How the calls in flight are made equal. Ours: at most --concurrency (the Gather's limit) across the fleet, on
pools of K x --worker-concurrency threads. The peer has no fleet-wide limit of its own: a Celery task holds its
pool thread for the whole blocking create(), so its calls in flight are bounded by the pools' threads. When
--concurrency = K x --worker-concurrency (the defaults, and every configuration recorded in the README) the two
bounds are the same number and nothing else is added. When --concurrency is smaller, each peer task takes a
per-process semaphore of --concurrency / K around create() (the script then requires K to divide --concurrency):
that is exactly what pools of --concurrency / K threads would allow, on the same running processes, without a
fleet-wide Redis semaphore (which would add its own round trips to the peer). It is slightly stricter than ours
(our limit is fleet-wide, so one worker may hold more than its share while another is slow). Both sides use
the workers' configuration: acks_late, prefetch multiplier 1 (so a worker reserves one message per thread),
and task events on. The peer's group is sent with the coordinator's task_send_sent_event off, Celery's default
(--peer-sent-events on: the app's own setting, as for our executor's messages; one more publish per task, see
dispatch_vs_celery.py's (a) against (a')).

The peer's clients (--peer-client): one openai.OpenAI per pool thread (the default), made on the thread's first
task and reused, each with its own httpx pool and keep-alive connection; or one per worker process (a
module-level client shared by the pool's threads through one thread-safe httpx pool). Both are normal uses; per
thread was the faster of the two here (5.5 s against 8.2 s for the default batch, one run each), so the peer
gets it. The script prints both walls, both ideal/wall, the CPU seconds of each process for each, the per-unit
CPU lines for each, and `ratio peer/tasktree_dist` (peer wall / our wall; > 1 means we are faster).

--runs R splits the N calls over R runs (Gathers) run at once, each with its own run id and a concurrency_limit
of --concurrency / R, so their state can spread over a Redis Cluster's masters (one run's keys share one slot).
--redis cluster puts the state (TASKTREE_REDIS_URL) on a private 3-master Redis Cluster (the broker stays the
private redis-server) and prints, per master, its keys (DBSIZE after the timed run) and the commands it served
during it (INFO commandstats, reset before), as shares (goal: no master above 40 %).

See benchmarks/README.md for what these figures showed on a 2-core machine.
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
import typing
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DISABLE_TASKTREE_LOGGING", "1")

from celery import group  # noqa: E402

from benchmarks import bench_trees as B  # noqa: E402
from benchmarks.dispatch_vs_celery import (  # noqa: E402
    CPUMeter,
    TimedExecutor,
    add_loop_option,
    coordinator_loop,
    cpu_line,
    fleet_stopped_at_exit,
    loop_name,
    spread,
    start_workers,
    unit_delays,
    walls,
)
from broker_config import TasktreeSettings  # noqa: E402
from tasktree_dist import Context  # noqa: E402
from tasktree_dist.core.redis_client import connect  # noqa: E402
from tasktree_dist.testing.fleet import FakeLLMProcess, WorkerProcess  # noqa: E402
from tasktree_dist.testing.redis_cluster import RedisCluster  # noqa: E402
from tasktree_dist.testing.redis_server import RedisServer  # noqa: E402

RUN_TIMEOUT_S = 300.0
DEFAULT_BATCH = TasktreeSettings.model_fields["batch_size"].default
TRANSPORTS = typing.get_args(TasktreeSettings.model_fields["llm_transport"].annotation)


# --------------------------------------------------------------------------- the fake LLM server


def fake_llm(port: int, path: str, method: str = "GET") -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST"
                                     else None)
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body.strip() else {}


# --------------------------------------------------------------------------- runs


async def run_gathers(executor: TimedExecutor, limit: int, calls: list[B.Call], runs: int
                      ) -> tuple[float, list[Any], list[Context]]:
    """`runs` Gathers (runs) of a share of `calls` each, at once, each limited to limit / runs: the wall of all."""
    share = -(-len(calls) // runs)
    started = time.perf_counter()
    done = await asyncio.gather(*(run_gather(executor, max(1, limit // runs), calls[i:i + share])
                                  for i in range(0, len(calls), share)))
    return time.perf_counter() - started, [result for _, result, _ in done], [context for _, _, context in done]


class Legs:
    """Running sums of where each read completion's slot time went (O(1) memory: a 100,000-unit run would keep
    17 MB of per-unit tuples in the coordinator it measures)."""

    def __init__(self) -> None:
        self.n = 0
        self.first_sent = float("inf")
        self.last_read = 0.0
        self.queued_ms = self.run_ms = self.held_s = 0.0

    def add(self, sent: float, queued_ms: float, run_ms: float, read: float) -> None:
        self.n += 1
        self.first_sent, self.last_read = min(self.first_sent, sent), max(self.last_read, read)
        self.queued_ms += queued_ms
        self.run_ms += run_ms
        self.held_s += read - sent


class LegTimer(TimedExecutor):
    """Also notes, for each completion the coordinator reads, when its unit was sent, how long it waited for a worker
    (queued_ms), ran there (run_ms), and when it was read: where each unit's slot time went. Observes only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.legs = Legs()

    def reset(self) -> None:
        super().reset()
        self.legs = Legs()

    def _dispatcher(self) -> Any:
        dispatcher = super()._dispatcher()
        if "resolve" not in vars(dispatcher):
            resolve = dispatcher.resolve

            def noted(completion: Any) -> None:
                entry = dispatcher.inflight.get(completion.execution_id)
                unit = getattr(entry, "unit", None)
                if unit is not None and completion.run_ms:
                    self.legs.add(unit.sent_at, completion.queued_ms, completion.run_ms, time.time())
                resolve(completion)

            dispatcher.resolve = noted
        return dispatcher


def slot_legs(legs: Legs, limit: int) -> dict[str, float]:
    """Mean ms per unit of a slot's time from the first send to the last completion read, limit x span = (run +
    idle) x N: the worker's run and the slot idle (between a unit's end and the next start on that slot, the first
    wave's sending and the last wave's tail included); and the legs off the slot: send -> worker start (the wait
    for a slot on the worker included) and worker end -> coordinator read."""
    if not legs.n:
        return {}
    n = legs.n
    span = legs.last_read - legs.first_sent
    return {"send_to_start": legs.queued_ms / n,
            "run": legs.run_ms / n,
            "end_to_read": (1000 * legs.held_s - legs.queued_ms - legs.run_ms) / n,
            "idle": 1000 * limit * span / n - legs.run_ms / n}


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


async def run_redis_bytes(settings: TasktreeSettings, run_id: str) -> dict[str, int]:
    """Bytes of Redis memory (MEMORY USAGE, every field counted) each of the run's keys holds after the run: what
    the run keeps for TASKTREE_RUN_RETENTION."""
    from tasktree_dist.distributed import keys

    client = connect(settings.redis_url, asynchronous=True)
    try:
        named = {"units": keys.units(run_id), "events": keys.events(run_id), "trace": keys.trace(run_id),
                 "run": keys.run(run_id)}
        return {name: int(await client.memory_usage(key, samples=0) or 0) for name, key in named.items()}
    finally:
        await client.aclose()


def redis_calls(url: str) -> dict[str, int]:
    """Commands the redis-server has run so far, by name (INFO commandstats; a script's own commands count too)."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(url)
    try:
        return {name.removeprefix("cmdstat_"): int(stats["calls"])
                for name, stats in client.info("commandstats").items()}
    finally:
        client.close()


class Masters:
    """Commands (by name) of each master of a Redis Cluster, or of the single redis-server, and keys per master."""

    def __init__(self, cluster: RedisCluster | None, url: str) -> None:
        self.url = url
        self.clients = cluster.clients() if cluster else []

    def calls(self) -> list[dict[str, int]]:
        """Commands each server has run so far, by name (INFO commandstats; a script's own commands count too)."""
        if not self.clients:
            return [redis_calls(self.url)]
        return [{name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in
                 client.info("commandstats").items()} for client in self.clients]

    def keys(self) -> list[int]:
        return [client.dbsize() for client in self.clients]


def share_line(what: str, counts: list[int]) -> str:
    total = sum(counts) or 1
    shares = ", ".join(f"{100 * c / total:.1f} %" for c in counts)
    return f"{what}: {counts} = {shares} (most: {100 * max(counts) / total:.1f} %, goal <= 40 %)"


async def our_round(executor: LegTimer, args: argparse.Namespace, settings: TasktreeSettings, base_url: str,
                    port: int, meter: CPUMeter, masters: Masters) -> dict[str, Any]:
    """One timed round of --n calls (over --runs Gathers), with what the traces and the fake server saw."""
    fake_llm(port, "/reset", "POST")
    calls = [B.Call(i, base_url) for i in range(args.n)]
    executor.reset()
    calls_before = masters.calls()
    meter.start()
    wall, results, contexts = await run_gathers(executor, args.concurrency, calls, args.runs)
    cpu = meter.stop()
    served = [{name: after[name] - before.get(name, 0) for name in after
               if after[name] > before.get(name, 0) and name != "info"}
              for before, after in zip(calls_before, masters.calls(), strict=True)]
    commands = {name: sum(server.get(name, 0) for server in served) for server in served for name in server}
    stats = fake_llm(port, "/stats")
    kept = [await run_redis_bytes(settings, context.run_id or "") for context in contexts]
    redis_bytes = {name: sum(k[name] for k in kept) for name in kept[0]}
    answers = [getattr(data, "final_output", None) for result in results for data in (result.data or [])]
    children = [child for context in contexts
                for gather in [node for node in context.trace_root().walk() if node.kind == "Gather"][:1]
                for child in gather.child_list()]  # past TASKTREE_TRACE_FANOUT_MAX, the first ones: a sample
    per_worker: dict[str, int] = {}
    for child in children:
        name = str(child.attributes.get("worker", "?")).split("@")[0]
        per_worker[name] = per_worker.get(name, 0) + 1
    dispatch, run = unit_delays(children)
    latency = [next((node.attributes.get("latency_ms", 0.0) for node in child.walk() if node.kind == "LLM"), 0.0)
               for child in children]
    return {
        "wall": wall, "cpu": cpu, "stats": stats, "per_worker": per_worker,
        "ok": all(r.is_ok() for r in results) and answers == [f"answer {i}" for i in range(args.n)],
        "messages": len(executor.sends),
        "last_send": (executor.sends[-1] - executor.sends[0]) if executor.sends else 0.0,
        "dispatch": spread(dispatch), "latency": spread(latency),
        "overhead": spread([r - lat for r, lat in zip(run, latency, strict=True)]),
        "sample": len(children), "redis_bytes": redis_bytes, "commands": commands,
        "masters": list(zip(masters.keys(), (sum(server.values()) for server in served), strict=False)),
        "legs": slot_legs(executor.legs, args.concurrency),
    }


async def bench(args: argparse.Namespace, settings: TasktreeSettings, app: Any, base_url: str, port: int,
                meter: CPUMeter, peer: Peer | None, masters: Masters) -> dict[str, Any]:
    """Warm-ups (ours, then the peer's), then --repeat rounds, each ours then the peer's (interleaved, so both
    sides see the same moments of a shared machine). The peer runs in a thread: its calls block."""
    executor = LegTimer(app, settings=settings, batch_size=args.batch_size)
    try:
        warm = [B.Call(i, base_url) for i in range(2 * args.concurrency)]
        _, results, _ = await run_gathers(executor, args.concurrency, warm, args.runs)
        if not all(result.is_ok() for result in results):
            raise RuntimeError(f"warm-up failed: {str(results)[:500]}")
        if peer is not None:
            await asyncio.to_thread(peer.warm)
        runs, peer_runs, rss = [], [], 0.0
        for _ in range(args.repeat):
            if peer is not None and peer.own_meter is not None:
                peer.own_meter.start()
            runs.append(await our_round(executor, args, settings, base_url, port, meter, masters))
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; before the peer's
            if peer is not None and peer.own_meter is not None:
                runs[-1]["peer_idle_cpu"] = sum(peer.own_meter.stop().values())
            if peer is not None:
                print(f"peer round {len(peer_runs) + 1} ...", file=sys.stderr, flush=True)
                peer_runs.append(await asyncio.to_thread(peer.round))
        return {"runs": runs, "peer_runs": peer_runs, "peak_rss_mb": rss}
    finally:
        await executor.aclose()


# --------------------------------------------------------------------------- the peer: a Celery group + sync openai


def peer_cap(args: argparse.Namespace) -> int:
    """The per-process bound the peer's tasks pass (0: none, the pools already hold exactly --concurrency)."""
    return 0 if args.concurrency == args.workers * args.worker_concurrency else args.concurrency // args.workers


class Peer:
    """What the rounds need of a peer: an untimed warm-up, one timed round, and (Ray) a meter of its own processes
    alone, read during our rounds (what it costs the machine while idle)."""

    own_meter: CPUMeter | None = None

    def warm(self) -> None:
        raise NotImplementedError

    def round(self) -> dict[str, Any]:
        raise NotImplementedError


class CeleryPeer(Peer):
    """A Celery group of bench.llm_call tasks + the sync openai client, on our own workers."""

    def __init__(self, app: Any, settings: TasktreeSettings, args: argparse.Namespace, base_url: str, port: int,
                 meter: CPUMeter) -> None:
        import redis as redis_sync

        self.app, self.settings, self.args, self.base_url, self.port, self.meter = (app, settings, args, base_url,
                                                                                     port, meter)
        self.client = redis_sync.Redis.from_url(settings.redis_url)

    def _once(self, n: int, meter: CPUMeter | None) -> dict[str, Any]:
        self.app.conf.task_send_sent_event = self.args.peer_sent_events == "on"
        try:
            return peer_once(self.app, self.client, self.settings, self.args, n, self.base_url, meter)
        finally:
            self.app.conf.task_send_sent_event = True

    def warm(self) -> None:
        if not self._once(2 * self.args.concurrency, None)["ok"]:
            raise RuntimeError("peer warm-up: wrong answers")

    def round(self) -> dict[str, Any]:
        fake_llm(self.port, "/reset", "POST")
        run = self._once(self.args.n, self.meter)
        run["stats"] = fake_llm(self.port, "/stats")
        return run

    def close(self) -> None:
        self.client.close()


class RayActorsPeer(Peer):
    """Ray async actors, one AsyncOpenAI each (benchmarks/ray_peer.py), metered with Ray's own processes."""

    def __init__(self, args: argparse.Namespace, base_url: str, port: int, fake_pid: int) -> None:
        from benchmarks.ray_peer import RayPeer

        self.args, self.port = args, port
        self.ray = RayPeer(base_url, args.workers, args.concurrency)
        pids = self.ray.pids()
        self.own_meter = CPUMeter(pids)
        self.meter = CPUMeter({"coordinator": os.getpid(), **pids, "fake-llm": fake_pid})

    def warm(self) -> None:
        if not self.ray.once(2 * self.args.concurrency, RUN_TIMEOUT_S)["ok"]:
            raise RuntimeError("Ray peer warm-up: wrong answers")

    def round(self) -> dict[str, Any]:
        fake_llm(self.port, "/reset", "POST")
        self.meter.start()
        run = self.ray.once(self.args.n, RUN_TIMEOUT_S)
        run["cpu"] = fold_ray(self.meter.stop())
        run["stats"] = fake_llm(self.port, "/stats")
        return run

    def close(self) -> None:
        self.ray.close()


def fold_ray(cpu: dict[str, float]) -> dict[str, float]:
    """Ray's own processes (gcs_server, raylet, idle workers...) summed as one `ray-system` entry."""
    out = {name: seconds for name, seconds in cpu.items() if not name.startswith("ray-") or "actor" in name}
    out["ray-system"] = sum(seconds for name, seconds in cpu.items() if name.startswith("ray-") and
                            "actor" not in name)
    return out


def peer_once(app: Any, redis: Any, settings: TasktreeSettings, args: argparse.Namespace, n: int, base_url: str,
              meter: CPUMeter | None) -> dict[str, Any]:
    """One group of `n` bench.llm_call tasks; the wall runs from just before apply_async() to the n-th answer."""
    key = f"bench:llm:{uuid.uuid4().hex}"
    cap, per_thread = peer_cap(args), args.peer_client == "thread"
    signatures = [app.signature("bench.llm_call", args=(i, base_url, key, cap, per_thread), queue=settings.queue)
                  for i in range(n)]
    if meter is not None:
        meter.start()
    started = time.perf_counter()
    group(signatures, app=app).apply_async()
    dispatched = time.perf_counter()
    answers: dict[int, str] = {}
    per_worker: dict[str, int] = {}
    while len(answers) < n:
        item = redis.blpop([key], timeout=60)
        if item is None:
            raise TimeoutError(f"peer group: only {len(answers)} of {n} LLM tasks answered within 60 s")
        for raw in [item[1], *(redis.lpop(key, n) or [])]:
            i, answer, worker = json.loads(raw)
            answers[i] = answer
            per_worker[worker] = per_worker.get(worker, 0) + 1
    wall = time.perf_counter() - started
    cpu = meter.stop() if meter is not None else {}
    redis.delete(key)
    ok = answers == {i: f"answer {i}" for i in range(n)}
    return {"wall": wall, "dispatch": dispatched - started, "cpu": cpu, "ok": ok, "per_worker": per_worker}



# --------------------------------------------------------------------------- main


def timeline_line(stats: dict[str, Any], limit: int) -> str:
    """The fake server's view of the slots: mean calls in flight (share of the limit) and the time none was in
    flight between the first request and the last answer (the gaps between waves of calls)."""
    line = stats.get("timeline") or {}
    mean = line.get("mean_in_flight", 0.0)
    return (f"server timeline: mean in flight {mean:.1f} of {limit} ({100 * mean / limit:.1f} %), none in flight "
            f"{1000 * line.get('idle_s', 0.0):.0f} ms in {line.get('idle_gaps', 0)} gaps, over "
            f"{line.get('span_s', 0.0):.3f} s")


def in_flight_share(run: dict[str, Any], limit: int) -> str:
    return f"{100 * run['stats'].get('timeline', {}).get('mean_in_flight', 0.0) / limit:.1f} %"


def per_unit_lines(cpu: dict[str, float], n: int) -> list[str]:
    fleet = sum(seconds for name, seconds in cpu.items() if name != "fake-llm")
    return [f"fleet CPU per unit: {1000 * fleet / n:.2f} ms (all processes but the fake server)",
            f"coordinator CPU per unit: {1000 * cpu.get('coordinator', 0.0) / n:.2f} ms"]


def wait_replica_online(server: RedisServer, timeout: float = 30.0) -> None:
    """Until the master has its replica online (in sync): writes then wait for it."""
    import redis as redis_sync

    deadline = time.monotonic() + timeout
    with redis_sync.Redis(port=server.port) as client:
        while client.info("replication").get("slave0", {}).get("state") != "online":
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica of {server.url} is not in sync after {timeout}s")
            time.sleep(0.05)  # polling with a deadline


def print_peer(args: argparse.Namespace, ideal: float, runs: list[dict[str, Any]],
               peer_runs: list[dict[str, Any]]) -> bool:
    """The peer's figures (best round), then every round side by side; returns whether all its answers were
    right."""
    k, best = args.workers, min(runs, key=lambda r: r["wall"])
    peer = min(peer_runs, key=lambda r: r["wall"])
    print()
    if args.peer == "celery":
        cap = peer_cap(args)
        bound = (f"each worker's create() calls capped at {cap} by a semaphore" if cap else
                 f"the pools' {k} x {args.worker_concurrency} threads")
        name = "celery group + sync openai"
        print(f"peer: Celery group of {args.n} bench.llm_call tasks (sync openai client, one per "
              f"{args.peer_client}), the same {k} workers, calls in flight <= {args.concurrency} ({bound}), "
              f"task_send_sent_event {args.peer_sent_events}")
    else:
        name = "ray async actors + AsyncOpenAI"
        print(f"peer: {k} Ray async actors (one AsyncOpenAI each, max_concurrency {args.concurrency // k}), "
              f"call i to actor i mod {k}, calls in flight <= {args.concurrency}; local Ray cluster started by "
              f"this process (its own processes summed as ray-system)")
    print(f"peer all answers correct: {all(run['ok'] for run in peer_runs)}")
    if len(peer_runs) > 1:
        print(f"peer runs:   {walls(peer_runs)} s (best reported)")
    sent = "apply_async() returned" if args.peer == "celery" else "the last .remote() returned"
    print(f"peer {name}: wall {peer['wall']:.3f} s, ideal/wall {100 * ideal / peer['wall']:.1f} %, "
          f"throughput {args.n / peer['wall']:.0f} calls/s, per worker {args.n / peer['wall'] / k:.0f}; "
          f"{sent} after {peer['dispatch']:.3f} s")
    print(f"peer fake server: {peer['stats'].get('calls')} calls, max_concurrent "
          f"{peer['stats'].get('max_concurrent')}; tasks per worker {dict(sorted(peer['per_worker'].items()))}")
    print(f"peer {timeline_line(peer['stats'], args.concurrency)}")
    print(f"peer {cpu_line(peer['cpu'])}")
    for line in per_unit_lines(peer["cpu"], args.n):
        print(f"peer {line}")
    print(f"ratio peer/tasktree_dist: {peer['wall'] / best['wall']:.2f} x (wall, best of each); "
          f"{sum(peer['cpu'].values()) / sum(best['cpu'].values()):.2f} x (CPU, all processes)")
    print("rounds (ours, then the peer's): wall ours / peer, ideal/wall, fleet CPU per unit, ratio peer/ours")
    for i, (our, their) in enumerate(zip(runs, peer_runs, strict=True), 1):
        fleet = [sum(s for n, s in run["cpu"].items() if n != "fake-llm") / args.n * 1000 for run in (our, their)]
        idle = f"; the peer's idle processes used {our['peer_idle_cpu']:.2f} CPU-s during ours" \
            if "peer_idle_cpu" in our else ""
        print(f"  round {i}: {our['wall']:.3f} / {their['wall']:.3f} s, {100 * ideal / our['wall']:.1f} / "
              f"{100 * ideal / their['wall']:.1f} %, {fleet[0]:.2f} / {fleet[1]:.2f} ms, "
              f"{their['wall'] / our['wall']:.2f} x{idle}")
        print(f"    in flight (server timeline) ours / peer: {in_flight_share(our, args.concurrency)} / "
              f"{in_flight_share(their, args.concurrency)}")
    return all(run["ok"] for run in peer_runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="LLM subtrees in the Gather (1000)")
    parser.add_argument("--concurrency", type=int, default=200,
                        help="the Gather's concurrency_limit = LLM calls in flight across the fleet (200)")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="the fake server's answer delay (200)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, w1 .. wK (2)")
    parser.add_argument("--worker-concurrency", type=int, default=100,
                        help="TASKTREE_WORKER_CONCURRENCY = threads of each worker (100)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help=f"CeleryExecutor batch_size (TASKTREE_BATCH_SIZE's default, {DEFAULT_BATCH})")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed rounds (each ours, then the peer's); the best is reported (1)")
    parser.add_argument("--redis-max-connections", type=int, default=0,
                        help="max_connections in TASKTREE_REDIS_URL's query string, overriding the size of the "
                             "workers' redis.asyncio pool (0: the library's own)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="direct",
                        help="the workers' TASKTREE_LLM_TRANSPORT: openai sends every call through openai-python's "
                        "create(), as the peers do (direct)")
    parser.add_argument("--runs", type=int, default=1,
                        help="runs (Gathers) the N calls are split over, run at once, each limited to concurrency / "
                        "runs (1)")
    parser.add_argument("--redis", choices=["single", "cluster"], default="single",
                        help="the state on the private redis-server (db 1) or on a private 3-master Redis Cluster "
                        "(the broker stays the redis-server) (single)")
    parser.add_argument("--replica", action="store_true",
                        help="give the Redis a replica: run records, completions and snapshots wait for it (WAIT)")
    parser.add_argument("--peer", choices=["none", "celery", "ray"], default="none",
                        help="after each of our rounds, the same batch as a plain Celery group + sync openai "
                             "(celery) or on Ray async actors with one AsyncOpenAI each (ray: needs "
                             "pip install -e '.[bench]') (none)")
    parser.add_argument("--peer-client", choices=["thread", "process"], default="thread",
                        help="the peer's openai.OpenAI clients: one per worker process or one per pool thread "
                             "(thread)")
    parser.add_argument("--peer-sent-events", choices=["off", "on"], default="off",
                        help="the coordinator's task_send_sent_event for the peer's group: off is Celery's "
                             "default, on is the app's (off)")
    add_loop_option(parser)
    args = parser.parse_args(argv)
    k = args.workers
    if k < 1:
        parser.error("--workers must be >= 1")
    if args.concurrency > k * args.worker_concurrency:
        parser.error(f"--concurrency {args.concurrency} is more than {k} workers x --worker-concurrency "
                     f"{args.worker_concurrency}")
    if args.peer == "ray" and args.concurrency % k:
        parser.error("--peer ray needs --concurrency divisible by --workers (each actor takes concurrency / "
                     "workers calls at once)")
    if args.peer == "celery" and peer_cap(args) and args.concurrency % k:
        parser.error(f"--peer celery with --concurrency {args.concurrency} < {k} x --worker-concurrency needs "
                     f"--concurrency divisible by --workers (each worker process then caps its calls at "
                     f"concurrency / workers)")

    if args.runs < 1 or args.concurrency // args.runs < 1:
        parser.error("--runs must be between 1 and --concurrency")
    if args.redis == "cluster" and (args.peer != "none" or args.replica):
        parser.error("--redis cluster runs without a peer or --replica (the peers keep their answers on a single "
                     "Redis; the cluster's masters have no replicas here)")
    load = os.getloadavg()
    server = RedisServer()
    cluster = RedisCluster() if args.redis == "cluster" else None
    replica = RedisServer(options=("--replicaof", "127.0.0.1", str(server.port), "--repl-diskless-sync-delay", "0"))
    llm_process = FakeLLMProcess(args.latency_ms)
    workers: list[WorkerProcess] = []
    peer: Peer | None = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops what was started
    with fleet_stopped_at_exit(workers, llm_process, server, replica, *([cluster] if cluster else [])):
        server.start()
        if args.replica:
            replica.start()
            wait_replica_online(server)
        if cluster is not None:
            cluster.start()
        llm_process.start()
        base_url, port = llm_process.base_url, llm_process.port
        settings, app = start_workers(server, args, workers, count=k, state_url=cluster.url if cluster else None,
                                      TASKTREE_LLM_TRANSPORT=args.transport)
        pids = {"coordinator": os.getpid()}
        pids.update({worker.name: worker.process.pid for worker in workers})  # type: ignore[union-attr]
        pids.update({"fake-llm": llm_process.pid, "redis": server.process.pid})  # type: ignore[union-attr]
        for i, node in enumerate(cluster.nodes if cluster else []):
            pids[f"redis-m{i + 1}"] = node.process.pid  # type: ignore[union-attr]
        if replica.process is not None:
            pids["redis-replica"] = replica.process.pid
        meter = CPUMeter(pids)
        try:
            if args.peer == "celery":
                peer = CeleryPeer(app, settings, args, base_url, port, meter)
            elif args.peer == "ray":
                print("peer: starting a local Ray cluster ...", file=sys.stderr, flush=True)
                peer = RayActorsPeer(args, base_url, port, llm_process.pid)  # type: ignore[arg-type]
            out = coordinator_loop(args)(bench(args, settings, app, base_url, port, meter, peer,
                                               Masters(cluster, settings.redis_url)))
        finally:
            if peer is not None:
                peer.close()
    peak_rss_mb, peer_runs = out["peak_rss_mb"], out["peer_runs"]
    load_end = os.getloadavg()

    runs = out["runs"]
    best = min(runs, key=lambda r: r["wall"])
    wall = best["wall"]
    ideal = args.n * args.latency_ms / 1000 / (args.concurrency // args.runs * args.runs)
    size = max(1, min(args.batch_size, args.concurrency // 4))
    print(f"LLM batch over {k} workers: {args.n} LLM subtrees in a Gather, concurrency_limit {args.concurrency}, "
          f"worker concurrency {args.worker_concurrency} x {k}, fake server latency {args.latency_ms:g} ms "
          f"(own process), batch_size {args.batch_size} (effective {size}), transport {args.transport}, coordinator "
          f"loop {loop_name(args)}{', Redis with 1 replica (writes WAIT for it)' if args.replica else ''}, "
          f"{args.runs} run(s) at once, state on {'a 3-master Redis Cluster' if cluster else 'one redis-server'}")
    print(f"machine: nproc {os.cpu_count()}, Python {sys.version.split()[0]}, load average at start "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    print(f"all answers correct: {best['ok']}")
    if len(runs) > 1:
        print(f"runs:        {walls(runs)} s (best reported)")
    print(f"wall time:   {wall:.3f} s")
    print(f"ideal time:  {ideal:.3f} s  (N x latency / concurrency_limit)")
    print(f"ideal/wall:  {100 * ideal / wall:.1f} %  (goal >= 85 %)")
    print(f"throughput:  {args.n / wall:.0f} calls/s (ideal {args.n / ideal:.0f}), per worker {args.n / wall / k:.0f}")
    print(f"fake server: {best['stats'].get('calls')} calls, max_concurrent {best['stats'].get('max_concurrent')}")
    print(timeline_line(best["stats"], args.concurrency))
    if len(runs) > 1:
        print("in flight (server timeline) by round: " + ", ".join(in_flight_share(r, args.concurrency)
                                                                  for r in runs))
    sample = "" if best["sample"] >= args.n else f" (of the first {best['sample']} kept in the trace)"
    print(f"units:       per worker{sample} {dict(sorted(best['per_worker'].items()))}; {best['messages']} messages, "
          f"the last sent {best['last_send']:.3f} s after the first")
    print(f"per unit{sample}: send -> worker start {best['dispatch']}")
    print(f"             LLM call as the worker's client saw it {best['latency']}")
    print(f"             worker run minus that call {best['overhead']}")
    legs = best["legs"]
    if legs:
        print(f"slot time per unit: worker run {legs['run']:.1f} ms (the LLM's latency {args.latency_ms:g}), slot "
              f"idle {legs['idle']:.1f} ms (first sends and tail included); off the slot: send -> worker start "
              f"{legs['send_to_start']:.1f} ms (a wait for a slot included), worker end -> coordinator read "
              f"{legs['end_to_read']:.1f} ms")
    print(f"{cpu_line(best['cpu'])}")
    for line in per_unit_lines(best["cpu"], args.n):
        print(line)
    print(f"coordinator peak RSS: {peak_rss_mb:.1f} MB")
    kept = best["redis_bytes"]
    print(f"redis bytes per unit: {kept['units'] / args.n:.0f} (unit records; the run's events, trace and record "
          f"add {(kept['events'] + kept['trace'] + kept['run']) / args.n:.0f}; kept for TASKTREE_RUN_RETENTION)")
    commands = sorted(best["commands"].items(), key=lambda item: -item[1])
    print(f"redis commands per unit: {sum(best['commands'].values()) / args.n:.1f} ("
          + ", ".join(f"{name} {count / args.n:.2f}" for name, count in commands[:12]) + ")")
    if cluster is not None:
        print(share_line("keys per master", [keys for keys, _ in best["masters"]]))
        print(share_line("commands per master", [calls for _, calls in best["masters"]]))
    ok = best["ok"]
    if peer_runs:
        ok = print_peer(args, ideal, runs, peer_runs) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
