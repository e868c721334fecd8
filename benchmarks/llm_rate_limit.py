"""Fleet-wide LLM rate limits under load: a batch over two workers against a fake server that limits a TPM and an RPM.

    python benchmarks/llm_rate_limit.py                           # 2,000 items, 10 s windows: about 80 s
    python benchmarks/llm_rate_limit.py --window-s 60 --minutes 3  # the full version: real per-minute windows

The script starts a private redis-server (broker db 0, tasktree state db 1), the fake OpenAI-compatible server in
its own process with `--rpm/--tpm/--window-s` limits on model "fake-limited" (a request over a limit is refused
with 429 and Retry-After; the server counts what it admitted per fixed window of its clock), and two
`celery -A worker worker` processes whose TASKTREE_LLM_LIMITS set the same limits for that model: the client
knows the provider's limits, as an operator would configure them. It stops everything by PID at the end.

The coordinator runs one Gather of N "DistBenchLimitedCall" subtrees (benchmarks/bench_trees.py): one LLM call
of 2 + --words prompt tokens and 4 completion tokens as the fake server counts them. The limits are chosen so
TPM binds (--minutes of work at the limit), with RPM 1.5 times what the TPM allows (enforced, not binding).

Figures:
- achieved_tpm: the tokens the server admitted per window, averaged over the windows strictly between the first
  and the last one with admissions (the first and the last are partial: the batch starts and ends inside them),
  per minute. Goal: at least 90 % of limit_tpm.
- windows_over_limit: the server's windows in which it refused a request for a limit (0: the fleet never asked
  for more than the limit). failed: Gather items that FAILed (goal 0).
- waits: from the trace (each LLM node's llm_attempts), how many calls waited and for what.
- the limiter's CPU per call when no limit binds, with the workers stopped, two ways (goal <= 0.1 ms):
  isolated: 10,000 calls (100 at a time) through the flow-control gate with limits that never bind and a stub
  attempt in place of HTTP, minus the same calls ungoverned, median of 5 rounds (steady to about 0.01 ms);
  end to end: the same LLM calls (a Gather of --cpu-calls, concurrency 100) against the fake server on a model
  without limits and on one whose limits never bind, alternately --cpu-rounds times, the median difference of
  this process's CPU per call (it moves by 0.1 ms from round to round with whatever else the machine runs), and
  the redis-server's CPU per governed call (the script's work).
The last line reads `achieved_tpm=<n> limit_tpm=<n> windows_over_limit=<n> failed=<n>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
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
    cpu_line,
    cpu_seconds,
    fleet_stopped_at_exit,
    start_workers,
)
from broker_config import TasktreeSettings  # noqa: E402
from tasktree_dist import (  # noqa: E402
    Context,
    LLMModel,
    TraceNode,
    Tree,
    close_llm_clients,
    flow_stats,
    get_llm_client,
)
from tasktree_dist.distributed import CeleryExecutor  # noqa: E402
from tasktree_dist.llm import flow, limits  # noqa: E402
from tasktree_dist.llm.limiter import close_limiters  # noqa: E402
from tasktree_dist.testing.fleet import FakeLLMProcess, WorkerProcess  # noqa: E402
from tasktree_dist.testing.redis_server import RedisServer  # noqa: E402

RUN_TIMEOUT_S = 1800.0


def server_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        return json.loads(response.read())


# --------------------------------------------------------------------------- the limited batch over the fleet


async def run_fleet(args: argparse.Namespace, settings: Any, app: Any, base_url: str) -> tuple[float, Any, Context]:
    executor = CeleryExecutor(app, settings=settings, batch_size=args.batch_size)
    tree = B.llm_gather(args.concurrency, limited=True)
    context = Context(executor=executor, enable_python_logging=False)
    calls = [B.Call(i, base_url, args.words) for i in range(args.n)]
    try:
        started = time.perf_counter()
        async with context.using_blackboard(B.CallBatch(calls)):
            result = await asyncio.wait_for(tree(context), RUN_TIMEOUT_S)
        return time.perf_counter() - started, result, context
    finally:
        await executor.aclose()


def achieved_per_window(stats: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Tokens and requests the server admitted in each window of the limited model, oldest first."""
    windows = [w for w in stats["limits"]["windows"] if w["model"] == B.LIMITED_MODEL and w["requests"]]
    windows.sort(key=lambda w: w["index"])
    return [w["tokens"] for w in windows], [w["requests"] for w in windows]


def waits_from_trace(context: Context) -> tuple[int, float, dict[str, int], int]:
    """(calls that waited, total seconds waited, waits by reason, attempts) over every LLM node of the run."""
    waited, seconds, reasons, attempts = 0, 0.0, {}, 0
    for node in context.trace_root().walk():
        if node.kind != "LLM":
            continue
        for attempt in node.attributes.get("llm_attempts", []):
            attempts += 1
            if attempt.get("waited_for"):
                waited += 1
                seconds += attempt["wait_ms"] / 1000
                reasons[attempt["waited_for"]] = reasons.get(attempt["waited_for"], 0) + 1
    return waited, seconds, reasons, attempts


# --------------------------------------------------------------------------- the limiter's CPU per call


async def limiter_cpu(args: argparse.Namespace, base_url: str, redis_pid: int) -> tuple[list[float], float]:
    """Per round: this process's CPU per call governed minus ungoverned (ms); and the redis-server's CPU per
    governed call (ms, median)."""
    tree = Tree[Any]("BenchCPUCall").LLM(
        lambda b: b[1], lambda b: [{"role": "user", "content": f"REPLY:answer {b[0]}"}], api_key="sk-bench",
        base_url=base_url, max_tokens=8,
    ).End()
    batch = Tree[list[Any]]("BenchCPUBatch").Gather(lambda calls: ([tree] * len(calls), calls),
                                                     concurrency_limit=100).End()
    free = "fake-free"
    governed = LLMModel("fake-free", rpm=10**9, tpm=10**12, concurrency=10**6)

    async def once(model: Any) -> tuple[float, float]:
        context = Context(enable_python_logging=False)
        redis_before, cpu = cpu_seconds(redis_pid), time.process_time()
        async with context.using_blackboard([(i, model) for i in range(args.cpu_calls)]):
            result = await batch(context)
        if not result.is_ok():
            raise RuntimeError(f"CPU run failed: {str(result)[:300]}")
        return time.process_time() - cpu, cpu_seconds(redis_pid) - redis_before

    await once(free)
    await once(governed)  # warm-up: connections, the script loaded, the plan worked out
    deltas, redis_ms = [], []
    for _ in range(args.cpu_rounds):
        plain, _ = await once(free)
        limited, redis_cpu = await once(governed)
        deltas.append((limited - plain) / args.cpu_calls * 1000)
        redis_ms.append(redis_cpu / args.cpu_calls * 1000)
    return deltas, statistics.median(redis_ms)


class _StubAttempt:
    """In place of the direct transport's HTTP attempt: the gate's own cost is what is measured."""

    payload = b"x" * 150

    async def send_once(self, attempt: int) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"choices": []}


async def isolated_limiter_cpu(rounds: int = 5, calls: int = 10_000) -> list[float]:
    """Per round: CPU per call (ms) of calls through the gate with never-binding limits minus ungoverned ones."""
    client = get_llm_client("http://127.0.0.1:9/v1", "sk-bench")
    governed = LLMModel("fake-free", rpm=10**9, tpm=10**12, concurrency=10**6)
    stub, request = _StubAttempt(), {"model": "fake-free", "messages": [{"role": "user", "content": "hi"}]}

    async def run(model: LLMModel | None, n: int) -> float:
        slots, context = asyncio.Semaphore(100), Context()

        async def one() -> None:
            async with slots:
                gate = flow.gate(context, TraceNode("LLM", "LLM"), client, "fake-free", model, request, stub)
                if gate is None:
                    await stub.send_once(0)
                else:
                    await gate.send(client, stub, request)  # type: ignore[arg-type]
                    gate.settle({"prompt": 10, "completion": 8, "total": 18}, None)

        cpu = time.process_time()
        await asyncio.gather(*(one() for _ in range(n)))
        return time.process_time() - cpu

    await run(governed, 2000)
    await run(None, 2000)
    deltas = []
    for _ in range(rounds):
        plain = await run(None, calls)
        deltas.append((await run(governed, calls) - plain) / calls * 1000)
    return deltas


async def cpu_phase(
    args: argparse.Namespace, base_url: str, redis_url: str, redis_pid: int
) -> tuple[list[float], list[float], float]:
    limits.configure(TasktreeSettings(redis_url=redis_url))
    try:
        return await isolated_limiter_cpu(), *await limiter_cpu(args, base_url, redis_pid)
    finally:
        await close_limiters()
        await close_llm_clients()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="LLM subtrees in the Gather (2000)")
    parser.add_argument("--window-s", type=float, default=10.0, help="the limits' window on server and client (10)")
    parser.add_argument("--minutes", type=float, default=1.25,
                        help="how long the batch takes at the TPM limit; sets the limit (1.25)")
    parser.add_argument("--words", type=int, default=24, help="filler words per prompt: tokens per call (24)")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="the fake server's answer delay (100)")
    parser.add_argument("--concurrency", type=int, default=200, help="the Gather's concurrency_limit (200)")
    parser.add_argument("--worker-concurrency", type=int, default=100, help="threads of each of the 2 workers (100)")
    parser.add_argument("--batch-size", type=int, default=16, help="CeleryExecutor batch_size (16)")
    parser.add_argument("--margin-s", type=float, default=0.25, help="TASKTREE_LLM_WINDOW_MARGIN_S (0.25)")
    parser.add_argument("--cpu-calls", type=int, default=4000, help="calls per CPU measurement run (4000)")
    parser.add_argument("--cpu-rounds", type=int, default=7, help="CPU measurement rounds; the median is shown (7)")
    parser.add_argument("--redis-max-connections", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    call_tokens = 2 + args.words + B.LIMITED_COMPLETION_TOKENS
    per_minute = args.n * call_tokens / args.minutes
    tpm_window = round(per_minute * args.window_s / 60)
    rpm_window = round(1.5 * tpm_window / call_tokens)
    limit_tpm, limit_rpm = tpm_window * 60 / args.window_s, rpm_window * 60 / args.window_s
    client_limits = {B.LIMITED_MODEL: {"rpm": rpm_window, "tpm": tpm_window, "window_s": args.window_s}}

    load = os.getloadavg()[0]
    server = RedisServer()
    llm_process = FakeLLMProcess(args.latency_ms, rpm=rpm_window, tpm=tpm_window, window_s=args.window_s,
                                 limit_models=(B.LIMITED_MODEL,))
    workers: list[WorkerProcess] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops what was started
    with fleet_stopped_at_exit(workers, llm_process, server):
        server.start()
        llm_process.start()
        settings, app = start_workers(
            server, args, workers, TASKTREE_LLM_LIMITS=json.dumps(client_limits),
            TASKTREE_LLM_WINDOW_MARGIN_S=str(args.margin_s),
        )
        redis_pid = server.process.pid  # type: ignore[union-attr]
        meter = CPUMeter({"coordinator": os.getpid(), "w1": workers[0].process.pid,  # type: ignore[union-attr]
                          "w2": workers[1].process.pid, "fake-llm": llm_process.pid,  # type: ignore[union-attr]
                          "redis": redis_pid})
        meter.start()
        wall, result, context = asyncio.run(run_fleet(args, settings, app, llm_process.base_url))
        cpu = meter.stop()
        stats = server_stats(llm_process.port)
        for worker in workers:  # a quiet machine for the CPU measurement
            worker.stop()
        isolated, deltas, redis_ms = asyncio.run(cpu_phase(args, llm_process.base_url, f"{server.url}/1", redis_pid))

    failed = sum(1 for data in (result.data or []) if not hasattr(data, "final_output"))
    tokens, requests = achieved_per_window(stats)
    full = tokens[1:-1]
    achieved = statistics.mean(full) * 60 / args.window_s if full else 0.0
    limit_stats = stats["limits"]
    waited, waited_s, reasons, attempts = waits_from_trace(context)
    total_tokens = sum(tokens)
    print(f"LLM rate limits over 2 workers: {args.n} LLM subtrees ({call_tokens} tokens each as the server counts), "
          f"Gather concurrency {args.concurrency}, worker concurrency {args.worker_concurrency} x 2, fake server "
          f"latency {args.latency_ms:g} ms (own process)")
    print(f"limits per {args.window_s:g} s window, on the server and in TASKTREE_LLM_LIMITS: {tpm_window} tokens, "
          f"{rpm_window} requests ({limit_tpm:.0f} tpm, {limit_rpm:.0f} rpm); client margin {args.margin_s:g} s")
    print(f"machine: nproc {os.cpu_count()}, Python {sys.version.split()[0]}, load average at start {load:.2f}")
    print(f"wall time: {wall:.1f} s; items ok {args.n - failed}, failed {failed}")
    print(f"server: {sum(requests)} calls admitted ({total_tokens} tokens), {limit_stats['rate_limited']} refused "
          f"with 429; most in one window: {limit_stats['max_window_tokens']}/{tpm_window} tokens, "
          f"{limit_stats['max_window_requests']}/{rpm_window} requests")
    print(f"tokens per window: {tokens}")
    print(f"achieved over the {len(full)} full windows: {achieved:.0f} tpm = {100 * achieved / limit_tpm:.1f} % of "
          f"the limit (goal >= 90 %); over the whole run {total_tokens / wall * 60:.0f} tpm")
    print(f"waits (trace): {waited} of {attempts} attempts waited, {waited_s:.0f} s in all, by reason {reasons}")
    print(cpu_line(cpu))
    print(f"limiter CPU per call when no limit binds (goal <= 0.1 ms): isolated {statistics.median(isolated):.3f} ms "
          f"(rounds {', '.join(f'{d:.3f}' for d in isolated)}); end to end {statistics.median(deltas):.3f} ms "
          f"median of {len(deltas)} rounds of {args.cpu_calls} calls (rounds {', '.join(f'{d:.3f}' for d in deltas)});"
          f" redis-server {redis_ms:.3f} ms per call")
    print(f"this process's flow counters: {flow_stats().snapshot()}")
    print(f"achieved_tpm={achieved:.0f} limit_tpm={limit_tpm:.0f} "
          f"windows_over_limit={limit_stats['windows_over_limit']} failed={failed}")
    return 0 if failed == 0 and limit_stats["windows_over_limit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
