"""Decorator nodes: they run one child (plus an optional fallback) and shape its outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.callables import adapt, callable_name, resolve
from ..core.errors import TasktreeError
from ..core.result import Result, Status
from ..core.store import CacheStore
from ..core.trace import Tracer
from .base import DecoratorNode, Node
from .composites import BranchMarker
from .leaves import Condition, condition_name

if TYPE_CHECKING:
    from ..core.context import Context


class _DataFactoryDecorator(DecoratorNode):
    """ForceOk / ForceFail / Return: an optional `result_factory(b) -> data` replaces the child's data."""

    def __init__(self, result_factory: Callable[[Any], Any] | None = None, name: str = "") -> None:
        self.result_factory = result_factory
        super().__init__(name=name)
        self._factory = adapt(result_factory, (0, 1), f"{self.fullname} result_factory") if result_factory else None

    def default_name(self) -> str:
        return callable_name(self.result_factory) if self.result_factory else "None"

    async def _data(self, context: Context, child_data: Any) -> Any:
        if self._factory is None:
            return child_data
        return await resolve(self._factory(context.blackboard))

    def static_params(self) -> dict[str, Any]:
        return {"result_factory": callable_name(self.result_factory) if self.result_factory else None}


class ForceOk(_DataFactoryDecorator):
    """OK whatever the child returned (its data, or `f(b, data)` when given)."""

    KIND: ClassVar[str] = "ForceOk"

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        result = await self.child()(context)
        return Result(Status.OK, await self._data(context, result.data))


class ForceFail(_DataFactoryDecorator):
    """FAIL whatever the child returned (its data, or `f(b, data)` when given)."""

    KIND: ClassVar[str] = "ForceFail"

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        result = await self.child()(context)
        return Result(Status.FAIL, await self._data(context, result.data))


class Return(_DataFactoryDecorator):
    """Keeps the child's status, replaces its data with `result_factory(b)`."""

    KIND: ClassVar[str] = "Return"

    def __init__(self, result_factory: Callable[[Any], Any], name: str = "") -> None:
        if not callable(result_factory):
            raise TypeError(f"Return needs a result_factory callable, got {result_factory!r}")
        super().__init__(result_factory, name)

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        result = await self.child()(context)
        return Result(result.status, await self._data(context, result.data))


class Invert(DecoratorNode):
    """OK becomes FAIL and FAIL becomes OK; the data stays."""

    KIND: ClassVar[str] = "Invert"

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        result = await self.child()(context)
        return Result(result.status.invert(), result.data)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Retry(DecoratorNode):
    """Runs the child up to `max_tries` times until it is OK, sleeping `sleep_secs` (or `sleep_secs[i]`) between."""

    KIND: ClassVar[str] = "Retry"

    def __init__(self, max_tries: int, sleep_secs: float | list[float] | None = None, name: str = "") -> None:
        super().__init__(name=name)
        if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
            raise self.programming_error(f"max_tries must be an integer >= 1, got {max_tries!r}")
        sleeps = list(sleep_secs) if isinstance(sleep_secs, list | tuple) else [sleep_secs or 0]
        if not all(is_number(s) and s >= 0 for s in sleeps):
            raise self.programming_error(f"sleep_secs must be seconds >= 0 or a list of them, got {sleep_secs!r}")
        self.max_tries = max_tries
        self.sleep_secs = sleep_secs

    def sleep_for(self, retry_index: int) -> float:
        """Pause before retry `retry_index` (0 = the first retry); a list past its end means no pause."""
        if isinstance(self.sleep_secs, list | tuple):
            return float(self.sleep_secs[retry_index]) if retry_index < len(self.sleep_secs) else 0.0
        return float(self.sleep_secs or 0)

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        for attempt in range(self.max_tries):
            if attempt:
                delay = self.sleep_for(attempt - 1)
                if delay > 0:
                    tracer.log(f"sleep => {delay}")
                    await asyncio.sleep(delay)
            result = await self.child()(context)
            if result.is_ok():
                tracer.log(f"result ok, tries => {attempt + 1}")
                return result
            tracer.log(f"result fail: {result}", "warning")
        tracer.log(f"tries => {self.max_tries}")
        return Result(Status.FAIL, None)

    def static_params(self) -> dict[str, Any]:
        return {"max_tries": self.max_tries, "sleep_secs": self.sleep_secs}


class While(DecoratorNode):
    """Repeats the child while the condition holds (checked before each round), at most `max_loop_times` rounds.

    Returns the last OK result; FAIL(None) when the first round fails or no round ran (tinytasktree semantics).
    """

    KIND: ClassVar[str] = "While"

    def __init__(self, attr_or_condition_func: str | Callable[..., Any], max_loop_times: int = 1000, name: str = ""):
        super().__init__(name=name or condition_name(attr_or_condition_func))
        if isinstance(max_loop_times, bool) or not isinstance(max_loop_times, int) or max_loop_times < 1:
            raise self.programming_error(f"max_loop_times must be an integer >= 1, got {max_loop_times!r}")
        self.condition = Condition(attr_or_condition_func, self.fullname)
        self.max_loop_times = max_loop_times

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        result = Result(Status.FAIL, None)
        rounds = 0
        while True:
            if rounds >= self.max_loop_times:
                tracer.log("exceed max_loop_times, breaking", "warning")
                break
            if not await self.condition(context):
                break
            child_result = await self.child()(context)
            if not child_result.is_ok():
                break
            result = child_result
            rounds += 1
        tracer.update_attributes(loops=rounds)
        return result

    def static_params(self) -> dict[str, Any]:
        return {"condition": self.condition.describe(), "max_loop_times": self.max_loop_times}


class Fallback(BranchMarker):
    """The branch Timeout and Terminable run when their main child is stopped."""

    KIND: ClassVar[str] = "Fallback"
    allowed_parents: ClassVar[tuple[str, ...]] = ("Timeout", "Terminable")


class _MainWithFallback(DecoratorNode):
    """A main child plus an optional fallback (a plain node or a `.Fallback()` branch)."""

    max_children: ClassVar[float] = 2

    async def _fallback(self, context: Context, tracer: Tracer, why: str) -> Result:
        tracer.log(why, "warning")
        if len(self._children) > 1:
            return await self._children[1](context)
        return Result(Status.FAIL, None)


class Timeout(_MainWithFallback):
    """Runs the main child with a time limit; on expiry the fallback runs, or FAIL(None)."""

    KIND: ClassVar[str] = "Timeout"

    def __init__(self, secs: float, name: str = "") -> None:
        super().__init__(name)
        if not is_number(secs) or secs <= 0:
            raise self.programming_error(f"secs must be a number > 0, got {secs!r}")
        self.secs = float(secs)

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        tracer.log(f"timeout seconds config: {self.secs:g}")
        try:
            async with asyncio.timeout(self.secs):
                return await self.child()(context)
        except TimeoutError:
            return await self._fallback(context, tracer, f"timed out after {self.secs:g}s")

    def static_params(self) -> dict[str, Any]:
        return {"secs": self.secs}


def require_store(node: Node, store: Any, methods: tuple[str, ...]) -> Any:
    if store is None:
        raise TasktreeError(f"{node.fullname}: must provide a store instance (e.g. redis.asyncio.Redis)")
    missing = [m for m in methods if not callable(getattr(store, m, None))]
    if missing:
        raise node.programming_error(f"store {type(store).__name__} lacks async method(s) {', '.join(missing)}")
    return store


class Terminable(_MainWithFallback):
    """Runs the main child while polling `store` for the key `key_func(b)`; once it exists the child is cancelled.

    Then the fallback runs, or FAIL(None). A stale signal left by an earlier run is cleared at start, and the
    signal is consumed (deleted) when acted on, as in tinytasktree.
    """

    KIND: ClassVar[str] = "Terminable"

    def __init__(
        self, key_func: Callable[[Any], str], store: CacheStore | None = None, monitor_interval_ms: float = 500,
        name: str = "",
    ) -> None:
        super().__init__(name)
        self.store = require_store(self, store, ("exists", "delete"))
        if not is_number(monitor_interval_ms) or monitor_interval_ms <= 0:
            raise self.programming_error(f"monitor_interval_ms must be > 0, got {monitor_interval_ms!r}")
        self.key_func = key_func
        self._key = adapt(key_func, (1,), f"{self.fullname} key_func")
        self.monitor_interval_ms = float(monitor_interval_ms)

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        from ..core.hooks import after_spawned_task, has_hooks

        key = await resolve(self._key(context.blackboard))
        await self.store.delete(key)
        branch = context.fork()
        main = asyncio.ensure_future(self.child()(branch))
        interval = self.monitor_interval_ms / 1000.0
        try:
            while True:
                done, _ = await asyncio.wait({main}, timeout=interval)
                if done:
                    result = main.result()
                    break
                if await self.store.exists(key):
                    await self.store.delete(key)
                    main.cancel()
                    await asyncio.gather(main, return_exceptions=True)
                    result = None
                    break
        finally:
            if not main.done():
                main.cancel()
                await asyncio.gather(main, return_exceptions=True)
        if has_hooks():
            await after_spawned_task(branch, tracer, result or Result(Status.FAIL, None))
        if result is not None:
            return result
        return await self._fallback(context, tracer, f"cancelled: termination key {key!r} was set")

    def static_params(self) -> dict[str, Any]:
        return {"key_func": callable_name(self.key_func), "monitor_interval_ms": self.monitor_interval_ms}


WrapperFunc = Callable[[Node, "Context"], AbstractAsyncContextManager[Result]]


class Wrapper(DecoratorNode):
    """Runs the child through `func(child, context)`, an async context manager yielding the Result."""

    KIND: ClassVar[str] = "Wrapper"

    def __init__(self, func: WrapperFunc, name: str = "") -> None:
        super().__init__(name=name)
        if not callable(func):
            raise self.programming_error(f"func must be callable, got {func!r}")
        self.func = func

    async def _impl(self, context: Context, tracer: Tracer) -> Result:
        manager = self.func(self.child(), context)
        if not hasattr(manager, "__aenter__") or not hasattr(manager, "__aexit__"):
            raise TypeError(f"{self.fullname}: Wrapper function must return an async context manager")
        async with manager as result:
            if not isinstance(result, Result):
                raise TypeError(f"{self.fullname}: the context manager yielded {type(result).__name__}, not a Result")
            return result

    def static_params(self) -> dict[str, Any]:
        return {"func": callable_name(self.func)}
