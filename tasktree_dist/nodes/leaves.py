"""Leaf nodes: the units that do work or touch the blackboard."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.blackboard import read_field, write_field
from ..core.callables import adapt, callable_name, is_async_callable, resolve
from ..core.result import Result, Status
from ..core.trace import Tracer
from . import jsonload
from .base import LeafNode

if TYPE_CHECKING:
    from ..core.context import Context
    from ..core.executor import RunnableTree


class Function(LeafNode):
    """Runs a sync or async callable taking (), (b), (b, tracer) or (b, tracer, context).

    A returned Result passes through; any other value becomes OK(value).
    """

    KIND: ClassVar[str] = "Function"
    SHIPPABLE: ClassVar[bool] = True

    def __init__(self, func: Callable[..., Any], name: str = "") -> None:
        self.func = func
        super().__init__(name)
        self._call = adapt(func, (0, 1, 2, 3), f"{self.fullname}")
        self._is_async = is_async_callable(func)

    def default_name(self) -> str:
        return callable_name(self.func)

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        blackboards = context._blackboards
        value = self._call(blackboards[-1] if blackboards else None, context._tracer, context)
        if self._is_async or inspect.isawaitable(value):
            value = await value
        if isinstance(value, Result):
            return value
        return Result(Status.OK, value)

    def static_params(self) -> dict[str, Any]:
        return {"func": callable_name(self.func)}


class Log(LeafNode):
    """Writes a message (or a message made from the blackboard) into the trace."""

    KIND: ClassVar[str] = "Log"

    def __init__(self, msg_or_factory: str | Callable[[Any], str], level: str = "info", name: str = ""):
        self.message = msg_or_factory
        super().__init__(name)
        self.level = level
        label = f"{self.name}, {level}" if self.name else level
        self.fullname = self.trace_name = f"{self.KIND}({label})"
        self._factory = adapt(msg_or_factory, (0, 1), self.fullname) if callable(msg_or_factory) else None

    def default_name(self) -> str:
        return callable_name(self.message) if callable(self.message) else ""

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        message = self.message
        if self._factory is not None:
            message = await resolve(self._factory(context.blackboard))
        tracer.log(str(message), self.level)
        return Result(Status.OK, None)

    def static_params(self) -> dict[str, Any]:
        return {"level": self.level, "message": self.message if isinstance(self.message, str) else "<factory>"}


class TODO(LeafNode):
    """A placeholder that succeeds with None: scaffolding for a step not written yet."""

    KIND: ClassVar[str] = "TODO"

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        return Result(Status.OK, None)


class ShowBlackboard(LeafNode):
    """Returns the current blackboard (and shows it in the trace) for inspection."""

    KIND: ClassVar[str] = "ShowBlackboard"

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        blackboard = context.blackboard
        tracer.update_attributes(blackboard=blackboard)
        return Result(Status.OK, blackboard)


class WriteBlackboard(LeafNode):
    """Stores the previous node's result data into a blackboard attribute, or passes it to (b, data)."""

    KIND: ClassVar[str] = "WriteBlackboard"

    def __init__(self, attr_or_func: str | Callable[[Any, Any], Any], name: str = "") -> None:
        self.target = attr_or_func
        super().__init__(name)
        self._writer = adapt(attr_or_func, (2,), self.fullname) if callable(attr_or_func) else None

    def default_name(self) -> str:
        return f"b.{self.target}" if isinstance(self.target, str) else callable_name(self.target)

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        last = context._last_result
        if last is None:  # nothing to write: leave the blackboard as it is (tinytasktree semantics)
            tracer.warning("no last_result")
            return Result(Status.OK, None)
        data = last.data
        if self._writer is not None:
            await resolve(self._writer(context.blackboard, data))
        else:
            write_field(context.blackboard, self.target, data)
        return Result(Status.OK, data)

    def static_params(self) -> dict[str, Any]:
        return {"target": self.target if isinstance(self.target, str) else callable_name(self.target)}


class Condition:
    """A condition given as a blackboard attribute name or a sync/async callable of (), (b) or (b, tracer)."""

    __slots__ = ("source", "_call", "_attr")

    def __init__(self, source: str | Callable[..., Any], what: str) -> None:
        self.source = source
        if isinstance(source, str):
            self._attr, self._call = source, None
        else:
            self._attr, self._call = None, adapt(source, (0, 1, 2), f"{what} condition")

    async def __call__(self, context: Context) -> bool:
        if self._call is None:
            return bool(read_field(context.blackboard, self._attr))
        return bool(await resolve(self._call(context.blackboard, context._tracer)))

    def describe(self) -> str:
        return self.source if isinstance(self.source, str) else callable_name(self.source)


def condition_name(condition: str | Callable[..., Any]) -> str:
    return f"b.{condition}" if isinstance(condition, str) else callable_name(condition)


class Assert(LeafNode):
    """OK(True) when the condition holds, FAIL(False) when it does not (an AssertionError counts as false)."""

    KIND: ClassVar[str] = "Assertion"

    def __init__(self, attr_or_condition_func: str | Callable[..., Any], name: str = "") -> None:
        super().__init__(name or condition_name(attr_or_condition_func))
        self.condition = Condition(attr_or_condition_func, self.fullname)

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        try:
            holds = await self.condition(context)
        except AssertionError as exc:
            tracer.log(f"assertion failed: {exc}", "info")
            holds = False
        return Result(Status.OK, True) if holds else Result(Status.FAIL, False)

    def static_params(self) -> dict[str, Any]:
        return {"condition": self.condition.describe()}


class Failure(LeafNode):
    """Always FAIL(None)."""

    KIND: ClassVar[str] = "Failure"

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        return Result(Status.FAIL, None)


class Subtree(LeafNode):
    """Runs another tree, on the same blackboard or on one made by `subtree_blackboard_factory(parent_b)`."""

    KIND: ClassVar[str] = "Subtree"

    def __init__(
        self,
        subtree: RunnableTree,
        subtree_blackboard_factory: Callable[[Any], Any] | None = None,
        name: str = "",
    ) -> None:
        self.tree = subtree
        super().__init__(name)
        self.factory = (
            adapt(subtree_blackboard_factory, (1,), f"{self.fullname} blackboard factory")
            if subtree_blackboard_factory is not None
            else None
        )

    def default_name(self) -> str:
        return getattr(self.tree, "name", "")

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        if self.factory is None:
            return await self.tree(context)
        child_blackboard = await resolve(self.factory(context.blackboard))
        context._blackboards.append(child_blackboard)
        try:
            return await self.tree(context)
        finally:
            context._blackboards.pop()

    def static_params(self) -> dict[str, Any]:
        return {"tree": self.tree.name, "fingerprint": self.tree.fingerprint}


class ParseJSON(LeafNode):
    """Parses JSON from the last result (default), a blackboard attribute, or a (b) -> str factory."""

    KIND: ClassVar[str] = "ParseJSON"

    def __init__(
        self,
        src: str | Callable[[Any], Any] | None = None,
        dst: str | Callable[[Any, Any], Any] | None = None,
        json_loader: jsonload.JSONLoader | None = None,
        name: str = "",
    ) -> None:
        super().__init__(name)
        self.src, self.dst = src, dst
        self._src = adapt(src, (1,), f"{self.fullname} src") if callable(src) else None
        self._dst = adapt(dst, (2,), f"{self.fullname} dst") if callable(dst) else None
        self.loader = json_loader or jsonload.load_json

    async def _source(self, context: Context) -> Any:
        if self._src is not None:
            return await resolve(self._src(context.blackboard))
        if isinstance(self.src, str):
            return read_field(context.blackboard, self.src)
        last = context._last_result
        if last is None:
            return "{}"
        return last.data

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        raw = await self._source(context)
        raw = getattr(raw, "final_output", raw)  # an LLM step's record parses as its output text
        if isinstance(raw, str | bytes | bytearray):
            if not isinstance(raw, str):
                raw = raw.decode("utf-8", errors="replace")
            try:
                data = self.loader(jsonload.strip_fences(raw))  # every loader gets the text without its fence
            except ValueError as exc:
                data, reason = None, str(exc)
            else:
                reason = "the loader returned None"
            if data is None:
                tracer.error(f"cannot parse JSON from {str(raw)[:200]!r}: {reason}")
                return Result(Status.FAIL, {})
        else:
            data = raw  # already structured (e.g. a dict from a previous step)
        if self._dst is not None:
            await resolve(self._dst(context.blackboard, data))
        elif isinstance(self.dst, str):
            write_field(context.blackboard, self.dst, data)
        return Result(Status.OK, data)

    def static_params(self) -> dict[str, Any]:
        def show(value: Any) -> Any:
            return value if value is None or isinstance(value, str) else callable_name(value)

        return {"src": show(self.src), "dst": show(self.dst)}
