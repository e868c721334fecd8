"""Helpers shared by the core test modules: running a tree on a blackboard, reading the trace, recording steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from tasktree_dist import Context, Result, Tree


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


def step(name: str, result: Any = None) -> Callable[[Any], Any]:
    """A function named `name` that records its call in `b.events` and returns `result` (default: its name)."""

    def f(b: Any) -> Any:
        b.events.append(name)
        return name if result is None else result

    f.__name__ = name
    return f
