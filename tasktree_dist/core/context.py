"""Context: the per-run state every node sees (blackboard stack, trace position, last result, executor).

Concurrent branches (Parallel, Gather, Terminable) each run on a fork: the fork shares the trace root and the
executor but has its own blackboard stack, trace position and last result, so branches never see each other's.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

from .errors import TasktreeProgrammingError
from .executor import Executor, LocalExecutor
from .progress import ProgressCallback
from .result import Result
from .signals import Mailbox
from .trace import TraceNode, TraceRoot

T = TypeVar("T")


class RunBudget(Protocol):
    """A run's spending caps (tasktree_dist.Budget, llm/budget.py), opened by each top-level tree call."""

    async def open(self, context: Context) -> None: ...


class Context:
    """One execution of trees: the blackboard stack, the trace being written, the executor deciding where nodes run
    (LocalExecutor in-process, CeleryExecutor across a fleet), and the run id, budget and progress callback.
    Use one per top-level call: `async with context.using_blackboard(b): await tree(context)`."""

    __slots__ = (
        "executor",
        "_blackboards",
        "_tracer",
        "_root",
        "_last_result",
        "enable_python_logging",
        "python_logging_indentifier_name",
        "python_logging_indentifier_value",
        "run_id",
        "on_progress",
        "budget",
        "unit_id",
        "mailbox",
    )

    def __init__(
        self,
        *,
        executor: Executor | None = None,
        trace_root: TraceRoot | None = None,
        blackboard_stack: list[Any] | None = None,
        last_result: Result | None = None,
        enable_python_logging: bool = True,
        python_logging_indentifier_name: str = "",
        python_logging_indentifier_value: str = "",
        run_id: str | None = None,
        on_progress: ProgressCallback | None = None,
        budget: RunBudget | None = None,
    ) -> None:
        self.executor: Executor = executor if executor is not None else LocalExecutor()
        self._blackboards: list[Any] = list(blackboard_stack or ())
        self._root: TraceRoot | None = trace_root
        self._tracer: TraceNode | None = None
        self._last_result = last_result
        # Names (with tinytasktree's spelling) kept so code written for it runs unchanged.
        self.enable_python_logging = enable_python_logging
        self.python_logging_indentifier_name = python_logging_indentifier_name
        self.python_logging_indentifier_value = python_logging_indentifier_value
        #: Identifies the run across processes (set by distributed executors); None in-process.
        self.run_id = run_id
        #: Called with a ProgressEvent as each Gather tree / Parallel child finishes (see progress.py).
        self.on_progress = on_progress
        #: The run's LLM budget (e.g. Budget(max_cost_usd=5)); shared by every branch and, through Redis, worker.
        self.budget = budget
        #: In-process signals answering WaitFor nodes (shared by forks): see `signal`.
        self.mailbox = Mailbox()
        #: The execution id of the shipped unit this context runs (set on workers): the same on a re-dispatch of
        #: the unit, so a side effect keyed by it and the node's trace position (a batched LLM call's custom id)
        #: happens once.
        self.unit_id: str | None = None

    # -- blackboards ------------------------------------------------------------------------------------------
    @asynccontextmanager
    async def using_blackboard(self, b: Any) -> AsyncIterator[None]:
        """Make `b` the current blackboard for the trees run inside the block."""
        self._blackboards.append(b)
        try:
            yield None
        finally:
            self._blackboards.pop()

    def current_blackboard(self, class_: type[T] | None = None) -> T:
        """The current blackboard (`class_` is for type checkers; the innermost blackboard is returned)."""
        if not self._blackboards:
            raise TasktreeProgrammingError("No blackboard!")
        return self._blackboards[-1]

    _current_blackboard = current_blackboard

    @asynccontextmanager
    async def _forward(self, child: str, b: Any = None) -> AsyncIterator[None]:
        """tinytasktree's step into a child (custom nodes call it): our nodes make their own trace node, so only a
        given blackboard is pushed for the child."""
        if b is None:
            yield None
            return
        async with self.using_blackboard(b):
            yield None

    @property
    def blackboard(self) -> Any:
        """The current blackboard, or None outside `using_blackboard`."""
        return self._blackboards[-1] if self._blackboards else None

    # -- trace ------------------------------------------------------------------------------------------------
    def trace_root(self) -> TraceRoot:
        """The trace of the latest top-level run on this context (ROOT, then the tree, then its nodes)."""
        if self._root is None:
            self._root = TraceRoot()
        return self._root

    def current_tracer(self) -> TraceNode:
        """The running node's trace node (the root outside any node)."""
        return self._tracer if self._tracer is not None else self.trace_root()

    def parent_tracer(self, depth: int = 1) -> TraceNode:
        """The trace node `depth` levels above the current one (1 = parent); the root when it is that far up."""
        if depth < 1:
            raise TasktreeProgrammingError("parent_tracer depth must be >= 1")
        node = self.current_tracer()
        for _ in range(depth):
            if node.parent is None:
                break
            node = node.parent
        return node

    def current_path(self) -> list[str]:
        """Names from ROOT to the running node, e.g. ["ROOT", "Tree(Main)", "Sequence", "Function(step)"]."""
        return self._tracer.path if self._tracer is not None else []

    def random_for(self, tracer: TraceNode) -> Any:
        """Randomness for a node's decision: the `random` module in-process; in a recorded run a generator seeded by
        the run id and the node's position in the trace, so a coordinator replaying the run decides the same."""
        if self.run_id is None:
            return random
        return random.Random(f"{self.run_id}:{tracer.position()}")

    @property
    def last_result(self) -> Result | None:
        return self._last_result

    # -- signals ----------------------------------------------------------------------------------------------
    async def signal(self, name: str, payload: Any = None, signal_id: str | None = None) -> bool:
        """Answer the in-process WaitFor waiting for `name` (or the next one to reach it: an early signal is kept).
        Returns False when `signal_id` was recorded before; SignalError if the payload does not fit the wait's
        schema. (A run in the fleet is signalled with `Run.signal`.)"""
        return self.mailbox.signal(name, payload, signal_id)

    # -- forking for concurrent branches ----------------------------------------------------------------------
    def fork(self) -> Context:
        forked = Context.__new__(Context)
        forked.executor = self.executor
        forked._blackboards = list(self._blackboards)
        forked._tracer = self._tracer
        forked._root = self._root
        forked._last_result = self._last_result
        forked.enable_python_logging = self.enable_python_logging
        forked.python_logging_indentifier_name = self.python_logging_indentifier_name
        forked.python_logging_indentifier_value = self.python_logging_indentifier_value
        forked.run_id = self.run_id
        forked.on_progress = self.on_progress
        forked.budget = self.budget
        forked.mailbox = self.mailbox
        forked.unit_id = self.unit_id
        return forked

    def __repr__(self) -> str:
        return f"Context(executor={self.executor!r}, path={self.current_path()!r})"
