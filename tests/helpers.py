"""Helpers shared by the core test modules: running a tree on a blackboard, reading the trace, recording steps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol

from tasktree_dist import Context, Result, TraceNode, Tree


class Run(Protocol):
    async def __call__(
        self, tree: Tree[Any], bb: Any = None, context: Context | None = None
    ) -> tuple[Result, Context]: ...


def make_run(default_blackboard: Callable[[], Any]) -> Run:
    """A `run(tree, bb=None, context=None)` that runs `tree` on `bb` (or a fresh `default_blackboard()`) in `context`
    (or a new Context) and returns the result and the context."""

    async def run(tree: Tree[Any], bb: Any = None, context: Context | None = None) -> tuple[Result, Context]:
        context = context or Context()
        async with context.using_blackboard(bb if bb is not None else default_blackboard()):
            result = await tree(context)
        return result, context

    return run


async def run_with_executor(tree: Tree[Any], blackboard: Any, executor: Any) -> tuple[Result, Context]:
    """Run `tree` on `blackboard` in a new Context using `executor` (e.g. a CeleryExecutor)."""
    return await make_run(lambda: None)(tree, blackboard, Context(executor=executor))


def node(context: Context, *names: str) -> dict[str, Any]:
    """The trace JSON of the node reached from the tree node through `names`."""
    current = next(iter(context.trace_root().json()["children"].values()))
    for name in names:
        current = current["children"][name]
    return current


def user(text: str) -> list[dict[str, Any]]:
    """A chat of one user message."""
    return [{"role": "user", "content": text}]


def llm_nodes(context: Context) -> list[TraceNode]:
    """The trace nodes of the LLM steps, in order."""
    return [node for node in context.trace_root().walk() if node.kind == "LLM"]


def step(name: str, result: Any = None) -> Callable[[Any], Any]:
    """A function named `name` that records its call in `b.events` and returns `result` (default: its name)."""

    def f(b: Any) -> Any:
        b.events.append(name)
        return name if result is None else result

    f.__name__ = name
    return f


def redis_db(redis_url: str, db: int) -> str:
    """The same Redis server as `redis_url`, database `db`."""
    base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    return f"{base}/{db}"


async def eventually(
    probe: Callable[[], Awaitable[Any]],
    what: str,
    within: float = 20.0,
    interval: float = 0.02,
    detail: Callable[[], str] = lambda: "",
) -> Any:
    """Call `probe` until it returns something truthy; fail after `within` s naming `what`, the last value and
    `detail()` (a log tail, say)."""
    deadline = time.monotonic() + within
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen after {within}s (last: {last!r})\n{detail()}")
        await asyncio.sleep(interval)  # polling with a deadline


@contextlib.asynccontextmanager
async def flow_control_on(url: str, **settings: Any) -> AsyncIterator[Any]:
    """LLM flow control of this process on Redis `url` (database flushed first) with these settings for one test;
    yields a redis.asyncio client on it; the loop's limiters are closed and the settings forgotten after."""
    import redis.asyncio as redis

    from broker_config import TasktreeSettings
    from tasktree_dist.llm import limits
    from tasktree_dist.llm.limiter import close_limiters

    client = redis.Redis.from_url(url)
    await client.flushdb()
    limits.configure(TasktreeSettings(redis_url=url, **settings))
    try:
        yield client
    finally:
        await close_limiters()
        limits.configure(None)
        await client.aclose()


@contextlib.contextmanager
def two_workers(redis_url: str, dbs: tuple[int, int], imports: str, prefix: str, *, concurrency: int = 32,
                own_queues: bool = False, flush: bool = False, state_url: str | None = None,
                **env: str) -> Iterator[dict[str, Any]]:
    """Two real workers `<prefix>1`, `<prefix>2` on their own broker and state databases of `redis_url`, importing
    `imports`; each also reads a queue named after itself when `own_queues`; stopped by PID on the way out.
    `state_url`: run state elsewhere (a Redis Cluster's URL; not flushed), the broker still on `redis_url`.
    Yields {"app", "settings", "env", "workers"}."""
    import redis as redis_sync

    from tasktree_dist.distributed import create_app
    from tasktree_dist.testing.fleet import WorkerProcess, fleet_env, fleet_settings, running_workers

    fleet = fleet_env(redis_db(redis_url, dbs[0]), state_url or redis_db(redis_url, dbs[1]), imports, **env)
    if flush:
        for url in (fleet["TASKTREE_BROKER_URL"], *([] if state_url else [fleet["TASKTREE_REDIS_URL"]])):
            with redis_sync.Redis.from_url(url) as client:
                client.flushdb()
    settings = fleet_settings(fleet)
    app = create_app(settings)
    workers = [
        WorkerProcess(f"{prefix}{i}", fleet, concurrency=concurrency,
                      **({"queues": f"tasktree,tasktree.runs,{prefix}{i}"} if own_queues else {}))
        for i in (1, 2)
    ]
    with running_workers(app, workers):
        yield {"app": app, "settings": settings, "env": fleet, "workers": workers}
