"""The Ray peer of `llm_batch_dist.py --peer ray`: the same LLM batch on Ray async actors, one AsyncOpenAI each.

K actors stand for our K worker processes. Each holds one `openai.AsyncOpenAI(base_url=<fake server>)` (the
library's default httpx client, as a Ray user would write it) and makes the "DistBenchLLMCall" leaf's request
(model "fake-gpt", one user message `REPLY:answer <i>`, api key "sk-bench", `"stream": false`) through
`chat.completions.create()`. The driver (this process, our coordinator) sends call i to actor i mod K and waits
for every answer with `ray.get`. An actor's `max_concurrency` bounds its calls in flight: --concurrency / K, so
the fleet holds the same number of calls in flight as our Gather's limit.

Ray is not a project dependency: `pip install -e '.[bench]'` (or `pip install ray`) installs it. The cluster is a
local one this process starts (`ray.init`, no dashboard) and stops (`ray.shutdown`) itself; the CPU of its
processes (gcs_server, raylet, the actors' workers...) is read from /proc like the rest of the fleet's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "Ray is not installed: pip install -e '.[bench]' (or: .venv/bin/pip install ray)"


class LLMActor:
    """One worker's worth of calls: an async actor with one AsyncOpenAI client, made once and reused."""

    def __init__(self, base_url: str) -> None:
        import openai

        self.client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench")

    async def call(self, i: int) -> str:
        # the same body as benchmarks/bench_trees.py's call_messages (not imported: it would load tasktree_dist)
        response = await self.client.chat.completions.create(
            model="fake-gpt", messages=[{"role": "user", "content": f"REPLY:answer {i}"}], stream=False)
        return response.choices[0].message.content or ""

    def pid(self) -> int:
        return os.getpid()


def children_of(pid: int) -> set[int]:
    """Every live descendant of `pid`, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


class RayPeer:
    """A local Ray cluster with K LLM actors; `once(n)` runs one batch of n calls."""

    def __init__(self, base_url: str, workers: int, concurrency: int) -> None:
        try:
            import ray
        except ImportError:
            raise SystemExit(INSTALL_HINT) from None
        self.ray = ray
        self.base_url = base_url
        self.before = children_of(os.getpid())
        # the actors unpickle LLMActor by reference: they must find `benchmarks` (workers inherit the environment)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 object_store_memory=100 * 1024 * 1024)
        per_actor = max(1, concurrency // workers)
        remote = ray.remote(num_cpus=1, max_concurrency=per_actor)(LLMActor)
        self.actors = [remote.remote(base_url) for _ in range(workers)]
        self.actor_pids = ray.get([actor.pid.remote() for actor in self.actors], timeout=120)
        self.per_actor = per_actor

    def pids(self) -> dict[str, int]:
        """The processes to meter: each actor, and Ray's own (named ray-<pid>), all children of this process."""
        named = {f"ray-actor{k + 1}": pid for k, pid in enumerate(self.actor_pids)}
        others = sorted(children_of(os.getpid()) - self.before - set(self.actor_pids))
        named.update({f"ray-{pid}": pid for pid in others})
        return named

    def once(self, n: int, timeout: float) -> dict[str, Any]:
        """Send n calls (call i to actor i mod K) and wait for every answer; the wall covers both."""
        k = len(self.actors)
        started = time.perf_counter()
        refs = [self.actors[i % k].call.remote(i) for i in range(n)]
        dispatched = time.perf_counter()
        answers = self.ray.get(refs, timeout=timeout)
        wall = time.perf_counter() - started
        ok = answers == [f"answer {i}" for i in range(n)]
        return {"wall": wall, "dispatch": dispatched - started, "ok": ok,
                "per_worker": {f"actor{j + 1}": len(range(j, n, k)) for j in range(k)}}

    def close(self) -> None:
        self.ray.shutdown()
