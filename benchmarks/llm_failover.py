"""Failover between deployments: a batch of LLM calls over two deployments, one of which starts answering 503.

    python benchmarks/llm_failover.py                   # 2,000 calls, 100 ms latency, 50 at a time: about 15 s
    python benchmarks/llm_failover.py --n 10000 --rounds 3

The script starts a private redis-server (flow control's state: cooldowns are pauses there) and two fake
OpenAI-compatible servers in threads of this process, one per deployment of model "fake-gpt"
(`LLMModel(deployments=[LLMDeployment(a), LLMDeployment(b)])`, equal weights, no limits: the Gather's concurrency
is what binds, so one deployment can carry the whole load). Each round runs the same Gather of --n one-LLM items
in one process twice: without an outage, then with deployment B answering 503 to everything once it has served
its share of the first 25 % of the calls (--n / 8 calls). B's calls then fail after their retries, B cools down
fleet-wide for TASKTREE_LLM_COOLDOWN_S (10 s) and the calls move to A; each time the cooldown ends, the calls
that find B again fail and move.

Figures: failed (Gather items that FAILed, goal 0), moved (calls that moved to another deployment), the extra
wall time of the outage run over the run without (goal <= 15 %; the median over --rounds), B's calls.
The last line reads `failed=<n> moved=<n> extra_wall_pct=<x>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DISABLE_TASKTREE_LOGGING", "1")

from broker_config import TasktreeSettings  # noqa: E402
from tasktree_dist import Context, LLMDeployment, LLMModel, LLMProvider, Tree, close_llm_clients  # noqa: E402
from tasktree_dist.llm import limits  # noqa: E402
from tasktree_dist.llm.limiter import close_limiters  # noqa: E402
from tasktree_dist.testing.fake_llm import ThreadedFakeLLM  # noqa: E402
from tasktree_dist.testing.redis_server import RedisServer  # noqa: E402


@dataclass
class Item:
    i: int
    model: LLMModel


@dataclass
class Batch:
    items: list[Item] = field(default_factory=list)


ItemTree = Tree[Item]("FailoverItem").LLM(
    lambda b: b.model, lambda b: [{"role": "user", "content": f"REPLY:answer {b.i}"}], max_tokens=8,
).End()


def batch_tree(concurrency: int) -> Tree[Batch]:
    return Tree[Batch]("FailoverBatch").Gather(
        lambda b: ([ItemTree] * len(b.items), b.items), concurrency_limit=concurrency).End()


async def run_batch(args: argparse.Namespace, model: LLMModel, redis_url: str) -> tuple[float, int, int]:
    """(wall s, failed items, moved calls) of one Gather of args.n calls."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    await client.flushdb()  # no cooldown left from the previous run
    await client.aclose()
    context = Context(enable_python_logging=False)
    started = time.perf_counter()
    async with context.using_blackboard(Batch([Item(i, model) for i in range(args.n)])):
        result = await batch_tree(args.concurrency)(context)
    wall = time.perf_counter() - started
    failed = sum(1 for data in result.data or [] if not hasattr(data, "final_output"))
    moved = sum(1 for node in context.trace_root().walk() if node.kind == "LLM" and node.attributes.get("llm_route"))
    await close_limiters()
    await close_llm_clients()
    return wall, failed, moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="LLM calls per run (2000)")
    parser.add_argument("--concurrency", type=int, default=50, help="calls in flight (the Gather's limit, 50)")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="each fake server's latency (100)")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs (without, with the outage; 1)")
    args = parser.parse_args(argv)

    load = os.getloadavg()
    with RedisServer() as server, ThreadedFakeLLM(latency_ms=args.latency_ms) as a, \
            ThreadedFakeLLM(latency_ms=args.latency_ms) as b:
        redis_url = f"{server.url}/1"
        limits.configure(TasktreeSettings(redis_url=redis_url))
        model = LLMModel("fake-gpt", deployments=[LLMDeployment(LLMProvider(a.base_url, "key-a")),
                                                  LLMDeployment(LLMProvider(b.base_url, "key-b"))])
        extra, outcome, b_calls = [], (0, 0), 0
        for _ in range(args.rounds):
            b.set_fault(None)
            base_wall, base_failed, _ = asyncio.run(run_batch(args, model, redis_url))
            b.reset()
            b.set_fault("fail-503", after_calls=args.n // 8)  # B's half of the first quarter of the calls
            wall, failed, moved = asyncio.run(run_batch(args, model, redis_url))
            b_calls = b.calls
            b.set_fault(None)
            extra.append(100 * (wall - base_wall) / base_wall)
            outcome = (failed + base_failed, moved)
            print(f"round: without outage {base_wall:.2f} s, with {wall:.2f} s ({extra[-1]:+.1f} %), failed "
                  f"{failed + base_failed}, moved {moved}, B answered {b_calls} calls ({args.n // 8} ok)")
    load_end = os.getloadavg()
    print(f"{args.n} calls, {args.concurrency} in flight, {args.latency_ms:g} ms latency; load average "
          f"{load[0]:.2f} at start, {load_end[0]:.2f} at end, nproc {os.cpu_count()}")
    print(f"failed={outcome[0]} moved={outcome[1]} extra_wall_pct={statistics.median(extra):.1f}")
    return 0 if outcome[0] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
