"""Throughput of many LLM calls from one process: a Gather of N one-LLM subtrees against a fake server with latency.

    python benchmarks/llm_batch_local.py                                   # 500 calls, concurrency 100, 100 ms
    python benchmarks/llm_batch_local.py --calls 2000 --concurrency 200 --latency-ms 200
    python benchmarks/llm_batch_local.py --transport openai                 # every call through create()
    python benchmarks/llm_batch_local.py --bare                             # also the same calls without the tree
    python benchmarks/llm_batch_local.py --profile                          # cProfile of the timed run (top 25)

The fake OpenAI-compatible server runs in a separate process (`python -m tasktree_dist.testing.fake_llm`), so its
CPU does not share the benchmark's event loop; it is stopped by PID at the end, and its CPU over the timed run is
read from /proc. The calls go over HTTP through the LLM node's transport (TASKTREE_LLM_TRANSPORT, or --transport):
"direct" (orjson and the lean HTTP/1.1 client configured by the openai client, the default), "direct-aiohttp",
"openai" (`client.chat.completions.create` over aiohttp) or "openai-httpx".
A warm-up batch of `concurrency` calls (not timed) opens the connections and
pays the one-off import and client-building costs; then one `await tree(ctx)` of the whole Gather is timed.

Both processes run uvloop where it is installed (tasktree_dist.core.tuning; TASKTREE_UVLOOP=0: asyncio's loop).

Ideal time = calls x latency / concurrency (every slot busy with server latency, zero client overhead);
efficiency = ideal / wall, as a % of ideal throughput. The goal is >= 90 %.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("DISABLE_TASKTREE_LOGGING", "1")

from tasktree_dist import Context, Tree, close_llm_clients
from tasktree_dist.core import tuning
from tasktree_dist.testing.fleet import FakeLLMProcess


@dataclass
class Call:
    i: int
    base_url: str


call_tree = (
    Tree[Call]("BenchLLMCall")
    .LLM("fake-gpt", lambda b: [{"role": "user", "content": f"REPLY:answer {b.i}"}], api_key="sk-bench",
         base_url=lambda b: b.base_url)
    .End()
)


def batch_tree(concurrency: int) -> Tree[Any]:
    return Tree[list[Call]]("BenchLLMBatch").Gather(lambda calls: ([call_tree] * len(calls), calls),
                                                    concurrency_limit=concurrency).End()


async def run_batch(tree: Tree[Any], calls: list[Call]) -> tuple[float, float, Any, Context]:
    """(wall seconds, CPU seconds of this process, result, context) of one run of the batch tree."""
    context = Context(enable_python_logging=False)
    cpu, started = time.process_time(), time.perf_counter()
    async with context.using_blackboard(calls):
        result = await tree(context)
    return time.perf_counter() - started, time.process_time() - cpu, result, context


def transports(context: Context) -> str:
    """How the run's LLM calls were sent, from their traces' `transport` attribute."""
    seen = {node.attributes.get("transport", "?") for node in context.trace_root().walk() if node.kind == "LLM"}
    return ", ".join(sorted(seen))


async def run_bare(base_url: str, n: int, concurrency: int) -> tuple[float, float]:
    """The same calls without the tree, on the same client and transport: the transport's own ceiling."""
    from tasktree_dist import get_llm_client
    from tasktree_dist.llm import direct as llm_direct

    client = get_llm_client(base_url, "sk-bench")
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        messages = [{"role": "user", "content": f"REPLY:answer {i}"}]
        request = {"model": "fake-gpt", "messages": messages, "stream": False}
        async with limit:
            direct = llm_direct.prepare(client, request)
            await (client.chat.completions.create(**request) if direct is None else direct.send())

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - started, time.process_time() - cpu


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(args: argparse.Namespace, base_url: str, server_pid: int) -> dict[str, Any]:
    tree = batch_tree(args.concurrency)
    warm = [Call(i, base_url) for i in range(args.concurrency)]
    _, _, result, context = await run_batch(tree, warm)
    if not result.is_ok():
        raise RuntimeError(f"warm-up failed: {result}")
    transport = transports(context)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    calls = [Call(i, base_url) for i in range(args.calls)]
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    server_cpu = process_cpu_s(server_pid)
    started_at = time.time()
    wall, cpu, result, context = await run_batch(tree, calls)
    server_cpu = process_cpu_s(server_pid) - server_cpu
    timing = call_timing(context, started_at, args.concurrency)
    if profiler is not None:
        profiler.disable()
    bare = await run_bare(base_url, args.calls, args.concurrency) if args.bare else None
    await close_llm_clients()
    ok = result.is_ok() and [r.final_output for r in result.data] == [f"answer {i}" for i in range(args.calls)]
    return {"wall": wall, "cpu": cpu, "server_cpu": server_cpu, "ok": ok, "profiler": profiler, "bare": bare,
            "transport": transport, "loop": type(asyncio.get_running_loop()).__module__.split(".")[0], **timing}


def call_timing(context: Context, started_at: float, concurrency: int) -> dict[str, Any]:
    """From the trace: when the first `concurrency` calls had all started (the ramp-up: every later call of a slot
    starts after its predecessor), and each call's latency as the node saw it."""
    llm = [node for node in context.trace_root().walk() if node.kind == "LLM"]
    starts = sorted(node.started for node in llm)
    latencies = sorted(node.attributes.get("latency_ms", 0.0) for node in llm)
    ramp = (starts[min(concurrency, len(starts)) - 1] - started_at) if starts else 0.0
    at = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0  # noqa: E731
    return {"ramp_s": ramp, "latency": (at(0.5), at(0.9), latencies[-1] if latencies else 0.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--transport", choices=["direct", "direct-aiohttp", "openai", "openai-httpx"], default=None,
                        help="how the LLM node sends its calls (default: TASKTREE_LLM_TRANSPORT)")
    parser.add_argument("--bare", action="store_true", help="also time the same calls without the tree")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.collect() and gc.freeze() again after the warm-up (the LLM node already froze the "
                             "objects alive after its imports: core.tuning.freeze_gc_once)")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed run and print the top functions")
    args = parser.parse_args(argv)
    from tasktree_dist.core.settings import get_settings
    from tasktree_dist.llm import clients as llm_clients

    if args.transport:
        get_settings().llm_transport = args.transport

    with FakeLLMProcess(args.latency_ms) as server:
        out = tuning.run(bench(args, server.base_url, server.pid))  # uvloop unless TASKTREE_UVLOOP=0

    wall, cpu = out["wall"], out["cpu"]
    ideal = args.calls * args.latency_ms / 1000 / args.concurrency
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    backend = f", HTTP backend {llm_clients.http_backend()}" if "openai" in out["transport"] else ""
    print(f"LLM batch, one process: {args.calls} calls, concurrency {args.concurrency}, "
          f"server latency {args.latency_ms:g} ms (fake server in its own process)")
    print(f"transport:   {out['transport']}{backend}{', gc.freeze() after the warm-up' if args.gc_freeze else ''}; "
          f"event loop {out['loop']} (both processes)")
    print(f"all answers correct: {out['ok']}")
    print(f"wall time:   {wall:.3f} s")
    print(f"ideal time:  {ideal:.3f} s  (calls x latency / concurrency)")
    print(f"efficiency:  {100 * ideal / wall:.1f} % of ideal throughput")
    print(f"throughput:  {args.calls / wall:.0f} calls/s (ideal {args.calls / ideal:.0f})")
    print(f"client CPU:  {cpu:.3f} s  ({1000 * cpu / args.calls:.2f} ms per call; the loop saturates at "
          f"{args.calls / cpu:.0f} calls/s)")
    print(f"server CPU:  {out['server_cpu']:.2f} s  ({1000 * out['server_cpu'] / args.calls:.2f} ms per call, "
          "the fake server's, from /proc)")
    median, p90, worst = out["latency"]
    print(f"call latency as the node saw it: median {median:.0f}, p90 {p90:.0f}, max {worst:.0f} ms "
          f"(server {args.latency_ms:g} ms)")
    ramp = out["ramp_s"]
    print(f"ramp-up:     the first {args.concurrency} calls had all started after {1000 * ramp:.0f} ms; a slot's "
          f"calls run back to back, so wall >= ramp-up + ideal: at most {100 * ideal / (ideal + ramp):.1f} % "
          "even with no other overhead")
    print(f"peak RSS:    {peak_rss_mb:.1f} MB")
    if out["bare"] is not None:
        bare_wall, bare_cpu = out["bare"]
        print(f"same calls without the tree: wall {bare_wall:.3f} s ({100 * ideal / bare_wall:.1f} % of ideal), "
              f"CPU {1000 * bare_cpu / args.calls:.2f} ms per call")
    if out["profiler"] is not None:
        import pstats

        pstats.Stats(out["profiler"]).sort_stats("tottime").print_stats(25)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
