"""Global hooks run after each task the engine spawns (Parallel and Gather branches, Terminable's child).

Applications use them for per-task clean-up, e.g. closing a database session bound to the task. A hook is
called as `hook(context, tracer, result)` inside the finished task, may be async, and may not break the run:
its exception is recorded on the branch's trace node.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import Context
    from .result import Result
    from .trace import TraceNode

SpawnedTaskFinishHook = Callable[["Context", "TraceNode", "Result"], Awaitable[Any] | Any]
_hooks: list[SpawnedTaskFinishHook] = []


def register_global_hook_after_spawned_task_finish(hook: SpawnedTaskFinishHook) -> SpawnedTaskFinishHook:
    """Register `hook(context, tracer, result)`; returns it, so it also works as a decorator."""
    if not callable(hook):
        raise TypeError(f"hook must be callable, got {hook!r}")
    _hooks.append(hook)
    return hook


def unregister_global_hook_after_spawned_task_finish(hook: SpawnedTaskFinishHook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)


async def after_spawned_task(context: Context, tracer: TraceNode, result: Result) -> None:
    for hook in tuple(_hooks):
        try:
            outcome = hook(context, tracer, result)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as exc:  # noqa: BLE001 - a broken hook must not break a run
            tracer.error(exc)


def has_hooks() -> bool:
    return bool(_hooks)
