"""Where a node's work runs. Nodes call the executor in their Context and never know the answer.

`LocalExecutor` runs everything in the calling process (tinytasktree semantics). The distributed package
provides an executor that ships work to Celery workers; nodes never import it. The three hooks are the whole
contract: `execute` for any node, `run_parallel` and `run_gather` for the two nodes whose branches an executor
may place elsewhere as units.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .context import Context
    from .nodes.base import Node
    from .nodes.composites import Gather, Parallel
    from .result import Result
    from .trace import TraceNode
    from .tree import Tree


@runtime_checkable
class Executor(Protocol):
    def execute(self, node: Node, context: Context, tracer: TraceNode) -> Awaitable[Result]:
        """Run `node`'s own logic (`node._impl(context, tracer)`), here or elsewhere."""
        ...

    def run_parallel(self, node: Parallel, context: Context, tracer: TraceNode) -> Awaitable[list[Result]]:
        """Run a Parallel's children concurrently (at most node.concurrency_limit); results in child order."""
        ...

    def run_gather(
        self, node: Gather, context: Context, tracer: TraceNode, trees: list[Tree[Any]], blackboards: list[Any]
    ) -> Awaitable[list[Result]]:
        """Run each tree on its blackboard (at most node.concurrency_limit at once); results in tree order."""
        ...


class LocalExecutor:
    """Runs every node in-process; `execute` returns the node's coroutine itself, adding no frame to the hot path."""

    __slots__ = ()

    def execute(self, node: Node, context: Context, tracer: TraceNode) -> Awaitable[Result]:
        return node._impl(context, tracer)

    def run_parallel(self, node: Parallel, context: Context, tracer: TraceNode) -> Awaitable[list[Result]]:
        from .nodes.composites import local_parallel

        return local_parallel(node, context)

    def run_gather(
        self, node: Gather, context: Context, tracer: TraceNode, trees: list[Tree[Any]], blackboards: list[Any]
    ) -> Awaitable[list[Result]]:
        from .nodes.composites import local_gather

        return local_gather(node, context, trees, blackboards)

    def __repr__(self) -> str:
        return "LocalExecutor()"
