"""Where a node's work runs. Nodes call the executor in their Context and never know the answer.

`LocalExecutor` runs everything in the calling process (tinytasktree semantics). The distributed package
provides an executor that ships work to Celery workers; nodes never import it. The three hooks are the whole
contract: `execute` for any node, `run_parallel` and `run_gather` for the two nodes whose branches an executor
may place elsewhere as units.

An executor may also define `wait_for_signal(context, tracer, request) -> Awaitable[Signal | None]` (WaitFor
calls it; None: the wait's timeout passed): without it, the context's in-process Mailbox answers waits.

An executor may also define `run_scope(tree, context, body) -> Awaitable[Result]`: a top-level `await tree(context)`
then runs `body()` inside it (the distributed executor records a run there: its id, state, lease and trace).

The protocol names no node class, no tree and not the Context (context.py imports this module): what an executor
needs of them is spelled out by the small protocols below, so dependencies point one way (nodes -> executor).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, runtime_checkable

from .result import Result
from .signals import Signal, WaitRequest
from .trace import TraceNode

#: The run's Context (core.context), passed through untouched: annotated loosely because context.py imports us.
ContextArg = Any


class RunnableNode(Protocol):
    """What an executor needs of any node: its address, its placement and its own logic."""

    address: str
    KIND: str

    def _impl(self, context: ContextArg, tracer: TraceNode) -> Awaitable[Result]: ...


class RunnableTree(Protocol):
    """A built, named tree (builder.Tree) as executors and Gather see it."""

    name: str
    fullname: str
    fingerprint: str

    def __call__(self, context: ContextArg, index: int | None = None) -> Awaitable[Result]: ...


class ParallelNode(RunnableNode, Protocol):
    """A Parallel: children run concurrently; `run_local` runs them all in this process."""

    concurrency_limit: int

    def children(self) -> list[Any]: ...

    def run_local(self, context: ContextArg) -> Awaitable[list[Result]]: ...

    def progress(self, context: ContextArg, total: int) -> Any: ...


class GatherNode(RunnableNode, Protocol):
    """A Gather: trees each on their own blackboard; `run_local` runs them all in this process."""

    concurrency_limit: int

    def run_local(
        self, context: ContextArg, trees: list[RunnableTree], blackboards: list[Any]
    ) -> Awaitable[list[Result]]: ...

    def progress(self, context: ContextArg, total: int) -> Any: ...


@runtime_checkable
class Executor(Protocol):
    """Decides where a node's own logic runs. Nodes call it; it knows no node classes: LocalExecutor runs
    everything here, CeleryExecutor ships work to a fleet and keeps control flow in the coordinator."""

    def execute(self, node: RunnableNode, context: ContextArg, tracer: TraceNode) -> Awaitable[Result]:
        """Run `node`'s own logic (`node._impl(context, tracer)`), here or elsewhere."""
        ...

    def run_parallel(self, node: ParallelNode, context: ContextArg, tracer: TraceNode) -> Awaitable[list[Result]]:
        """Run a Parallel's children concurrently (at most node.concurrency_limit); results in child order."""
        ...

    def run_gather(
        self,
        node: GatherNode,
        context: ContextArg,
        tracer: TraceNode,
        trees: list[RunnableTree],
        blackboards: list[Any],
    ) -> Awaitable[list[Result]]:
        """Run each tree on its blackboard (at most node.concurrency_limit at once); results in tree order."""
        ...


class LocalExecutor:
    """Runs every node in-process; `execute` returns the node's coroutine itself, adding no frame to the hot path."""

    __slots__ = ()

    def execute(self, node: RunnableNode, context: ContextArg, tracer: TraceNode) -> Awaitable[Result]:
        return node._impl(context, tracer)

    def run_parallel(self, node: ParallelNode, context: ContextArg, tracer: TraceNode) -> Awaitable[list[Result]]:
        return node.run_local(context)

    def run_gather(
        self,
        node: GatherNode,
        context: ContextArg,
        tracer: TraceNode,
        trees: list[RunnableTree],
        blackboards: list[Any],
    ) -> Awaitable[list[Result]]:
        return node.run_local(context, trees, blackboards)

    def wait_for_signal(
        self, context: ContextArg, tracer: TraceNode, request: WaitRequest
    ) -> Awaitable[Signal | None]:
        return context.mailbox.wait(request)

    def __repr__(self) -> str:
        return "LocalExecutor()"
