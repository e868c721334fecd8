"""The fluent builder: `Tree[BB]("Name").Sequence()._().Function(f).End()`.

Each `._()` adds one level of depth for the next node; a node at depth d becomes a child of the latest node
at depth d - 1. `.End()` checks the whole tree, assigns node addresses, computes the fingerprint and
registers the tree by name. Subclass Tree and call `self.attach(node)` to add builder methods for custom nodes.
"""

from __future__ import annotations

import datetime as _dt
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..core.errors import TasktreeProgrammingError
from ..core.registry import register_tree
from ..core.result import Result
from ..core.signals import NO_DEFAULT
from ..core.trace import TraceNode, TraceRoot
from ..nodes.base import InternalNode, Node
from ..nodes.cacher import Cacher
from ..nodes.composites import Else, Gather, If, Parallel, RandomSelector, Selector, Sequence
from ..nodes.decorators import (
    Fallback,
    ForceFail,
    ForceOk,
    Invert,
    Retry,
    Return,
    Terminable,
    Timeout,
    While,
    Wrapper,
)
from ..nodes.leaves import TODO, Assert, Failure, Function, Log, ParseJSON, ShowBlackboard, Subtree, WriteBlackboard
from ..nodes.structure import assign_addresses, fingerprint
from ..nodes.wait import WaitFor

if TYPE_CHECKING:
    from ..core.context import Context
    from ..core.store import CacheStore
    from ..core.trace import Tracer
    from ..llm.types import LLMModel, Tool

B = TypeVar("B")


class Tree(Generic[B]):
    """A named tree of nodes, built fluently; `await tree(context)` runs it on the context's blackboard."""

    KIND = "Tree"

    def __init__(self, name: str = "") -> None:
        if not isinstance(name, str) or "/" in name:
            raise TasktreeProgrammingError(f"tree name must be a string without '/', got {name!r}")
        self.name = name
        self.fullname = f"Tree({name})" if name else "Tree"
        self.root: Node | None = None
        self.fingerprint: str = ""
        self.nodes: dict[str, Node] = {}
        self._open: list[Node] = []  # _open[d] is the latest node attached at depth d
        self._depth = 0
        self._built = False

    # -- building ---------------------------------------------------------------------------------------------
    def _(self) -> Tree[B]:
        """One more level of depth for the next node."""
        if self._built:
            raise TasktreeProgrammingError(f"tree {self.name!r} is already ended; `._()` after `.End()`")
        self._depth += 1
        return self

    def _attach(self, node: Node) -> Tree[B]:
        """Attach `node` at the depth given by the preceding `._()` calls. Builder methods end here."""
        depth, self._depth = self._depth, 0
        if not isinstance(node, Node):
            raise TasktreeProgrammingError(f"tree {self.name!r}: _attach() needs a Node, got {node!r}")
        if self._built:
            raise TasktreeProgrammingError(f"tree {self.name!r} is already ended; cannot add {node.kind}")
        where = f"{node.fullname} in {self.fullname}"
        if depth == 0:
            if self.root is not None:
                raise TasktreeProgrammingError(
                    f"{where}: the tree already has a root ({self.root.fullname}); prefix child nodes with `._()`"
                )
            self.root = node
        else:
            if depth > len(self._open):
                deepest = self._open[-1] if self._open else None
                shown = f"{deepest.fullname} at depth {len(self._open) - 1}" if deepest else "nothing"
                raise TasktreeProgrammingError(
                    f"{where}: too much indent: `._()` depth {depth} does not match the tree, "
                    f"the deepest open node is {shown}"
                )
            parent = self._open[depth - 1]
            if not isinstance(parent, InternalNode):
                raise TasktreeProgrammingError(
                    f"{where}: depth {depth} makes it a child of {parent.fullname}, which is a leaf"
                )
            parent.append_child(node)
        del self._open[depth:]
        self._open.append(node)
        return self

    def End(self) -> Tree[B]:  # noqa: N802 - spec name
        """Finish building: validate, assign addresses, fingerprint and register the tree."""
        if self.root is None:
            raise TasktreeProgrammingError(f"{self.fullname}: `.End()` with nothing open: the tree has no nodes")
        if self._built:
            raise TasktreeProgrammingError(f"{self.fullname}: `.End()` with nothing open: the tree is already ended")
        if self._depth:
            raise TasktreeProgrammingError(f"{self.fullname}: `._()` right before `.End()` attaches nothing")
        self.nodes = assign_addresses(self.name or "Tree", self.root)
        for node in self.nodes.values():
            node.OnBuildEnd()
        self.fingerprint = fingerprint(self.root)
        self._built = True
        self._open = []
        self._register_blackboard_type()
        if self.name:
            register_tree(self)
        return self

    def _register_blackboard_type(self) -> None:
        """`Tree[BB]` names the blackboard type: allow it across process boundaries (see serde)."""
        from ..core.serde import register_type

        alias = getattr(self, "__orig_class__", None)
        for arg in typing.get_args(alias) if alias is not None else ():
            if isinstance(arg, type) and (hasattr(arg, "__dataclass_fields__") or hasattr(arg, "model_validate")):
                register_type(arg)

    @property
    def blackboard_type(self) -> type | None:
        alias = getattr(self, "__orig_class__", None)
        args = typing.get_args(alias) if alias is not None else ()
        return args[0] if args and isinstance(args[0], type) else None

    # -- running ----------------------------------------------------------------------------------------------
    async def __call__(self, context: Context, index: int | None = None) -> Result:
        """Run on `context`'s current blackboard. A top-level call starts a new TraceRoot on the context (and, with
        an executor that records runs, a run: see `run_scope` in core.executor)."""
        if not self._built:
            self.End()
        parent = context._tracer
        if parent is not None:
            return await self._run(context, parent, index, None)
        root = context._root = TraceRoot()
        run_scope = getattr(context.executor, "run_scope", None)
        if run_scope is None:
            return await self._run(context, root, index, root)
        return await run_scope(self, context, lambda: self._run(context, root, index, root))

    async def _run(self, context: Context, parent: TraceNode, index: int | None, root: TraceRoot | None) -> Result:
        name = self.fullname if index is None else f"{index}_{self.fullname}"
        tracer = TraceNode(name, "Tree", parent)
        parent._children.append(tracer)
        context._tracer = tracer
        try:
            refused = await _open_budget(context, tracer) if root is not None and context.budget is not None else None
            result = refused if refused is not None else await self.root(context)  # type: ignore[misc]
        finally:
            context._tracer = None if root is not None else parent
        tracer.set_end(result)
        if root is not None:
            root.set_end(result)
        context._last_result = result
        return result

    # -- specs (trees as data: builder/spec_*.py) -------------------------------------------------------------
    @classmethod
    def from_spec(
        cls, document: dict[str, Any] | str | bytes, variables: dict[str, Any] | None = None, source: str = ""
    ) -> Tree[Any]:
        """Build the tree a spec document describes (a dict, or YAML/JSON text; `$name`s filled from
        `variables`); raises SpecError naming the place of every problem."""
        from .spec import build_tree

        return build_tree(cls, document, variables, source)

    def to_spec(self) -> dict[str, Any]:
        """This tree as a spec document (`Tree.from_spec(tree.to_spec())` has the same fingerprint); SpecError
        names any callable, store or tool that is not registered."""
        from .spec_write import tree_to_spec

        return tree_to_spec(self)

    def child(self) -> Node:
        """The root node (a tinytasktree Tree is a node whose one child is the root)."""
        if self.root is None:
            raise TasktreeProgrammingError(f"{self.fullname}: no child")
        return self.root

    def node(self, address: str) -> Node:
        """The node at `address` (as found in traces and unit messages)."""
        try:
            return self.nodes[address]
        except KeyError:
            raise LookupError(f"tree {self.name!r} has no node at address {address!r}") from None

    def __repr__(self) -> str:
        return f"<{self.fullname}>"

    # -- leaves (signatures as in tinytasktree) ---------------------------------------------------------------
    def Function(self, func: Callable[..., Any], name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Function(func, name))

    def Log(self, msg_or_factory: str | Callable[[B], str], level: str = "info", name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Log(msg_or_factory, level, name))

    def TODO(self, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(TODO(name))

    def Failure(self, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Failure(name))

    def ShowBlackboard(self, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(ShowBlackboard(name))

    def WriteBlackboard(self, attr_or_func: str | Callable[[B, Any], Any], name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(WriteBlackboard(attr_or_func, name))

    def Assert(self, attr_or_condition_func: str | Callable[..., Any], name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Assert(attr_or_condition_func, name))

    def ParseJSON(  # noqa: N802
        self,
        src: str | Callable[[B], Any] | None = None,
        dst: str | Callable[[B, Any], Any] | None = None,
        json_loader: Callable[[str], Any] | None = None,
        name: str = "",
    ) -> Tree[B]:
        return self._attach(ParseJSON(src, dst, json_loader, name))

    def WaitFor(  # noqa: N802
        self,
        name: str | Callable[[B], str],
        schema: Any = None,
        timeout_s: float | None = None,
        default: Any = NO_DEFAULT,
        prompt: str | Callable[[B], Any] | None = None,
    ) -> Tree[B]:
        """Wait for the signal `name` (see nodes.wait.WaitFor and docs/waits.md)."""
        return self._attach(WaitFor(name, schema, timeout_s, default, prompt))

    def LLM(  # noqa: N802
        self,
        model: str | LLMModel | Callable[[B], str | LLMModel],
        messages: list[dict[str, Any]] | Callable[[B], list[dict[str, Any]]],
        stream: bool | Callable[[B], bool] = False,
        stream_on_delta: Callable[..., Any] | None = None,
        api_key: str | Callable[..., str | None] | None = None,
        name: str = "",
        base_url: str | Callable[[B], str | None] | None = None,
        client_kwargs: dict[str, Any] | None = None,
        extra_body: dict[str, Any] | None = None,
        tools: list[Tool[Any]] | Callable[[B], list[Tool[Any]]] | None = None,
        on_llm_message: Callable[[B, dict[str, Any], Tracer], Any] | None = None,
        max_retries: int | None = None,
        timeout: float | None = None,
        batch: bool | Callable[[B], bool] | None = None,
        batch_fallback: str | None = None,
        **llm_call_kwargs: Any,
    ) -> Tree[B]:
        """One chat-completions call and its tool calls (llm.node.LLM); `llm_call_kwargs` go to the request."""
        from ..llm.node import LLM

        return self._attach(LLM(
            model, messages, stream=stream, stream_on_delta=stream_on_delta, api_key=api_key, name=name,
            base_url=base_url, client_kwargs=client_kwargs, extra_body=extra_body, tools=tools,
            on_llm_message=on_llm_message, max_retries=max_retries, timeout=timeout, batch=batch,
            batch_fallback=batch_fallback, **llm_call_kwargs,
        ))

    def Subtree(  # noqa: N802
        self, subtree: Tree[Any], subtree_blackboard_factory: Callable[[B], Any] | None = None, name: str = ""
    ) -> Tree[B]:
        return self._attach(Subtree(subtree, subtree_blackboard_factory, name))

    # -- decorators -------------------------------------------------------------------------------------------
    def ForceOk(self, result_factory: Callable[[B], Any] | None = None, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(ForceOk(result_factory, name))

    def ForceFail(self, result_factory: Callable[[B], Any] | None = None, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(ForceFail(result_factory, name))

    def Invert(self, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Invert(name=name))

    def Return(self, result_factory: Callable[[B], Any], name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Return(result_factory, name))

    def Retry(self, max_tries: int, sleep_secs: float | list[float] | None = None, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Retry(max_tries, sleep_secs, name))

    def While(  # noqa: N802
        self, attr_or_condition_func: str | Callable[..., Any], max_loop_times: int = 1000, name: str = ""
    ) -> Tree[B]:
        return self._attach(While(attr_or_condition_func, max_loop_times, name))

    def Timeout(self, secs: float, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Timeout(secs, name))

    def Fallback(self, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Fallback(name=name))

    def Wrapper(self, func: Callable[..., Any], name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Wrapper(func, name))

    def Cacher(  # noqa: N802
        self,
        key_func: Callable[[B], str],
        store: CacheStore | None = None,
        expiration: int | float | _dt.timedelta | tuple[Any, Any] | None = _dt.timedelta(hours=1),
        value_validator: Callable[..., Any] | None = None,
        enabled: bool | Callable[[B], bool] = True,
        name: str = "",
    ) -> Tree[B]:
        return self._attach(Cacher(key_func, store, expiration, value_validator, enabled, name))

    def Terminable(  # noqa: N802
        self, key_func: Callable[[B], str], store: CacheStore | None = None, monitor_interval_ms: float = 500,
        name: str = "",
    ) -> Tree[B]:
        return self._attach(Terminable(key_func, store, monitor_interval_ms, name))

    # -- placement (read by distributed executors; in-process they just run their child) -----------------------
    def Remote(self, queue: str | None = None, name: str = "") -> Tree[B]:  # noqa: N802
        from ..nodes.placement import Remote

        return self._attach(Remote(queue, name))

    def Local(self, name: str = "") -> Tree[B]:  # noqa: N802
        from ..nodes.placement import Local

        return self._attach(Local(name=name))

    # -- composites -------------------------------------------------------------------------------------------
    def Sequence(self, children: list[Node] | None = None, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Sequence(children, name))

    def Selector(self, children: list[Node] | None = None, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Selector(children, name))

    def Parallel(  # noqa: N802
        self, children: list[Node] | None = None, concurrency_limit: int = 3, name: str = ""
    ) -> Tree[B]:
        return self._attach(Parallel(children, concurrency_limit, name))

    def Gather(  # noqa: N802
        self, params_factory: Callable[[B], Any], concurrency_limit: int = 3, name: str = ""
    ) -> Tree[B]:
        return self._attach(Gather(params_factory, concurrency_limit, name))

    def RandomSelector(  # noqa: N802
        self,
        children: list[Node] | None = None,
        weights: list[float] | Callable[[B], list[float]] | None = None,
        name: str = "",
    ) -> Tree[B]:
        return self._attach(RandomSelector(children, weights, name))

    def If(self, attr_or_condition_func: str | Callable[..., Any], name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(If(attr_or_condition_func, name))

    def Else(self, name: str = "") -> Tree[B]:  # noqa: N802
        return self._attach(Else(name=name))



Tree.attach = Tree._attach  # type: ignore[method-assign]


async def _open_budget(context: Context, tracer: TraceNode) -> Result | None:
    """Open the run's budget (a run id, and the caps where its LLM calls count); FAIL the run if it cannot be."""
    try:
        await context.budget.open(context)  # type: ignore[union-attr]
    except Exception as exc:  # noqa: BLE001 - a top-level call never raises: the run FAILs with the error
        tracer.error(exc)
        return Result.FAIL(None)
    return None
