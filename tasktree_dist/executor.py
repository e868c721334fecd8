"""Where a node's work runs. Nodes call `context.executor.execute(node, context)` and never know the answer.

`LocalExecutor` runs everything in the calling process (tinytasktree semantics). The distributed package
provides an executor that ships some nodes to Celery workers; nodes never import it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .context import Context
    from .nodes.base import Node
    from .result import Result
    from .trace import TraceNode


@runtime_checkable
class Executor(Protocol):
    def execute(self, node: Node, context: Context, tracer: TraceNode) -> Awaitable[Result]:
        """Run `node`'s own logic (`node._impl(context, tracer)`) here or elsewhere and return its result."""
        ...


class LocalExecutor:
    """Runs every node in-process: returns the node's coroutine directly, adding no frame to the hot path."""

    __slots__ = ()

    def execute(self, node: Node, context: Context, tracer: TraceNode) -> Awaitable[Result]:
        return node._impl(context, tracer)

    def __repr__(self) -> str:
        return "LocalExecutor()"
