"""Composite nodes: they decide the order, the concurrency and the combined outcome of their children."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.callables import adapt, callable_name, resolve
from ..core.errors import UnitParks
from ..core.hooks import after_spawned_task, has_hooks
from ..core.progress import ProgressCounter, progress_for
from ..core.result import Result, Status
from ..core.trace import Tracer
from .base import CompositeNode, InternalNode, LeafNode, Node, SingleChildNode
from .leaves import Condition, condition_name

if TYPE_CHECKING:
    from ..core.context import Context
    from ..core.executor import RunnableTree

Branch = tuple["Context", Callable[["Context"], Awaitable[Result]]]


def check_concurrency_limit(node: Node, limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise node.programming_error(f"concurrency_limit must be an integer > 0, got {limit!r}")
    return limit


async def run_branches(
    branches: Seq[Branch], limit: int, name: str, progress: ProgressCounter | None = None
) -> list[Result]:
    """Run each (context, start) branch as its own task, at most `limit` at once; results in branch order.

    A fixed pool of `limit` tasks pulling from a shared index keeps memory flat when a Gather has thousands of
    children. The spawned-task hooks run after each branch. If the caller is cancelled, every branch is too.
    """
    count = len(branches)
    results: list[Result | None] = [None] * count
    if count == 0:
        return []
    position = 0
    hooks = has_hooks()
    parked: list[UnitParks] = []

    async def pull() -> None:
        nonlocal position
        while position < count:
            index = position
            position += 1
            branch_context, start = branches[index]
            parent = branch_context._tracer
            slot = len(parent._children) if parent is not None else 0
            # The branch appends its trace node synchronously when it starts, so it lands at `slot`.
            try:
                result = await start(branch_context)
            except UnitParks as parks:  # its work is out: the others go on, then the unit parks (core.errors)
                parked.append(parks)
                continue
            results[index] = result
            if progress is not None:
                progress.child_done(result.is_ok())
            if hooks:
                tracer = parent._children[slot] if parent is not None else branch_context.current_tracer()
                await after_spawned_task(branch_context, tracer, result)

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pull(), name=f"{name}:{i}") for i in range(min(limit, count))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if parked:
        raise parked[0]
    return results  # type: ignore[return-value]


class Sequence(CompositeNode):
    """Children in order; the first FAIL stops it with FAIL(data of the last OK child, None if none).

    OK(data of the last child) when all succeed, OK(None) when empty (tinytasktree semantics).
    """

    KIND: ClassVar[str] = "Sequence"

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        data = None
        for child in self._children:
            result = await child(context)
            if result.status is Status.FAIL:
                return Result(Status.FAIL, data)
            data = result.data
        return Result(Status.OK, data)


class Selector(CompositeNode):
    """Children in order until one succeeds: the first OK, else FAIL(None). OK(None) when empty."""

    KIND: ClassVar[str] = "Selector"

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        if not self._children:
            return Result(Status.OK, None)
        for child in self._children:
            result = await child(context)
            if result.status is Status.OK:
                return result
        return Result(Status.FAIL, None)


class FanOut:
    """Parallel and Gather: their children are counted for `Context(on_progress=...)`, wherever they run."""

    address: str
    fullname: str

    def progress(self, context: Context, total: int) -> ProgressCounter | None:
        """A counter for this run of the fan-out (None when nobody watches: fan-outs then pay nothing)."""
        return progress_for(context.on_progress, self.address or self.fullname, total)


class Parallel(FanOut, CompositeNode):
    """All children concurrently (at most `concurrency_limit` at once); OK(None) only if every child is OK."""

    KIND: ClassVar[str] = "Parallel"

    def __init__(self, children: list[Node] | None = None, concurrency_limit: int = 3, name: str = "") -> None:
        super().__init__(children, name)
        self.concurrency_limit = check_concurrency_limit(self, concurrency_limit)

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        if not self._children:
            return Result(Status.OK, None)
        tracer.update_attributes(concurrency_limit=self.concurrency_limit)
        results = await context.executor.run_parallel(self, context, tracer)
        failed = [c.trace_name for c, result in zip(self._children, results, strict=True) if not result.is_ok()]
        if failed:
            tracer.log(f"failed children: {', '.join(failed)}", "warning")
            return Result(Status.FAIL, None)
        return Result(Status.OK, None)

    def run_local(self, context: Context) -> Awaitable[list[Result]]:
        """The in-process branches: each child on its own fork of the context."""
        branches = [(context.fork(), child) for child in self._children]
        return run_branches(branches, self.concurrency_limit, self.fullname, self.progress(context, len(branches)))

    def static_params(self) -> dict[str, Any]:
        return {"concurrency_limit": self.concurrency_limit}


class Gather(FanOut, LeafNode):
    """Runs trees, each on its own blackboard, from `params_factory(b) -> (trees, blackboards)`.

    OK(list of each tree's data, in tree order) when all succeed; otherwise FAIL(that list).
    """

    KIND: ClassVar[str] = "Gather"

    def __init__(self, params_factory: Callable[[Any], Any], concurrency_limit: int = 3, name: str = "") -> None:
        super().__init__(name)
        self.params_factory = params_factory
        self._factory = adapt(params_factory, (0, 1), f"Gather {self.fullname!r} params_factory")
        self.concurrency_limit = check_concurrency_limit(self, concurrency_limit)

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        params = await resolve(self._factory(context.blackboard))
        try:
            trees, blackboards = params
            trees, blackboards = list(trees), list(blackboards)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"params_factory must return (trees, blackboards), got {type(params).__name__}") from exc
        if len(trees) != len(blackboards):
            raise ValueError(f"params_factory returned {len(trees)} trees but {len(blackboards)} blackboards")
        tracer.update_attributes(concurrency_limit=self.concurrency_limit, trees=len(trees))
        results = await context.executor.run_gather(self, context, tracer, trees, blackboards)
        data = [result.data for result in results]
        if all(result.is_ok() for result in results):
            return Result(Status.OK, data)
        failed = [i for i, result in enumerate(results) if not result.is_ok()]
        tracer.log(f"{len(failed)} of {len(results)} trees failed, first indices {failed[:10]}", "warning")
        return Result(Status.FAIL, data)

    def run_local(
        self, context: Context, trees: list[RunnableTree], blackboards: list[Any]
    ) -> Awaitable[list[Result]]:
        """The in-process branches: each tree on a fork whose current blackboard is its own."""
        branches: list[Branch] = []
        for index, (tree, blackboard) in enumerate(zip(trees, blackboards, strict=True)):
            branch = context.fork()
            branch._blackboards.append(blackboard)
            branches.append((branch, tree_runner(tree, index)))
        return run_branches(branches, self.concurrency_limit, self.fullname, self.progress(context, len(branches)))

    def static_params(self) -> dict[str, Any]:
        return {"params_factory": callable_name(self.params_factory), "concurrency_limit": self.concurrency_limit}


def tree_runner(tree: RunnableTree, index: int) -> Callable[[Context], Awaitable[Result]]:
    """Run `tree` as Gather child `index` (its trace node is named `{index}_Tree(X)`)."""
    return lambda context: tree(context, index=index)


class RandomSelector(CompositeNode):
    """A Selector over a (weighted) random order of the children."""

    KIND: ClassVar[str] = "RandomSelector"

    def __init__(
        self,
        children: list[Node] | None = None,
        weights: list[float] | Callable[[Any], list[float]] | None = None,
        name: str = "",
    ) -> None:
        super().__init__(children, name)
        self.weights = weights
        self._weights_factory = (
            adapt(weights, (0, 1), f"RandomSelector {self.fullname!r} weights") if callable(weights) else None
        )
        if weights is not None and self._weights_factory is None:
            self.weights = [self._check_weight(w) for w in weights]

    def _check_weight(self, weight: Any) -> float:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise self.programming_error(f"weights must be positive numbers, got {weight!r}")
        return float(weight)

    def OnBuildEnd(self) -> None:  # noqa: N802
        super().OnBuildEnd()
        if isinstance(self.weights, list) and len(self.weights) != len(self._children):
            raise self.programming_error(
                f"has {len(self._children)} children but {len(self.weights)} weights; they must match"
            )

    def _order(self, weights: list[float] | None, rng: Any = random) -> list[Node]:
        if weights is None:
            return rng.sample(self._children, len(self._children))
        # Weighted sampling without replacement: sort by u ** (1 / w) (Efraimidis-Spirakis).
        keys = [rng.random() ** (1.0 / w) for w in weights]
        ranked = sorted(zip(keys, range(len(weights)), strict=True), reverse=True)
        return [self._children[i] for _, i in ranked]

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        if not self._children:
            return Result(Status.OK, None)
        weights = self.weights
        if self._weights_factory is not None:
            weights = list(await resolve(self._weights_factory(context.blackboard)))
            if len(weights) != len(self._children):
                raise ValueError(f"weights factory returned {len(weights)} weights for {len(self._children)} children")
            if not all(isinstance(w, int | float) and not isinstance(w, bool) and w > 0 for w in weights):
                raise ValueError(f"weights must be positive numbers, got {weights!r}")
        order = self._order(weights, context.random_for(tracer))
        tracer.log(f"shuffled children order: {[self._children.index(child) for child in order]}")
        for child in order:
            result = await child(context)
            if result.is_ok():
                return result
        return Result(Status.FAIL, None)

    def static_params(self) -> dict[str, Any]:
        return {"weights": self.weights if isinstance(self.weights, list) else "<factory>"}


class If(InternalNode):
    """Runs the first child when the condition holds, else the second (plain or an `.Else()`), else OK(None)."""

    KIND: ClassVar[str] = "If"
    min_children: ClassVar[int] = 1
    max_children: ClassVar[float] = 2

    def __init__(self, attr_or_condition_func: str | Callable[..., Any], name: str = "") -> None:
        super().__init__(name or condition_name(attr_or_condition_func))
        self.condition = Condition(attr_or_condition_func, f"If {self.fullname!r}")

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        if await self.condition(context):
            tracer.log("condition: true")
            return await self._children[0](context)
        tracer.log("condition: false")
        if len(self._children) > 1:
            return await self._children[1](context)
        return Result(Status.OK, None)

    def static_params(self) -> dict[str, Any]:
        return {"condition": self.condition.describe()}


class BranchMarker(SingleChildNode):
    """A named second branch (Else, Fallback) that only given parent kinds may hold, as their second child."""

    allowed_parents: ClassVar[tuple[str, ...]] = ()

    def accepted_by(self, parent: InternalNode) -> None:
        if parent.KIND not in self.allowed_parents:
            raise self.programming_error(
                f"must be a child of {' or '.join(self.allowed_parents)}, not of {parent.fullname}"
            )
        if len(parent.children()) != 2:
            raise self.programming_error(f"must be the second child of {parent.fullname}")

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        return await self._children[0](context)


class Else(BranchMarker):
    """Marks where an If's else branch starts: the children after it run when the condition is false."""

    KIND: ClassVar[str] = "Else"
    allowed_parents: ClassVar[tuple[str, ...]] = ("If",)
