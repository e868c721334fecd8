"""Placement decorators: `.Remote(queue=...)` ships a subtree to workers as one unit, `.Local()` keeps it here.

In-process they simply run their child; a distributed executor reads them to decide where work runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..core.result import Result
from ..core.trace import Tracer
from .base import DecoratorNode

if TYPE_CHECKING:
    from ..core.context import Context


class Remote(DecoratorNode):
    """Run the child subtree whole on a worker (on `queue`, or the executor's default queue)."""

    KIND: ClassVar[str] = "Remote"

    def __init__(self, queue: str | None = None, name: str = "") -> None:
        super().__init__(name=name)
        self.queue = queue

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        return await self.child()(context)

    def static_params(self) -> dict[str, Any]:
        return {"queue": self.queue}


class Local(DecoratorNode):
    """Keep the child subtree (its Function and LLM leaves included) in the coordinator process."""

    KIND: ClassVar[str] = "Local"

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        return await self.child()(context)
