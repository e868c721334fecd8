"""Node base classes.

A node implements `async _impl(self, context, tracer) -> Result` (tinytasktree's contract, so custom nodes
written for it keep working: the bases are generic in the blackboard type, `LeafNode[B]`, and a decorator may be
declared tinytasktree's way, `class X(SingleChildNode[B], DecoratorNode[B])`, or simply `class X(DecoratorNode)`).
Calling a node (`await node(context)`) wraps `_impl` with what every node needs: its trace node, exception
capture (an exception becomes FAIL and never escapes), the last result for the next node, and the executor,
which decides where `_impl` runs.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from ..core.errors import TasktreeProgrammingError
from ..core.result import Result, Status
from ..core.trace import TraceNode, Tracer

if TYPE_CHECKING:
    from ..core.context import Context

B = TypeVar("B")


class Node(Generic[B]):
    """Base of every node. `KIND` names the node type in traces, addresses and fingerprints."""

    KIND: ClassVar[str] = "Node"
    #: Work an executor may run in another process (Function, LLM); control flow stays with the coordinator.
    SHIPPABLE: ClassVar[bool] = False

    def __init__(self, name: str = "") -> None:
        self.name: str = name or self.default_name()
        self.fullname: str = f"{self.KIND}({self.name})" if self.name else self.KIND
        #: The name under the parent: fullname, made unique among siblings (`_1`, `_2`...). Used in traces.
        self.trace_name: str = self.fullname
        self._parent: InternalNode | None = None
        #: Set when the tree is built: tree name + trace names from the root, a stable address across processes.
        self.address: str = ""
        #: Placement override from `.Remote()` / `.Local()`: None (the executor decides), "remote" or "local".
        self.placement: str | None = None
        self.queue: str | None = None

    @property
    def kind(self) -> str:
        return self.KIND

    @property
    def parent(self) -> InternalNode | None:
        return self._parent

    def default_name(self) -> str:
        return ""

    def children(self) -> list[Node]:
        return []

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        raise NotImplementedError(f"{type(self).__name__} must implement `async _impl(self, context, tracer)`")

    async def __call__(self, context: Context) -> Result:
        parent = context._tracer
        tracer = TraceNode(self.trace_name, self.KIND, parent)
        if parent is not None:
            parent._children.append(tracer)
        context._tracer = tracer
        try:
            result = await context.executor.execute(self, context, tracer)
            if not isinstance(result, Result):
                result = Result(Status.OK, result)
        except asyncio.CancelledError:
            tracer.log("cancelled", "warning")
            tracer.ended = time.time()
            tracer.result = Result(Status.FAIL, None)
            raise
        except Exception as exc:  # noqa: BLE001 - the contract: errors become FAIL and stay in the trace
            tracer.error(exc)
            result = Result(Status.FAIL, None)
        finally:
            context._tracer = parent
        tracer.ended = time.time()
        tracer.result = result
        context._last_result = result
        return result

    # -- build time -------------------------------------------------------------------------------------------
    def OnBuildEnd(self) -> None:  # noqa: N802 - tinytasktree's hook name
        """Called when the tree is built: raise TasktreeProgrammingError if the node cannot work."""
        if inspect.isabstract(type(self)) or type(self)._impl is Node._impl:
            raise self.programming_error("node class does not implement `_impl`")

    def accepted_by(self, parent: InternalNode) -> None:
        """Called when attached: a child may refuse a parent (Else outside If, Fallback outside Timeout)."""

    def static_params(self) -> dict[str, Any]:
        """Parameters that define the node's structure (not code): part of the tree's fingerprint."""
        return {}

    def describe(self) -> str:
        return f"{self.fullname} at {self.address or self.trace_name}"

    def programming_error(self, message: str) -> TasktreeProgrammingError:
        return TasktreeProgrammingError(f"{self.describe()}: {message}")

    def __repr__(self) -> str:
        return f"<{self.address or self.fullname}>"


class LeafNode(Node[B]):
    """A node without children: it does the work."""

    KIND: ClassVar[str] = "Leaf"


class InternalNode(Node[B]):
    """A node with children; subclasses set how many they accept."""

    KIND: ClassVar[str] = "Internal"
    min_children: ClassVar[int] = 0
    max_children: ClassVar[float] = math.inf

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._children: list[Node] = []

    def children(self) -> list[Node]:
        return self._children

    def child(self) -> Node:
        """The first child: a decorator's only child, the main child of Timeout and Terminable."""
        if not self._children:
            raise self.programming_error("no child")
        return self._children[0]

    def get_unique_child_name(self, index: int) -> str:
        return self._children[index].trace_name

    def append_child(self, child: Node) -> None:
        if len(self._children) >= self.max_children:
            raise self.programming_error(
                f"accepts at most {int(self.max_children)} child node(s); cannot add {child.fullname}"
            )
        taken = {c.trace_name for c in self._children}
        name, i = child.fullname, 0
        while name in taken:
            i += 1
            name = f"{child.fullname}_{i}"
        child.trace_name = name
        child._parent = self
        self._children.append(child)
        child.accepted_by(self)

    def OnBuildEnd(self) -> None:  # noqa: N802
        super().OnBuildEnd()
        count = len(self._children)
        if count < self.min_children or count > self.max_children:
            if self.min_children == self.max_children:
                expected = f"exactly {self.min_children}"
            elif self.max_children == math.inf:
                expected = f"at least {self.min_children}"
            else:
                expected = f"{self.min_children} to {int(self.max_children)}"
            raise self.programming_error(f"needs {expected} child node(s), has {count}")


class CompositeNode(InternalNode[B]):
    """Any number of children, whose order and concurrency it controls."""

    KIND: ClassVar[str] = "Composite"

    def __init__(self, children: list[Node] | None = None, name: str = "") -> None:
        super().__init__(name)
        for child in children or ():
            self.append_child(child)


class SingleChildNode(InternalNode[B]):
    """Exactly one child."""

    KIND: ClassVar[str] = "SingleChild"
    min_children: ClassVar[int] = 1
    max_children: ClassVar[float] = 1

    def __init__(self, child: Node | None = None, name: str = "") -> None:
        super().__init__(name)
        if child is not None:
            self.append_child(child)


class DecoratorNode(InternalNode[B]):
    """Runs one child (some also a fallback: they raise max_children) and shapes its outcome.

    Not a SingleChildNode subclass, so tinytasktree's `class X(SingleChildNode[B], DecoratorNode[B])` has a valid
    method order; on its own it takes exactly one child all the same.
    """

    KIND: ClassVar[str] = "Decorator"
    min_children: ClassVar[int] = 1
    max_children: ClassVar[float] = 1
