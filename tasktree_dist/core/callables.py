"""Adapting user callables of varying arity (and sync or async) to one calling convention.

The arity is worked out once, at build time, so the hot path is a plain call.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import TasktreeProgrammingError


def positional_arity(func: Callable[..., Any]) -> int | None:
    """How many positional arguments `func` accepts; None when it takes *args (accepts any count)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without a signature: assume they take everything offered
        return None
    count = 0
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


def adapt(func: Callable[..., Any], allowed: tuple[int, ...], what: str) -> Callable[..., Any]:
    """Return a callable taking the longest allowed argument list and passing `func` only as many as it takes.

    `allowed` lists the accepted arities, e.g. (0, 1, 2) for (), (b), (b, tracer).
    """
    if not callable(func):
        raise TasktreeProgrammingError(f"{what}: expected a callable, got {type(func).__name__} {func!r}")
    arity = positional_arity(func)
    longest = max(allowed)
    if arity is None:
        arity = longest
    if arity not in allowed:
        raise TasktreeProgrammingError(
            f"{what}: {callable_name(func)!r} takes {arity} positional arguments, "
            f"accepted forms take {' or '.join(map(str, allowed))}"
        )
    if arity == longest:
        return func
    if arity == 0:
        return lambda *_args: func()
    if arity == 1:
        return lambda first, *_args: func(first)
    if arity == 2:
        return lambda first, second, *_args: func(first, second)
    return lambda *args: func(*args[:arity])


async def resolve(value: Any) -> Any:
    """Await `value` if it is awaitable: lets one code path serve sync and async callables."""
    if inspect.isawaitable(value):
        return await value
    return value


def is_async_callable(func: Callable[..., Any]) -> bool:
    """True for `async def` functions; other callables returning awaitables are detected per call."""
    return inspect.iscoroutinefunction(func)


def value_or_factory(value: Any, what: str, allowed: tuple[int, ...] = (0, 1)) -> Callable[..., Awaitable[Any] | Any]:
    """A parameter given either as a plain value or as a factory of the blackboard becomes a factory."""
    if callable(value):
        return adapt(value, allowed, what)
    return lambda *_args: value


def callable_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    return "lambda" if name == "<lambda>" else name
